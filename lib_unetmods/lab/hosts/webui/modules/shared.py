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
opts = SimpleNamespace(img2img_fix_steps=False, token_merging_ratio=0.0, token_merging_ratio_hr=0.0)
sd_model = None
