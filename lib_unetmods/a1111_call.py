"""What A1111's `CFGDenoiser.forward` (modules/sd_samplers_cfg_denoiser.py, 1.10) does with one
model evaluation, read from its cfg_denoiser callback (`host.on_cfg_denoiser`): the rows it stacks,
the ones it drops, how its UNet calls split them, and each row's weight in its combine.

- Rows: each image's cond rows, one per AND part (`repeats` may differ per image: Dynamic Prompts,
  regional prompting), image by image, then one uncond row per image; an edit model
  (instruct-pix2pix, image CFG != 1) stacks cond, image-only and uncond groups.
- Dropped: the uncond rows, on the steps where "Ignore negative prompt during early sampling"
  (`skip_early_cond`) or "Negative Guidance minimum sigma" (`s_min_uncond`) applies; the image's
  first cond row then stands in for its uncond at CFG scale 1.
- Calls: one call with every row ("Batch cond/uncond" on), or chunks of batch-size rows (off);
  prompt and negative prompt of different token counts (not padded): cond chunks (2 x batch size
  rows with the option on), then one call with the uncond rows.
- Combine: uncond + s * sum_k w_k (cond_k - uncond), s = cond_scale * cond_scale_miltiplier; the
  edit model: uncond + s (cond - image) + image_cfg (image - uncond).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .rows import COND, IMAGE, UNCOND, Evaluation, Row


@dataclass(frozen=True)
class Layout:
    """The settings and conditions that shape an evaluation's calls."""

    batch_cond_uncond: bool = True  # Settings > Optimizations > "Batch cond/uncond"
    equal_lengths: bool = True  # prompt and negative prompt have the same token count (or are padded to it)
    skip_uncond: bool = False  # the uncond rows are dropped on this evaluation
    edit: bool = False  # an edit model's three row groups


def evaluation(parts: Sequence[Sequence[float]], cfg_scale: float, latents: torch.Tensor | None = None,
               layout: Layout = Layout(), image_cfg_scale: float | None = None) -> Evaluation | None:
    """The evaluation of images whose prompts have these AND weights (one list per image); None
    where A1111 itself cannot run the layout (an edit model with AND, uneven lengths or dropped rows)."""
    images = len(parts)
    s = float(cfg_scale)
    if layout.edit:
        if layout.skip_uncond or not layout.equal_lengths or any(len(w) != 1 for w in parts):
            return None
        icfg = float(image_cfg_scale if image_cfg_scale is not None else 1.0)
        rows = ([Row(COND, i, 0, w[0], s) for i, w in enumerate(parts)]
                + [Row(IMAGE, i, coef=icfg - s) for i in range(images)] + [Row(UNCOND, i, coef=1 - icfg) for i in range(images)])
    elif layout.skip_uncond:  # combined at scale 1 against the image's first cond row
        rows = [Row(COND, i, k, w, w + (1 - sum(weights) if k == 0 else 0.0))
                for i, weights in enumerate(parts) for k, w in enumerate(weights)]
        rows += [Row(UNCOND, i, coef=0.0, dropped=True) for i in range(images)]
    else:
        rows = [Row(COND, i, k, w, s * w) for i, weights in enumerate(parts) for k, w in enumerate(weights)]
        rows += [Row(UNCOND, i, coef=1 - s * sum(weights)) for i, weights in enumerate(parts)]
    return Evaluation(rows, latents, calls=call_sizes(sum(map(len, parts)), images, layout))


def call_sizes(cond_rows: int, images: int, layout: Layout) -> list[int]:
    """The row count of each UNet call, in order."""
    if layout.equal_lengths or layout.skip_uncond:
        rows = cond_rows + (0 if layout.skip_uncond else images * (2 if layout.edit else 1))
        chunk = rows if layout.batch_cond_uncond else images
        return [min(chunk, rows - a) for a in range(0, rows, chunk)]
    chunk = images * 2 if layout.batch_cond_uncond else images
    return [min(chunk, cond_rows - a) for a in range(0, cond_rows, chunk)] + [images]


def skips_uncond(step: int, total_steps: int | None, sigma: float, s_min_uncond: float, opts: Any, edit: bool) -> bool:
    """A1111's rule for dropping the uncond rows of this evaluation (`step`: the denoiser's count)."""
    early = float(getattr(opts, "skip_early_cond", 0.0) or 0.0)
    if early != 0 and total_steps and step / total_steps <= early:
        return True
    every = step % 2 or bool(getattr(opts, "s_min_uncond_all", False))
    return bool(every and s_min_uncond > 0 and sigma < s_min_uncond and not edit)


def _tokens(cond: Any) -> int:
    tensor = cond["crossattn"] if isinstance(cond, dict) else cond
    return int(tensor.shape[1])


def evaluation_from(params: Any, opts: Any) -> Evaluation | None:
    """The evaluation A1111's CFGDenoiser announces with its cfg_denoiser callback (params:
    CFGDenoiserParams: x = its stacked rows, text_cond / text_uncond, sigma per row, and the
    denoiser, whose sampler holds the prompts' AND weights); None where a piece is missing."""
    denoiser = getattr(params, "denoiser", None)
    extra = getattr(getattr(denoiser, "sampler", None), "sampler_extra_args", None) or {}
    batch = getattr(extra.get("cond"), "batch", None)
    if not batch or params.text_uncond is None:
        return None
    parts = [[float(c.weight) for c in prompt] for prompt in batch]
    images, cond_rows = len(parts), sum(map(len, parts))
    image_cfg = getattr(denoiser, "image_cfg_scale", None)
    sd_model = getattr(getattr(denoiser, "p", None), "sd_model", None)
    edit = getattr(sd_model, "cond_stage_key", None) == "edit" and image_cfg is not None and image_cfg != 1.0
    x = params.x
    if x.shape[0] != cond_rows + images * (2 if edit else 1):
        return None
    sigma = params.sigma
    skip = skips_uncond(int(getattr(denoiser, "step", 0)), getattr(denoiser, "total_steps", None),
                        float(sigma.reshape(-1)[0]) if hasattr(sigma, "reshape") else float(sigma),
                        float(extra.get("s_min_uncond") or 0.0), opts, edit)
    padded = bool(getattr(opts, "pad_cond_uncond_v0", False) or getattr(opts, "pad_cond_uncond", False))
    layout = Layout(bool(getattr(opts, "batch_cond_uncond", True)),
                    padded or _tokens(params.text_cond) == _tokens(params.text_uncond), skip, edit)
    scale = float(extra.get("cond_scale", 1.0)) * float(getattr(denoiser, "cond_scale_miltiplier", 1.0))
    return evaluation(parts, scale, x[cond_rows:cond_rows + images], layout, image_cfg)
