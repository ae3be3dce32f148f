"""Settings of all techniques: validation and the one canonical text form.

The same text is used in the infotext (one key per technique), by the API and by the
benchmark's --mods option. A bad value never raises here: it is reported in `errors` and the
parameter keeps its default, so one typo cannot lose the user's other settings.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Iterable, Mapping

from .params import INFOTEXT_PREFIX, MESSAGES_KEY, ParamError, TechniqueSpec
from .stacks import stack_settings
from .techniques import SPECS

API_SHAPE = "expected a dict of techniques {technique: {param: value}} as the only argument, or the UI's positional values"
_KEY = re.compile(rf"{INFOTEXT_PREFIX} (\S+) v(\d+)")


class SettingsError(ValueError):
    pass


def arg_layout() -> list[tuple[str, str]]:
    """(technique id, parameter name) for every positional script argument, in UI order."""
    return [(spec.id, p.name) for spec in SPECS.values() for p in spec.params]


class Settings:
    def __init__(self, values: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.values: dict[str, dict[str, Any]] = {tid: spec.defaults() for tid, spec in SPECS.items()}
        for tid, vals in (values or {}).items():
            self.values[tid].update(vals)
        self.errors: list[str] = []

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and self.values == other.values

    def __repr__(self) -> str:
        return f"Settings({self.to_text()!r})"

    def copy(self) -> "Settings":
        out = Settings(copy.deepcopy(self.values))
        out.errors = list(self.errors)
        return out

    def enabled_ids(self) -> list[str]:
        return [tid for tid, vals in self.values.items() if vals["enabled"]]

    def __getitem__(self, tid: str) -> dict[str, Any]:
        return self.values[tid]

    # --- API dict: {technique: {param: value}} -------------------------------------------
    def update_from_dict(self, data: Mapping[str, Any]) -> "Settings":
        """A technique named in `data` is switched on unless its dict says enabled=false."""
        if not isinstance(data, Mapping):
            self.errors.append(f"expected a dict {{technique: {{param: value}}}}, got {type(data).__name__}")
            return self
        for tid, changes in data.items():
            spec = SPECS.get(tid)
            if spec is None:
                self.errors.append(f"unknown technique {tid!r} (known: {', '.join(SPECS)})")
                continue
            if not isinstance(changes, Mapping):
                self.errors.append(f"{tid}: expected a dict of parameters, got {changes!r}")
                continue
            changes = dict(changes)
            changes.setdefault("enabled", True)
            spec.update(self.values[tid], changes, self.errors)
        return self

    # --- positional script args (what the UI sends) -------------------------------------
    @classmethod
    def from_args(cls, args: Iterable[Any]) -> "Settings":
        args = list(args)
        settings = cls()
        if args and isinstance(args[0], Mapping):  # API: one dict instead of positional values
            return settings.update_from_dict(args[0])
        if args and not _is_switch(args[0]):  # the API fills the other slots with defaults: judge by the first
            settings.errors.append(f"{API_SHAPE}; got {type(args[0]).__name__} {args[0]!r}: every technique is off")
            return settings
        for (tid, name), raw in zip(arg_layout(), args):
            spec = SPECS[tid]
            try:
                settings.values[tid][name] = spec.param(name).coerce(raw, f"{tid}.{name}")
            except ParamError as e:
                settings.errors.append(str(e))
        return settings

    def to_args(self) -> list[Any]:
        return [self.values[tid][name] for tid, name in arg_layout()]

    # --- canonical text: "freeu b1=1.5 s1=0.9; tome ratio=0.5" --------------------------
    def to_text(self) -> str:
        return "; ".join(f"{tid} {SPECS[tid].to_text(self.values[tid])}" for tid in self.enabled_ids())

    @classmethod
    def from_text(cls, text: str, strict: bool = False, family: str | None = None) -> "Settings":
        """A technique named twice is merged left to right: "freeu preset=sd15; freeu b1=1.2"
        is the preset with b1=1.2. `stack=NAME` expands a one-click stack (stacks.py) for
        `family`; later parts override it."""
        settings = cls()
        seen: set[str] = set()
        for part in filter(None, (s.strip() for s in text.split(";"))):
            if part.startswith("stack="):
                try:
                    stack = stack_settings(part[6:], family or "")
                    settings.update_from_dict(stack)
                    seen.update(stack)
                except ValueError as e:
                    settings.errors.append(str(e) if family else f"{part}: the model family is needed to expand a stack")
                continue
            tid, _, rest = part.partition(" ")
            spec = SPECS.get(tid)
            if spec is None:
                settings.errors.append(f"unknown technique {tid!r} (known: {', '.join(SPECS)})")
                continue
            settings.values[tid] = spec.from_text(rest, settings.errors, settings.values[tid] if tid in seen else None)
            seen.add(tid)
        if strict and settings.errors:
            raise SettingsError("; ".join(settings.errors))
        return settings

    # --- infotext ----------------------------------------------------------------------
    def infotext(self) -> dict[str, str]:
        """One namespaced, versioned key per enabled technique."""
        return {SPECS[tid].infotext_key: SPECS[tid].to_text(self.values[tid]) for tid in self.enabled_ids()}

    @classmethod
    def from_infotext(cls, params: Mapping[str, Any]) -> "Settings":
        """Techniques without a key in `params` are off; keys of unknown techniques or versions
        are reported in `errors` and ignored."""
        settings = cls()
        settings.errors += unknown_keys(params)
        for tid, spec in SPECS.items():
            text = params.get(spec.infotext_key)
            if text is not None:
                settings.values[tid] = spec.from_text(str(text), settings.errors)
        return settings

    def with_family_values(self, family: str) -> "Settings":
        """Auto values resolved for the loaded model's family (see TechniqueSpec.with_family_values)."""
        out = self.copy()
        out.values = {tid: SPECS[tid].with_family_values(vals, family) for tid, vals in self.values.items()}
        return out


def unknown_keys(params: Mapping[str, Any]) -> list[str]:
    """A message for each of our infotext keys this version cannot read (written by a newer or
    different version of the extension, or mistyped)."""
    known = {spec.infotext_key for spec in SPECS.values()} | {MESSAGES_KEY}
    problems = []
    for key in params:
        if not key.startswith(f"{INFOTEXT_PREFIX} ") or key in known:
            continue
        match = _KEY.fullmatch(key)
        spec = SPECS.get(match.group(1)) if match else None
        if spec is not None:
            problems.append(f"'{key}': version {match.group(2)} of {spec.title}'s settings is unknown here "
                            f"(this version reads v{spec.version}); ignored")
        elif match:
            problems.append(f"'{key}': unknown technique {match.group(1)!r} (known: {', '.join(SPECS)}); ignored")
        else:
            problems.append(f"'{key}': malformed key (expected '{INFOTEXT_PREFIX} <technique> v<n>'); ignored")
    return problems


def _is_switch(value: Any) -> bool:
    """Could `value` be the first positional argument (the first technique's on/off switch)?"""
    tid, name = arg_layout()[0]
    try:
        SPECS[tid].param(name).coerce(value)
    except ParamError:
        return False
    return True


def spec_of(tid: str) -> TechniqueSpec:
    return SPECS[tid]
