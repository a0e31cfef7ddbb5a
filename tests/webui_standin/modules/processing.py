"""Stand-in of modules/processing.py: StableDiffusionProcessingImg2Img's mask and seed fields, Processed,
process_images, fix_seed."""

import random


class Processed:
    def __init__(self, p, images_list, seed=-1, info=""):
        self.images = images_list
        self.seed = seed
        self.info = info


class StableDiffusionProcessingImg2Img:
    def __init__(self, init_images=None, mask=None, mask_blur=4, inpainting_fill=0, inpaint_full_res=True,
                 inpainting_mask_invert=0, seed=-1, subseed=-1, **kwargs):
        self.init_images = init_images
        self.image_mask = mask
        self.latent_mask = None
        self.mask_round = True
        self.mask_blur = mask_blur
        self.inpainting_fill = inpainting_fill
        self.inpaint_full_res = inpaint_full_res
        self.inpainting_mask_invert = inpainting_mask_invert
        self.seed = seed
        self.subseed = subseed
        self.all_seeds = None  # the webui's process_images sets it before the scripts' process()


calls = []


def process_images(p):
    """Records the processing object as the webui would receive it and returns its init images."""
    calls.append({"image_mask": p.image_mask, "latent_mask": p.latent_mask, "mask_round": p.mask_round})
    return Processed(p, list(p.init_images), seed=p.seed)


def get_fixed_seed(seed):
    if seed is None or seed == "" or seed == -1:
        return int(random.randrange(4294967294))
    return seed


def fix_seed(p):
    p.seed = get_fixed_seed(p.seed)
    p.subseed = get_fixed_seed(p.subseed)
