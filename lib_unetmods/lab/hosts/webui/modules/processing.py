"""Stand-in for modules.processing and the k-diffusion sampler path of A1111 1.10 (and Forge's
double process_before_every_sampling in the hires pass): the same hook order, batch count,
hires second pass, img2img step scaling, cond-then-uncond CFG batches, the per-model-call
cfg_denoiser callback, the per-step sampler callback, interruption and exceptions."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lib_unetmods.lab.sampler import sd_sigmas, sigma_to_t
from modules import script_callbacks
from modules.shared import opts, state


class InterruptedException(BaseException):
    pass


class CFGDenoiser:
    def __init__(self, model: Any, cfg_scale: float) -> None:
        self.model, self.cfg_scale, self.step = model, cfg_scale, 0

    def __call__(self, x: torch.Tensor, sigma: float, c: torch.Tensor, uc: torch.Tensor, y: Any) -> torch.Tensor:
        if state.interrupted or state.skipped:
            raise InterruptedException
        batch = x.shape[0]
        x_in = torch.cat([x, x])  # cond rows, then uncond rows
        sigma_in = torch.full((2 * batch,), sigma)
        params = script_callbacks.CFGDenoiserParams(x_in, None, sigma_in, state.sampling_step, state.sampling_steps, c, uc)
        script_callbacks.cfg_denoiser_callback(params)
        x_in = params.x
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        t = torch.full((x_in.shape[0],), sigma_to_t(sigma))
        eps = self.model.apply_model(x_in * c_in, t, torch.cat([c, uc]), None if y is None else torch.cat([y, y]))
        self.step += 1
        eps_c, eps_u = eps[:batch], eps[batch:]
        return eps_u + self.cfg_scale * (eps_c - eps_u)  # the derivative (x - denoised) / sigma


class KDiffusionSampler:
    def __init__(self, sd_model: Any, second_order: bool = False) -> None:
        self.model_wrap_cfg = CFGDenoiser(sd_model, 7.0)
        self.second_order = second_order
        self.last_latent = None

    def callback_state(self, d: dict[str, Any]) -> None:
        state.sampling_step = d["i"]

    def _loop(self, x: torch.Tensor, sigmas: torch.Tensor, c: Any, uc: Any, y: Any) -> torch.Tensor:
        state.sampling_steps, state.sampling_step = len(sigmas) - 1, 0
        callback = self.callback_state  # looked up when sampling starts, as k-diffusion gets it
        try:
            for i in range(len(sigmas) - 1):
                s, s_next = float(sigmas[i]), float(sigmas[i + 1])
                d = self.model_wrap_cfg(x, s, c, uc, y)
                if self.second_order and s_next > 0:  # Heun: a second model call in the same step
                    d = (d + self.model_wrap_cfg(x + d * (s_next - s), s_next, c, uc, y)) / 2
                x = x + d * (s_next - s)
                self.last_latent = x
                callback({"i": i, "x": x})
        except InterruptedException:
            return self.last_latent if self.last_latent is not None else x
        return x

    def sample(self, p: Any, x: torch.Tensor, c: Any, uc: Any, y: Any = None) -> torch.Tensor:
        sigmas = sd_sigmas(p.steps)
        return self._loop(x * sigmas[0], sigmas, c, uc, y)

    def sample_img2img(self, p: Any, x: torch.Tensor, noise: torch.Tensor, c: Any, uc: Any, steps: int, y: Any = None) -> torch.Tensor:
        sigmas = sd_sigmas(p.steps)[-(steps + 1):]
        return self._loop(x + noise * sigmas[0], sigmas, c, uc, y)


def img2img_steps(p: Any) -> int:
    """k-diffusion runs t_enc + 1 steps (sd_samplers_common.setup_img2img_steps)."""
    return p.steps if opts.img2img_fix_steps else int(min(p.denoising_strength, 0.999) * p.steps) + 1


@dataclass
class Processed:
    images: list[torch.Tensor]
    infotexts: list[str]


class StableDiffusionProcessing:
    def __init__(self, sd_model: Any, scripts: Any, script_args: list[Any], steps: int = 4, batch_size: int = 1,
                 n_iter: int = 1, width: int = 128, height: int = 128, seed: int = 1, second_order: bool = False) -> None:
        self.sd_model, self.scripts, self.script_args = sd_model, scripts, list(script_args)
        self.steps, self.batch_size, self.n_iter = steps, batch_size, n_iter
        self.width, self.height, self.seed = width, height, seed
        self.second_order = second_order
        self.extra_generation_params: dict[str, Any] = {}
        self.comments: dict[str, int] = {}
        self.is_hr_pass = False
        self.iteration = 0

    def comment(self, text: str) -> None:
        self.comments[text] = 1

    def get_token_merging_ratio(self, for_hr: bool = False) -> float:
        return opts.token_merging_ratio_hr if for_hr else opts.token_merging_ratio

    def noise(self, h: int, w: int) -> torch.Tensor:
        return torch.cat([torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(s)) for s in self.seeds])

    def conds(self) -> tuple[Any, Any, Any]:
        g = torch.Generator().manual_seed(1234)
        dim = self.sd_model.context_dim
        c = torch.randn(self.batch_size, 7, dim, generator=g)
        uc = torch.randn(self.batch_size, 7, dim, generator=g)
        y = torch.randn(self.batch_size, 2816, generator=g) if self.sd_model.is_sdxl else None
        return c, uc, y


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, *args: Any, enable_hr: bool = False, hr_scale: float = 1.5, hr_second_pass_steps: int = 0,
                 denoising_strength: float = 0.7, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.enable_hr, self.hr_scale = enable_hr, hr_scale
        self.hr_second_pass_steps, self.denoising_strength = hr_second_pass_steps, denoising_strength

    def sample(self, c: Any, uc: Any, y: Any) -> torch.Tensor:
        self.sampler = KDiffusionSampler(self.sd_model, self.second_order)
        x = self.noise(self.height // 8, self.width // 8)
        self.scripts.process_before_every_sampling(self, x=x, noise=x, c=c, uc=uc)
        samples = self.sampler.sample(self, x, c, uc, y)
        if not self.enable_hr or state.interrupted:
            return samples
        self.is_hr_pass = True
        size = (int(self.height * self.hr_scale) // 8, int(self.width * self.hr_scale) // 8)
        samples = F.interpolate(samples, size, mode="nearest")
        self.sampler = KDiffusionSampler(self.sd_model, self.second_order)
        noise = self.noise(*size)
        for _ in range(2 if self.scripts.forge else 1):  # current Forge calls it twice here
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=c, uc=uc)
        saved, self.steps = self.steps, self.hr_second_pass_steps or self.steps
        samples = self.sampler.sample_img2img(self, samples, noise, c, uc, self.steps, y)  # hires runs exactly these
        self.steps = saved
        self.is_hr_pass = False
        return samples


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, *args: Any, init_latent: torch.Tensor, denoising_strength: float = 0.75, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.init_images = [init_latent]
        self.init_latent, self.denoising_strength = init_latent, denoising_strength

    def sample(self, c: Any, uc: Any, y: Any) -> torch.Tensor:
        self.sampler = KDiffusionSampler(self.sd_model, self.second_order)
        x = self.init_latent.expand(self.batch_size, -1, -1, -1)
        noise = self.noise(*x.shape[2:])
        self.scripts.process_before_every_sampling(self, x=x, noise=noise, c=c, uc=uc)
        return self.sampler.sample_img2img(self, x, noise, c, uc, img2img_steps(self), y)


def quote(text: Any) -> str:
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def create_infotext(p: Any) -> str:
    params = {"Steps": p.steps, "Seed": p.seed, "Size": f"{p.width}x{p.height}", **p.extra_generation_params}
    return ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)


def process_images(p: Any) -> Processed:
    p.scripts.before_process(p)
    p.all_seeds = [p.seed + i for i in range(p.batch_size * p.n_iter)]
    p.scripts.process(p)
    images, infotexts = [], []
    c, uc, y = p.conds()
    for n in range(p.n_iter):
        if state.interrupted:
            break
        p.iteration = n
        p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
        samples = p.sample(c, uc, y)  # an exception here propagates: no postprocess hooks run
        decoded = p.sd_model.decode_first_stage(samples)
        p.scripts.postprocess_batch(p, images=decoded, batch_number=n)
        images.append(decoded)
        infotexts.append(create_infotext(p))
        state.skipped = False
    processed = Processed(images, infotexts)
    p.scripts.postprocess(p, processed)
    return processed
