"""XYZ plot axes, one per declared parameter (and one per preset list), registered into the
WebUI's xyz_grid module. Values travel on the copied `p` as {technique: {param: value}}."""
from __future__ import annotations

from typing import Any, Callable

from .params import Param, ParamError, TechniqueSpec
from .techniques import SPECS

XYZ_ATTR = "unetmods_xyz"
LABEL_PREFIX = "[UNet Mods]"


def overrides(p: Any) -> dict[str, dict[str, Any]]:
    return getattr(p, XYZ_ATTR, {})


def _setter(tid: str, name: str) -> Callable[[Any, Any, Any], None]:
    def apply(p: Any, value: Any, _all_values: Any) -> None:
        # new dicts: the grid shallow-copies p per cell, so never mutate what a copy shares
        current = {k: dict(v) for k, v in overrides(p).items()}
        current.setdefault(tid, {})[name] = value
        setattr(p, XYZ_ATTR, current)

    return apply


def _confirm(spec: TechniqueSpec, param: Param) -> Callable[[Any, list[Any]], None]:
    def confirm(_p: Any, values: list[Any]) -> None:
        for value in values:
            try:
                param.coerce(value, f"{spec.id}.{param.name}")
            except ParamError as e:
                raise RuntimeError(f"{LABEL_PREFIX} {e}") from None

    return confirm


def axis_specs() -> list[dict[str, Any]]:
    """Everything an AxisOption needs, host-independent (label, type, apply, choices, confirm)."""
    axes = []
    for spec in SPECS.values():
        for param in spec.params:
            label = f"{LABEL_PREFIX} {spec.title} {'enabled' if param.name == 'enabled' else param.label}"
            kind = {"int": int, "float": float}.get(param.kind, str)
            choices = None
            if param.kind == "bool":
                choices = (lambda: ["False", "True"])
            elif param.kind == "choice":
                choices = (lambda p=param: list(p.choices))
            axes.append(dict(label=label, type=kind, apply=_setter(spec.id, param.name), choices=choices,
                             confirm=_confirm(spec, param)))
        if spec.presets:
            axes.append(dict(label=f"{LABEL_PREFIX} {spec.title} preset", type=str, apply=_setter(spec.id, "preset"),
                             choices=(lambda s=spec: list(s.presets)), confirm=None))
    return axes


def register(xyz_module: Any) -> int:
    """Add our axes to xyz_grid's axis_options once; returns how many were added."""
    existing = {getattr(o, "label", None) for o in xyz_module.axis_options}
    added = 0
    for axis in axis_specs():
        if axis["label"] in existing:
            continue
        kwargs = {"choices": axis["choices"]} if axis["choices"] else {}
        xyz_module.axis_options.append(xyz_module.AxisOption(axis["label"], axis["type"], axis["apply"],
                                                             confirm=axis["confirm"], **kwargs))
        added += 1
    return added


def find_xyz_module(scripts_data: list[Any]) -> Any | None:
    for data in scripts_data:
        if getattr(data.script_class, "__module__", None) in ("xyz_grid.py", "xy_grid.py") and hasattr(data, "module"):
            return data.module
    return None
