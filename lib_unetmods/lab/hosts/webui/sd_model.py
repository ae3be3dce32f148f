"""A stand-in for the WebUI's loaded model: `.model.diffusion_model` is a real ldm UNet; an edit
model (instruct-pix2pix, `edit=True`) takes the image latent as 4 more input channels."""
from types import SimpleNamespace

import torch

from lib_unetmods.lab.random_unets import webui_cat_fix


class FakeSDModel:
    def __init__(self, unet, is_sdxl=False, edit=False):
        self.model = SimpleNamespace(diffusion_model=unet, conditioning_key="hybrid" if edit else "crossattn")
        self.is_sdxl = is_sdxl
        self.cond_stage_key = "edit" if edit else "txt"
        self.context_dim = next(m for n, m in unet.named_modules() if n.endswith("attn2")).to_k.in_features
        self.first_stage_model = None

    def apply_model(self, x, t, cond):
        """ldm's apply_model: the text (SDXL: its crossattn and vector) as context, an edit model's
        image concatenated to x."""
        c = cond["c_crossattn"]
        context, y = (c["crossattn"], c["vector"]) if isinstance(c, dict) else (c, None)
        if self.cond_stage_key == "edit":
            x = torch.cat([x, cond["c_concat"]], dim=1)
        with webui_cat_fix():  # A1111's hijacked th.cat, active while its model is loaded
            return self.model.diffusion_model(x, t, context=context, y=y)

    def decode_first_stage(self, z):
        return z.clone()
