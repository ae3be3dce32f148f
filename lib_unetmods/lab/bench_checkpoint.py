"""--checkpoint: the UNet's weights out of a .safetensors checkpoint, full (SD1.x, SD2.x, SDXL:
UNet under `model.diffusion_model.`, text encoders and VAE beside it) or UNet-only.

The header (JSON, read without torch) tells the architecture before any model is built; only the
UNet's tensors are read afterwards, one at a time, into the UNet built for that architecture.
Pickle checkpoints (.ckpt, .pt, ...) are refused: unpickling can run arbitrary code.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

UNET_PREFIX = "model.diffusion_model."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
MODEL_CHANNELS = {320: "full", 32: "tiny"}  # first conv's width -> the benchmark's --unet-size
SDXL_ADM = 2816  # SDXL base's label embedding input (the refiner's is 2560)


class BenchError(Exception):
    """A bad option or input: reported as one line, exit code 2. Defined here, the benchmark's
    lowest module, so that the reader and the command line (which re-exports it) import one way."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    prefix: str  # "model.diffusion_model." for a full checkpoint, "" for a UNet-only file
    keys: tuple[str, ...]  # UNet keys without the prefix
    arch: str
    size: str
    reason: str  # what in the keys gave the architecture away
    other_keys: int  # text encoder, VAE, ... (not read)


def read_header(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise BenchError(f"--checkpoint {path}: no such file")
    if os.path.isdir(path):
        raise BenchError(f"--checkpoint {path}: is a folder; give the .safetensors file")
    pickle = (f"--checkpoint {path}: a pickle checkpoint (.ckpt/.pt) is refused because loading one can run "
              "arbitrary code; convert it to .safetensors first (e.g. the WebUI's Checkpoint Merger with "
              "safetensors output)")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise BenchError(pickle)
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        try:
            if not 2 <= length <= os.path.getsize(path) - 8:
                raise ValueError
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip, or a bare pickle
                raise BenchError(pickle) from None
            raise BenchError(f"--checkpoint {path}: not a .safetensors file (no valid header)") from None
    if not isinstance(header, dict):
        raise BenchError(f"--checkpoint {path}: not a .safetensors file (header is not a table)")
    header.pop("__metadata__", None)
    return header


def inspect_checkpoint(path: str) -> CheckpointInfo:
    """Architecture and size of the UNet in a .safetensors file, from its key names and shapes."""
    header = read_header(path)
    full = any(k.startswith(UNET_PREFIX) for k in header)
    prefix = UNET_PREFIX if full else ""
    unet = {k[len(prefix):]: v["shape"] for k, v in header.items() if k.startswith(prefix)}
    if "input_blocks.0.0.weight" not in unet:
        hint = " (diffusers-format keys: use the single-file checkpoint)" if any("down_blocks" in k for k in header) else ""
        raise BenchError(f"--checkpoint {path}: no ldm/sgm UNet keys (model.diffusion_model.input_blocks...) "
                         f"found{hint}")
    channels, in_channels = unet["input_blocks.0.0.weight"][:2]
    if in_channels != 4:
        raise BenchError(f"--checkpoint {path}: the UNet takes {in_channels} input channels (inpainting or "
                         "instruct model); the benchmark runs 4-channel text-to-image UNets")
    if channels not in MODEL_CHANNELS:
        raise BenchError(f"--checkpoint {path}: a UNet with {channels} model channels is not an SD1.x/SD2.x/SDXL "
                         f"layout the benchmark builds ({', '.join(map(str, MODEL_CHANNELS))})")
    to_k = next((shape for k, shape in unet.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((shape for k, shape in unet.items() if k.endswith(".proj_in.weight")), None)
    if to_k is None or proj_in is None:
        raise BenchError(f"--checkpoint {path}: the UNet has no cross-attention layers")
    context = to_k[1]
    if "label_emb.0.0.weight" in unet:
        adm = unet["label_emb.0.0.weight"][1]
        if adm != SDXL_ADM:
            raise BenchError(f"--checkpoint {path}: label embedding of width {adm} (SDXL refiner?); the benchmark "
                             f"runs SDXL base UNets (width {SDXL_ADM})")
        arch, reason = "sdxl", f"a label embedding of width {adm}, context {context}"
    elif len(proj_in) == 2:
        arch, reason = "sd21", f"linear proj_in, context {context}"
    else:
        arch, reason = "sd15", f"convolutional proj_in, context {context}"
    return CheckpointInfo(path, prefix, tuple(unet), arch, MODEL_CHANNELS[channels], reason,
                          len(header) - len(unet))


def load_unet_weights(unet: Any, info: CheckpointInfo) -> None:
    """Copy the checkpoint's UNet tensors into `unet` (float32), one tensor at a time."""
    from safetensors import safe_open

    target = unet.state_dict()
    missing = sorted(set(target) - set(info.keys))
    unexpected = sorted(set(info.keys) - set(target))
    if missing or unexpected:
        raise BenchError(f"--checkpoint {info.path}: its {info.arch} UNet keys do not match the benchmark's "
                         f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    with safe_open(info.path, framework="pt", device="cpu") as f:
        for key in info.keys:
            tensor = f.get_tensor(info.prefix + key)
            if tensor.shape != target[key].shape:
                raise BenchError(f"--checkpoint {info.path}: {key} has shape {tuple(tensor.shape)}, the "
                                 f"{info.arch} UNet expects {tuple(target[key].shape)}")
            target[key].copy_(tensor)
