def efficientnet_v2_s(*args, **kwargs):
    raise RuntimeError("torchvision test stand-in: EfficientNet (Stable Cascade) is not available")
