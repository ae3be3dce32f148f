"""Snapshot a model's forwards (every instance attribute), hooks, classes, modules, parameters and
buffers, and assert they come back exactly."""
from __future__ import annotations

import torch
import torch.nn as nn


def snapshot(model: nn.Module) -> dict:
    state = {}
    for name, m in model.named_modules():
        state[name] = {
            "dict": {k: v for k, v in m.__dict__.items() if not k.startswith("_")},
            "hooks": (dict(m._forward_hooks), dict(m._forward_pre_hooks)),
            "kwarg_hooks": (dict(m._forward_hooks_with_kwargs), dict(m._forward_pre_hooks_with_kwargs)),
            "class": type(m),
            "params": {k: (p, p.detach().clone()) for k, p in m._parameters.items() if p is not None},
            "buffers": {k: (b, b.clone()) for k, b in m._buffers.items() if b is not None},
            "modules": dict(m._modules),
        }
    return state


def assert_restored(model: nn.Module, before: dict) -> None:
    after_names = {name for name, _ in model.named_modules()}
    assert after_names == set(before), "module tree changed"
    for name, m in model.named_modules():
        snap = before[name]
        now = {k: v for k, v in m.__dict__.items() if not k.startswith("_")}
        assert now.keys() == snap["dict"].keys(), f"{name}: attributes {set(now) ^ set(snap['dict'])} changed"
        for k, v in now.items():
            assert v is snap["dict"][k] or (type(v) in (int, float, bool, str, tuple) and v == snap["dict"][k]), f"{name}.{k} not restored"
        assert dict(m._forward_hooks) == snap["hooks"][0] and dict(m._forward_pre_hooks) == snap["hooks"][1], f"{name}: hooks left"
        assert (dict(m._forward_hooks_with_kwargs), dict(m._forward_pre_hooks_with_kwargs)) == snap["kwarg_hooks"], f"{name}: hooks left"
        assert type(m) is snap["class"], f"{name}: class changed to {type(m).__name__}"
        assert dict(m._modules) == snap["modules"], f"{name}: submodules changed"
        for k, (b, value) in snap["buffers"].items():
            assert m._buffers.get(k) is b and torch.equal(b, value), f"{name}.{k}: buffer replaced or changed"
        buffers = {k for k, b in m._buffers.items() if b is not None}
        assert buffers == snap["buffers"].keys(), f"{name}: buffers {buffers ^ set(snap['buffers'])} changed"
        assert {k for k, p in m._parameters.items() if p is not None} == snap["params"].keys(), f"{name}: parameters added or removed"
        for k, (p, value) in snap["params"].items():
            assert m._parameters[k] is p, f"{name}.{k}: parameter object replaced"
            assert torch.equal(p, value), f"{name}.{k}: parameter value changed"
