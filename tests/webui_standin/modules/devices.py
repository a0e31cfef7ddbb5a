"""Stand-in of modules/devices.py: the compute device and the dtypes the webui set when it loaded the model."""

import torch

cpu = torch.device("cpu")
device = cpu  # the webui sets it at start-up (get_optimal_device); None before
dtype = torch.float32
dtype_vae = torch.float32  # float32 under --no-half-vae while the UNet is half
dtype_unet = torch.float32
