"""Train one of the quality lab's proxy models from nothing (CPU, one thread by default):

    python -m lib_unetmods.lab.quality.train --model proxy --steps 5000      # the SD1-layout model
    python -m lib_unetmods.lab.quality.train --model proxy_xl --steps 5000   # the SDXL-layout model

v-prediction on SD's scaled-linear schedule (1000 steps, betas 0.00085..0.012); AdamW with a linear
warm-up and a cosine decay; an EMA of the weights is what is saved (fp16). Every batch is drawn
fresh from lab/shapes.py with a seeded generator, so the same command, seed and thread count give
the same weights. Prints the loss curve, the time per step and the time left; writes a checkpoint
every --save-every steps (same file, so an interrupted run still leaves usable weights).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch

from ..progress import fmt_time
from ...families import PROXY, PROXY_XL
from .models import UNETS, WEIGHTS, Proxy, ProxyConfig, save, to_latent
from ..random_unets import sdpa_attention
from ...schedules import TRAIN_ALPHAS_CUMPROD
from ...unet_map import map_unet
from .shapes import COLOURS, POSITIONS, SHAPES, make_batch


SWAP_PROMPT_LEVELS = {PROXY: 2, PROXY_XL: 0}  # see SkipSwap


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy x_t, v) for clean x0: x_t = sqrt(a) x0 + sqrt(1-a) eps, v = sqrt(a) eps - sqrt(1-a) x0."""
    a = alpha_bar.sqrt()[:, None, None, None]
    s = (1 - alpha_bar).sqrt()[:, None, None, None]
    return a * x0 + s * noise, a * noise - s * x0


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class SkipSwap:
    """Training-time skip swap: for the rows it is given, every skip connection reaches its output
    block from another image of the batch (the next row's), so the layout those rows are asked
    for can only come through the middle block: the decoder learns to take the layout from the
    deep path at the noise levels where it is decided, and the detail from the skips.

    Without it a small model on simple data places its object from its first levels alone (the
    first lab model: shrinking its deep features moved its picture by 5e-6), while SD decides the
    layout in its deep path (what Deep Shrink, FreeU's backbone factors, PAG on the middle block
    and DeepCache rely on). Zeroed skips were tried first: the decoder learned to tell them apart
    and ignored the deep path whenever real skips came (the SD1-layout model's picture moved by
    4e-5 with the middle block's output zeroed); a swapped skip looks like any other.

    With `prompt_levels` > 0 the decoder's blocks at levels below it also get the other image's
    prompt: the SD1-layout model, whose first two levels have attention of their own, otherwise
    learned to redraw the layout there from the prompt and ignore the deep path all the same."""

    def __init__(self, unet: torch.nn.Module, prompt_levels: int = 0) -> None:
        umap = map_unet(unet)
        self.rows: torch.Tensor | None = None
        self.handles = [block.module.register_forward_pre_hook(self._hook(h_channels, block.level_out < prompt_levels))
                        for block, h_channels in zip(umap.outputs, umap.h_channels)]

    def _hook(self, h_channels: int, prompt: bool):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
            if self.rows is None or not bool(self.rows.any()):
                return None
            x, emb, context = args
            h, skip = x[:, :h_channels], x[:, h_channels:]
            skip = swap(skip, self.rows)
            return torch.cat([h, skip], dim=1), emb, swap(context, self.rows) if prompt else context
        return hook


def swap(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Row i of `rows` gets row i-1's value: another image (at another noise level)."""
    return torch.where(rows.view(-1, *[1] * (x.ndim - 1)), x.roll(1, dims=0), x)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = torch.Generator().manual_seed(args.seed + 1)
    model = Proxy(ProxyConfig.of(args.model))
    ema = copy.deepcopy(model).requires_grad_(False)
    skip_swap = SkipSwap(model.unet, args.swap_prompt_levels)
    config = model.config
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    alphas = TRAIN_ALPHAS_CUMPROD.float()
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    started = time.monotonic()
    print(f"training {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {args.steps} steps "
          f"of batch {args.batch}, {args.threads} thread(s), seed {args.seed}", flush=True)
    with sdpa_attention():
        for step in range(args.steps):
            batch = make_batch(args.batch, config.train_size, data)
            x0 = to_latent(batch.images, config)
            noise = torch.randn(x0.shape, generator=data)
            t = torch.randint(0, 1000, (args.batch,), generator=data)
            drop = torch.rand(args.batch, generator=data) < args.uncond
            shape = torch.where(drop, len(SHAPES), batch.shape)
            colour = torch.where(drop, len(COLOURS), batch.colour)
            position = torch.where(drop, len(POSITIONS), batch.position)
            skip_swap.rows = (t >= args.skip_swap_from) & (torch.rand(args.batch, generator=data) < args.skip_swap)
            xt, v = v_target(x0, noise, alphas[t])
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
            context = model.cond(shape, colour, position)
            pred = model.unet(xt, t.float(), context=context, y=model.y(context))
            loss = torch.nn.functional.mse_loss(pred, v)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            with torch.no_grad():
                decay = min(args.ema, (step + 1) / (step + 10))
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - decay)
            window.append(loss.item())
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                mean = sum(window) / len(window)
                window.clear()
                curve.append((done, round(mean, 5)))
                spent = time.monotonic() - started
                print(f"step {done}/{args.steps}  loss {mean:.4f}  lr {optimiser.param_groups[0]['lr']:.2e}  "
                      f"{spent / done:.2f} s/step  elapsed {fmt_time(spent)}  left {fmt_time(spent / done * (args.steps - done))}",
                      flush=True)
            if done % args.save_every == 0 or done == args.steps:
                meta = {"training": {"steps": done, "planned_steps": args.steps, "batch": args.batch, "lr": args.lr,
                                     "warmup": args.warmup, "ema": args.ema, "uncond": args.uncond,
                                     "skip_swap": args.skip_swap, "skip_swap_from": args.skip_swap_from,
                                     "swap_prompt_levels": args.swap_prompt_levels, "seed": args.seed,
                                     "threads": args.threads, "seconds": round(time.monotonic() - started),
                                     "final_loss": curve[-1][1] if curve else None, "loss_curve": curve}}
                save(ema, args.out, meta)
    print(f"saved {args.out} after {fmt_time(time.monotonic() - started)}; final loss {curve[-1][1]:.4f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib_unetmods.lab.quality.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(UNETS), default=PROXY, help="which proxy: its family id (default: proxy)")
    ap.add_argument("--steps", type=int, default=5000, help="optimiser steps (default: 5000)")
    ap.add_argument("--batch", type=int, default=32, help="images per step (default: 32)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    ap.add_argument("--warmup", type=int, default=200, help="warm-up steps (default: 200)")
    ap.add_argument("--ema", type=float, default=0.998, help="EMA decay of the saved weights (default: 0.998)")
    ap.add_argument("--uncond", type=float, default=0.1, help="share of unconditional rows, for CFG (default: 0.1)")
    ap.add_argument("--skip-swap", type=float, default=0.7,
                    help="share of the noisiest rows trained with every skip from another image (default: 0.7)")
    ap.add_argument("--skip-swap-from", type=int, default=500, help="rows at this timestep or above are the noisiest (default: 500)")
    ap.add_argument("--swap-prompt-levels", type=int, default=None,
                    help="the decoder's blocks below this level also get the other image's prompt in swapped rows "
                         "(default: 2 for proxy, 0 for proxy_xl)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default: 0)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    ap.add_argument("--log-every", type=int, default=50, help="print the mean loss every N steps (default: 50)")
    ap.add_argument("--save-every", type=int, default=250, help="write the weights every N steps (default: 250)")
    ap.add_argument("--out", default="", help="weights file (default: the shipped one of --model, in lab/quality/weights/)")
    args = ap.parse_args(argv)
    args.out = args.out or WEIGHTS[args.model]
    if args.swap_prompt_levels is None:
        args.swap_prompt_levels = SWAP_PROMPT_LEVELS[args.model]
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
