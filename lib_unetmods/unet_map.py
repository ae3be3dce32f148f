"""UNet introspection by duck typing: ldm SD1/SD2, sgm SDXL and Forge's UNets share the layout
(`input_blocks`, `middle_block`, `output_blocks`, `out`), so nothing here imports a host class."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .families import SD1, SD2, SDXL, SDXL_REFINER, derived_family


class UnsupportedModel(ValueError):
    pass


@dataclass
class Block:
    kind: str  # "input" | "middle" | "output"
    index: int
    module: nn.Module
    level_in: int  # resolution level of the block's input: 0 = full latent, 1 = /2, ...
    level_out: int
    has_attention: bool


@dataclass
class AttentionLayer:
    name: str  # e.g. "input_blocks.1.1.transformer_blocks.0.attn1"
    module: nn.Module
    block: Block
    transformer: nn.Module  # the BasicTransformerBlock holding it
    is_self: bool  # attn1 (self) or attn2 (cross)

    @property
    def level(self) -> int:
        return self.block.level_in  # attention runs before a block's Upsample


def plain_self_attention(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """An attn1 call on its own tokens: nothing passed besides x (a context, value or mask given to
    self-attention is another extension's patch, e.g. Forge's attn1_patch, which then owns it)."""
    return all(a is None for a in args) and all(kwargs.get(k) is None for k in ("context", "value", "mask"))


@dataclass
class UNetMap:
    unet: nn.Module
    family: str
    model_channels: int
    inputs: list[Block]
    middle: Block
    outputs: list[Block]
    skip_channels: list[int]  # per output block: channels of the skip it concatenates
    h_channels: list[int]  # per output block: channels of h entering its concat
    attention: list[AttentionLayer] = field(default_factory=list)
    convs3x3: list[tuple[str, nn.Conv2d, int]] = field(default_factory=list)  # (name, conv, level)
    host: str = "ldm"  # "ldm" | "sgm" | "forge" | "forge_classic"

    @property
    def conv_in(self) -> nn.Conv2d:
        return self.unet.input_blocks[0][0]

    @property
    def final_norm(self) -> nn.GroupNorm:
        return self.unet.out[0]

    @property
    def out_conv(self) -> nn.Conv2d:
        return self.unet.out[2]

    @property
    def num_levels(self) -> int:
        return max(b.level_out for b in self.inputs) + 1

    def skip_index(self, output_index: int) -> int:
        """The input block whose output `output_blocks[output_index]` concatenates."""
        return len(self.inputs) - 1 - output_index

    def self_attention(self, max_level: int | None = None) -> list[AttentionLayer]:
        return [a for a in self.attention if a.is_self and (max_level is None or a.level <= max_level)]


def _has(module: nn.Module, cls_name: str) -> bool:
    return any(type(m).__name__ == cls_name for m in module.modules())


def _out_channels(block: nn.Module, previous: int) -> int:
    ch = previous
    for layer in block:
        if hasattr(layer, "out_channels") and isinstance(layer.out_channels, int):
            ch = layer.out_channels
        elif isinstance(layer, nn.Conv2d):
            ch = layer.out_channels
    return ch


def _host(unet: nn.Module) -> str:
    module = type(unet).__module__
    if module.startswith("sgm"):
        return "sgm"
    if module.startswith("backend."):
        return "forge"
    if module.startswith("ldm_patched"):
        return "forge_classic"
    return "ldm"


def _family(unet: nn.Module, inputs: list[Block]) -> str:
    layout = _layout_family(unet, inputs)
    return derived_family(layout, unet.out[-1].out_channels) or layout


def _layout_family(unet: nn.Module, inputs: list[Block]) -> str:
    label_emb = getattr(unet, "label_emb", None)
    level0_attention = any(b.has_attention for b in inputs if b.level_in == 0 and b.index > 0)
    if label_emb is not None and not level0_attention:
        first = next((m for m in label_emb.modules() if isinstance(m, nn.Linear)), None)
        if unet.model_channels == 384 or (first is not None and first.in_features == 2560):
            return SDXL_REFINER
        return SDXL
    transformers = [m for m in unet.modules() if type(m).__name__ == "SpatialTransformer"]
    if transformers and getattr(transformers[0], "use_linear", False):
        return SD2
    return SD1


def map_unet(unet: nn.Module) -> UNetMap:
    if not all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks", "out")):
        raise UnsupportedModel(f"{type(unet).__name__} is not a UNet with input/middle/output blocks")
    level = 0
    inputs: list[Block] = []
    for i, block in enumerate(unet.input_blocks):
        down = _has(block, "Downsample") or any(getattr(m, "stride", 1) in (2, (2, 2)) for m in block.modules() if isinstance(m, nn.Conv2d))
        inputs.append(Block("input", i, block, level, level + int(down), _has(block, "SpatialTransformer")))
        level += int(down)
    middle = Block("middle", 0, unet.middle_block, level, level, _has(unet.middle_block, "SpatialTransformer"))
    outputs: list[Block] = []
    for i, block in enumerate(unet.output_blocks):
        up = _has(block, "Upsample")
        outputs.append(Block("output", i, block, level, level - int(up), _has(block, "SpatialTransformer")))
        level -= int(up)

    channels = []
    ch = 0
    for block in unet.input_blocks:
        ch = _out_channels(block, ch)
        channels.append(ch)
    skip_channels = [channels[len(inputs) - 1 - i] for i in range(len(outputs))]
    h_channels = [block[0].channels - skip for block, skip in zip(unet.output_blocks, skip_channels)]

    by_module = {id(b.module): b for b in inputs + [middle] + outputs}
    attention: list[AttentionLayer] = []
    convs: list[tuple[str, nn.Conv2d, int]] = []
    for prefix, container in (("input_blocks", unet.input_blocks), ("middle_block", None), ("output_blocks", unet.output_blocks)):
        blocks = [(f"middle_block", unet.middle_block)] if container is None else [
            (f"{prefix}.{i}", b) for i, b in enumerate(container)
        ]
        for block_name, block_module in blocks:
            info = by_module[id(block_module)]
            upsamplers = [n for n, m in block_module.named_modules() if type(m).__name__ == "Upsample"]
            for name, m in block_module.named_modules():
                full = f"{block_name}.{name}" if name else block_name
                for attr, is_self in (("attn1", True), ("attn2", False)):
                    attn = getattr(m, attr, None)
                    if isinstance(attn, nn.Module) and hasattr(m, "norm1"):
                        attention.append(AttentionLayer(f"{full}.{attr}", attn, info, m, is_self))
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and full != "input_blocks.0.0":
                    # a Downsample conv reads level_in; an Upsample conv runs after the x2 resize
                    after_up = any(name.startswith(u + ".") for u in upsamplers)
                    lvl = info.level_out if after_up else info.level_in
                    convs.append((full, m, lvl))
    return UNetMap(
        unet=unet,
        family=_family(unet, inputs),
        model_channels=int(unet.model_channels),
        inputs=inputs,
        middle=middle,
        outputs=outputs,
        skip_channels=skip_channels,
        h_channels=h_channels,
        attention=attention,
        convs3x3=convs,
        host=_host(unet),
    )
