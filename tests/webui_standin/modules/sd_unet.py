"""Stand-in of modules/sd_unet.py: the active custom UNet (TensorRT and similar), None when none."""

current_unet = None
