from types import SimpleNamespace


class State:
    def __init__(self):
        self.interrupted = False
        self.skipped = False
        self.sampling_step = 0
        self.sampling_steps = 0

    def interrupt(self):
        self.interrupted = True


state = State()
# the A1111 settings the stand-in follows; LAYOUT_DEFAULTS: Settings > Optimizations / Sampler parameters
LAYOUT_DEFAULTS = dict(batch_cond_uncond=True, pad_cond_uncond=False, pad_cond_uncond_v0=False, s_min_uncond_all=False,
                       skip_early_cond=0.0)
opts = SimpleNamespace(img2img_fix_steps=False, token_merging_ratio=0.0, token_merging_ratio_hr=0.0, **LAYOUT_DEFAULTS)
sd_model = None
