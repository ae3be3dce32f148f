"""A stand-in for the WebUI's loaded model: `.model.diffusion_model` is a real ldm UNet."""
from types import SimpleNamespace

from lib_unetmods.lab.random_unets import webui_cat_fix


class FakeSDModel:
    def __init__(self, unet, is_sdxl=False):
        self.model = SimpleNamespace(diffusion_model=unet)
        self.is_sdxl = is_sdxl
        self.context_dim = next(m for n, m in unet.named_modules() if n.endswith("attn2")).to_k.in_features
        self.first_stage_model = None

    def apply_model(self, x, t, context, y):
        with webui_cat_fix():  # A1111's hijacked th.cat, active while its model is loaded
            return self.model.diffusion_model(x, t, context=context, y=y)

    def decode_first_stage(self, z):
        return z.clone()
