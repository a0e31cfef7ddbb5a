"""Stand-in of modules/processing.py: StableDiffusionProcessingImg2Img's mask fields, Processed, process_images."""


class Processed:
    def __init__(self, p, images_list, seed=-1, info=""):
        self.images = images_list
        self.seed = seed
        self.info = info


class StableDiffusionProcessingImg2Img:
    def __init__(self, init_images=None, mask=None, mask_blur=4, inpainting_fill=0, inpaint_full_res=True,
                 inpainting_mask_invert=0, seed=-1, **kwargs):
        self.init_images = init_images
        self.image_mask = mask
        self.latent_mask = None
        self.mask_round = True
        self.mask_blur = mask_blur
        self.inpainting_fill = inpainting_fill
        self.inpaint_full_res = inpaint_full_res
        self.inpainting_mask_invert = inpainting_mask_invert
        self.seed = seed


calls = []


def process_images(p):
    """Records the processing object as the webui would receive it and returns its init images."""
    calls.append({"image_mask": p.image_mask, "latent_mask": p.latent_mask, "mask_round": p.mask_round})
    return Processed(p, list(p.init_images), seed=p.seed)
