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
from ...families import PROXY
from .models import UNETS, WEIGHTS, Proxy, ProxyConfig, save, to_latent
from ..random_unets import sdpa_attention
from ...schedules import TRAIN_ALPHAS_CUMPROD
from ...unet_map import map_unet
from .shapes import COLOURS, POSITIONS, SHAPES, make_batch


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


class SkipDrop:
    """Training-time skip dropout: for the rows it is given, every skip connection reaches its
    output block as zeros, so those rows' prediction has to come through the middle block.

    Without it a small model on simple data places its object from its first levels alone (the
    first lab model: shrinking its deep features moved its picture by 5e-6); SD's deep path is
    where the layout is decided (what Deep Shrink, FreeU's backbone factors, PAG on the middle
    block and DeepCache rely on). Dropping the skips on part of the noisiest rows, where the
    layout is decided, makes the deep path carry it; the other rows keep the skips' detail."""

    def __init__(self, unet: torch.nn.Module) -> None:
        umap = map_unet(unet)
        self.rows: torch.Tensor | None = None
        self.handles = [block.module.register_forward_pre_hook(self._hook(h_channels))
                        for block, h_channels in zip(umap.outputs, umap.h_channels)]

    def _hook(self, h_channels: int):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
            if self.rows is None or not bool(self.rows.any()):
                return None
            x = args[0]
            keep = torch.ones(x.shape[0], x.shape[1], 1, 1, dtype=x.dtype)
            keep[self.rows, h_channels:] = 0
            return (x * keep, *args[1:])
        return hook


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = torch.Generator().manual_seed(args.seed + 1)
    model = Proxy(ProxyConfig.of(args.model))
    ema = copy.deepcopy(model).requires_grad_(False)
    skip_drop = SkipDrop(model.unet)
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
            skip_drop.rows = (t >= args.skip_drop_from) & (torch.rand(args.batch, generator=data) < args.skip_drop)
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
                                     "skip_drop": args.skip_drop, "skip_drop_from": args.skip_drop_from, "seed": args.seed,
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
    ap.add_argument("--skip-drop", type=float, default=0.5,
                    help="share of the noisiest rows trained with every skip connection zeroed (default: 0.5)")
    ap.add_argument("--skip-drop-from", type=int, default=600, help="rows at this timestep or above are the noisiest (default: 600)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default: 0)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    ap.add_argument("--log-every", type=int, default=50, help="print the mean loss every N steps (default: 50)")
    ap.add_argument("--save-every", type=int, default=250, help="write the weights every N steps (default: 250)")
    ap.add_argument("--out", default="", help="weights file (default: the shipped one of --model, in lab/weights/)")
    args = ap.parse_args(argv)
    args.out = args.out or WEIGHTS[args.model]
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
