"""Stand-in for modules.processing and the k-diffusion sampler path of A1111 1.10 (and Forge's
double process_before_every_sampling in the hires pass): the same hook order, batch count,
hires second pass, img2img step scaling, the per-step sampler callback, interruption and
exceptions, and the CFG denoiser (modules/sd_samplers_cfg_denoiser.py) calling the UNet as the real
one does: each image's AND parts (counts and weights per image: `prompt_weights`), then the uncond
rows, in one call, or in chunks of batch-size rows with Settings > "Batch cond/uncond" off
(`opts.batch_cond_uncond`); prompt and negative prompt of different token counts (`uncond_tokens`)
as cond chunks and one uncond call, unless padded (`opts.pad_cond_uncond`); the uncond rows
dropped by "Negative Guidance minimum sigma" (`s_min_uncond`, `opts.s_min_uncond_all`) and "Ignore
negative prompt during early sampling" (`opts.skip_early_cond`); an edit model's cond, image and
uncond rows (`cond_stage_key == "edit"`, `image_cfg_scale`); the cfg_denoiser callback before."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lib_unetmods.lab.sampler import sd_sigmas, sigma_to_t
from modules import prompt_parser, script_callbacks
from modules.shared import opts, state


class InterruptedException(BaseException):
    pass


def catenate(conds: list[Any]) -> Any:
    if isinstance(conds[0], dict):
        return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
    return torch.cat(conds)


def rows_of(cond: Any, a: int, b: int) -> Any:
    return {key: v[a:b] for key, v in cond.items()} if isinstance(cond, dict) else cond[a:b]


def tokens(cond: Any) -> int:
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[1]


def pad_to(cond: Any, length: int) -> Any:
    """The shorter prompt padded with the empty prompt's tokens (here zeros) to `length`."""
    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(t.shape[0], length - t.shape[1], t.shape[2])], 1)
    return {**cond, "crossattn": pad(cond["crossattn"])} if isinstance(cond, dict) else pad(cond)


class CFGDenoiser:
    """forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond) -> the guided denoised latent."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.p: Any = None
        self.step = 0  # model evaluations so far in this pass
        self.total_steps = 1
        self.image_cfg_scale: float | None = None
        self.cond_scale_miltiplier = 1.0
        self.init_latent: torch.Tensor | None = None

    def inner_model(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """k-diffusion's eps denoiser around the model: x - sigma * eps(x * c_in, t(sigma))."""
        s = sigma.view(-1, 1, 1, 1)
        t = torch.tensor([sigma_to_t(float(v)) for v in sigma], device=x.device)
        return x - s * self.p.sd_model.apply_model(x / (s ** 2 + 1) ** 0.5, t, cond)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, uncond: Any, cond: Any, cond_scale: float,
                 s_min_uncond: float, image_cond: torch.Tensor) -> torch.Tensor:
        if state.interrupted or state.skipped:
            raise InterruptedException
        model = self.p.sd_model
        edit = model.cond_stage_key == "edit" and self.image_cfg_scale is not None and self.image_cfg_scale != 1.0
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        batch = len(conds_list)
        repeats = [len(parts) for parts in conds_list]
        per_row = lambda v: torch.cat([v[i:i + 1].expand(n, *v.shape[1:]) for i, n in enumerate(repeats)])  # noqa: E731
        groups = 3 if edit else 2
        x_in = torch.cat([per_row(x)] + [x] * (groups - 1))
        sigma_in = torch.cat([per_row(sigma)] + [sigma] * (groups - 1))
        image_cond_in = torch.cat([per_row(image_cond), image_cond] + ([torch.zeros_like(self.init_latent)] if edit else []))
        params = script_callbacks.CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps,
                                                    tensor, uncond, self)
        script_callbacks.cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in, tensor, uncond = params.x, params.image_cond, params.sigma, params.text_cond, params.text_uncond
        skip_uncond = False
        if opts.skip_early_cond != 0 and self.step / self.total_steps <= opts.skip_early_cond:
            skip_uncond = True
        elif (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond and not edit:
            skip_uncond = True
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch], sigma_in[:-batch]
        if opts.pad_cond_uncond and tokens(tensor) != tokens(uncond):
            longest = max(tokens(tensor), tokens(uncond))
            tensor, uncond = pad_to(tensor, longest), pad_to(uncond, longest)
        call = lambda a, b, c: self.inner_model(x_in[a:b], sigma_in[a:b], {"c_crossattn": c, "c_concat": image_cond_in[a:b]})  # noqa: E731
        x_out = torch.zeros_like(x_in)
        if tokens(tensor) == tokens(uncond) or skip_uncond:
            cond_in = tensor if skip_uncond else catenate([tensor] + [uncond] * (groups - 1))
            chunk = x_in.shape[0] if opts.batch_cond_uncond else batch
            for a in range(0, x_in.shape[0], chunk):
                x_out[a:a + chunk] = call(a, a + chunk, rows_of(cond_in, a, a + chunk))
        else:
            chunk = 2 * batch if opts.batch_cond_uncond else batch
            rows = x_in.shape[0] - batch
            for a in range(0, rows, chunk):
                b = min(a + chunk, rows)
                x_out[a:b] = call(a, b, rows_of(tensor, a, b))
            x_out[-batch:] = call(rows, rows + batch, uncond)
        first_rows = [parts[0][0] for parts in conds_list]
        if skip_uncond:  # the image's first cond row stands in for its uncond
            x_out = torch.cat([x_out, x_out[first_rows]])
        self.step += 1
        scale = cond_scale * self.cond_scale_miltiplier
        if edit:
            out_cond, out_image, out_uncond = x_out.chunk(3)
            return out_uncond + scale * (out_cond - out_image) + self.image_cfg_scale * (out_image - out_uncond)
        denoised = x_out[-batch:].clone()
        for i, parts in enumerate(conds_list):
            for row, weight in parts:
                denoised[i] += (x_out[row] - x_out[-batch:][i]) * (weight * (1.0 if skip_uncond else scale))
        return denoised


class KDiffusionSampler:
    def __init__(self, sd_model: Any, second_order: bool = False) -> None:
        self.model_wrap_cfg = CFGDenoiser(self)
        self.second_order = second_order
        self.last_latent = None
        self.sampler_extra_args: dict[str, Any] = {}

    def callback_state(self, d: dict[str, Any]) -> None:
        state.sampling_step = d["i"]

    def initialize(self, p: Any, steps: int) -> None:
        wrap = self.model_wrap_cfg
        wrap.p, wrap.step, wrap.image_cfg_scale = p, 0, getattr(p, "image_cfg_scale", None)
        wrap.total_steps = steps * (2 if self.second_order else 1)

    def _loop(self, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        state.sampling_steps, state.sampling_step = len(sigmas) - 1, 0
        callback = self.callback_state  # looked up when sampling starts, as k-diffusion gets it
        model = lambda x, s: self.model_wrap_cfg(x, torch.full((x.shape[0],), s), **self.sampler_extra_args)  # noqa: E731
        try:
            for i in range(len(sigmas) - 1):
                s, s_next = float(sigmas[i]), float(sigmas[i + 1])
                d = (x - model(x, s)) / s
                if self.second_order and s_next > 0:  # Heun: a second model call in the same step
                    x2 = x + d * (s_next - s)
                    d = (d + (x2 - model(x2, s_next)) / s_next) / 2
                x = x + d * (s_next - s)
                self.last_latent = x
                callback({"i": i, "x": x})
        except InterruptedException:
            return self.last_latent if self.last_latent is not None else x
        return x

    def _sample(self, p: Any, x: torch.Tensor, sigmas: torch.Tensor, c: Any, uc: Any, image_cond: torch.Tensor) -> torch.Tensor:
        self.initialize(p, len(sigmas) - 1)
        self.sampler_extra_args = {"cond": c, "image_cond": image_cond, "uncond": uc, "cond_scale": p.cfg_scale,
                                   "s_min_uncond": p.s_min_uncond}
        return self._loop(x, sigmas)

    def sample(self, p: Any, x: torch.Tensor, c: Any, uc: Any, image_cond: torch.Tensor) -> torch.Tensor:
        sigmas = sd_sigmas(p.steps)
        return self._sample(p, x * sigmas[0], sigmas, c, uc, image_cond)

    def sample_img2img(self, p: Any, x: torch.Tensor, noise: torch.Tensor, c: Any, uc: Any, steps: int,
                       image_cond: torch.Tensor) -> torch.Tensor:
        sigmas = sd_sigmas(p.steps)[-(steps + 1):]
        self.model_wrap_cfg.init_latent = x
        return self._sample(p, x + noise * sigmas[0], sigmas, c, uc, image_cond)


def img2img_steps(p: Any) -> int:
    """k-diffusion runs t_enc + 1 steps (sd_samplers_common.setup_img2img_steps)."""
    return p.steps if opts.img2img_fix_steps else int(min(p.denoising_strength, 0.999) * p.steps) + 1


@dataclass
class Processed:
    images: list[torch.Tensor]
    infotexts: list[str]


class StableDiffusionProcessing:
    def __init__(self, sd_model: Any, scripts: Any, script_args: list[Any], steps: int = 4, batch_size: int = 1,
                 n_iter: int = 1, width: int = 128, height: int = 128, seed: int = 1, second_order: bool = False,
                 cfg_scale: float = 7.0, prompt_weights: list[list[float]] | None = None, uncond_tokens: int = 7,
                 s_min_uncond: float = 0.0, image_cfg_scale: float | None = None) -> None:
        self.sd_model, self.scripts, self.script_args = sd_model, scripts, list(script_args)
        self.steps, self.batch_size, self.n_iter = steps, batch_size, n_iter
        self.width, self.height, self.seed = width, height, seed
        self.second_order, self.cfg_scale, self.image_cfg_scale = second_order, cfg_scale, image_cfg_scale
        self.prompt_weights = prompt_weights or [[1.0]] * batch_size  # per image, the weight of each AND part
        self.uncond_tokens, self.s_min_uncond = uncond_tokens, s_min_uncond
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

    def conds(self) -> tuple[prompt_parser.MulticondLearnedConditioning, Any]:
        """Each image's prompt as its AND parts (7 tokens each), and the negative prompts."""
        g = torch.Generator().manual_seed(1234)
        dim, sdxl = self.sd_model.context_dim, self.sd_model.is_sdxl

        def prompt(tokens: int) -> Any:
            c = torch.randn(tokens, dim, generator=g)
            return {"crossattn": c, "vector": torch.randn(2816, generator=g)} if sdxl else c

        c = prompt_parser.MulticondLearnedConditioning((self.batch_size,), [
            [prompt_parser.ComposableScheduledPromptConditioning(prompt(7), w) for w in weights] for weights in self.prompt_weights])
        return c, prompt_parser.stack([prompt(self.uncond_tokens) for _ in range(self.batch_size)])

    def image_conditioning(self, x: torch.Tensor) -> torch.Tensor:
        """An edit model's image (the init latent); other models get A1111's dummy zeros."""
        init = getattr(self, "init_latent", None)
        return init.expand_as(x) if self.sd_model.cond_stage_key == "edit" and init is not None else x.new_zeros(x.shape[0], 5, 1, 1)


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, *args: Any, enable_hr: bool = False, hr_scale: float = 1.5, hr_second_pass_steps: int = 0,
                 denoising_strength: float = 0.7, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.enable_hr, self.hr_scale = enable_hr, hr_scale
        self.hr_second_pass_steps, self.denoising_strength = hr_second_pass_steps, denoising_strength

    def sample(self, c: Any, uc: Any) -> torch.Tensor:
        self.sampler = KDiffusionSampler(self.sd_model, self.second_order)
        x = self.noise(self.height // 8, self.width // 8)
        self.scripts.process_before_every_sampling(self, x=x, noise=x, c=c, uc=uc)
        samples = self.sampler.sample(self, x, c, uc, self.image_conditioning(x))
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
        samples = self.sampler.sample_img2img(self, samples, noise, c, uc, self.steps, self.image_conditioning(samples))
        self.steps = saved  # hires runs exactly these
        self.is_hr_pass = False
        return samples


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, *args: Any, init_latent: torch.Tensor, denoising_strength: float = 0.75, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.init_images = [init_latent]
        self.init_latent, self.denoising_strength = init_latent, denoising_strength

    def sample(self, c: Any, uc: Any) -> torch.Tensor:
        self.sampler = KDiffusionSampler(self.sd_model, self.second_order)
        x = self.init_latent.expand(self.batch_size, -1, -1, -1)
        noise = self.noise(*x.shape[2:])
        self.scripts.process_before_every_sampling(self, x=x, noise=noise, c=c, uc=uc)
        return self.sampler.sample_img2img(self, x, noise, c, uc, img2img_steps(self), self.image_conditioning(x))


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
    c, uc = p.conds()
    for n in range(p.n_iter):
        if state.interrupted:
            break
        p.iteration = n
        p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
        samples = p.sample(c, uc)  # an exception here propagates: no postprocess hooks run
        decoded = p.sd_model.decode_first_stage(samples)
        p.scripts.postprocess_batch(p, images=decoded, batch_number=n)
        images.append(decoded)
        infotexts.append(create_infotext(p))
        state.skipped = False
    processed = Processed(images, infotexts)
    p.scripts.postprocess(p, processed)
    return processed
