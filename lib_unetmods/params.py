"""Parameter declarations: every technique declares its parameters once, here-shaped.

Everything else (gradio controls, infotext, XYZ axes, API fields, validation, the canonical
text form) is derived from these declarations, so a parameter cannot be forgotten in one place.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

BOOL_TRUE = {"true", "1", "yes", "on"}
BOOL_FALSE = {"false", "0", "no", "off"}
INFOTEXT_PREFIX = "UNetMods"
MESSAGES_KEY = f"{INFOTEXT_PREFIX} messages"  # the run's messages, for API clients (info.extra_generation_params)
AUTO_VALUES = "auto_values"  # the parameter that picks the recommended values for the model family
NOT_THIS_PASS = "not applied in this pass"  # a technique's idle() reason for a pass it is off in by choice: never said
TEXT_FORBIDDEN = set(";=")  # besides whitespace: the canonical text form splits on all three


class ParamError(ValueError):
    """A value that does not fit its declaration; the message names technique and parameter."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "bool" | "int" | "float" | "choice" | "text"
    default: Any
    label: str
    tooltip: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    advanced: bool = False  # shown in the technique's "Advanced" sub-accordion
    pattern: str = ""  # text: a regular expression the whole value must match

    def coerce(self, value: Any, where: str = "") -> Any:
        """Convert a UI / JSON / text value to the declared type, or raise ParamError."""
        where = where or self.name
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in BOOL_TRUE | BOOL_FALSE:
                return value.strip().lower() in BOOL_TRUE
            raise ParamError(f"{where}: expected true or false, got {value!r}")
        if self.kind == "text":
            return self._coerce_text(value, where)
        if self.kind == "choice":
            text = str(value).strip()
            for choice in self.choices:
                if choice.lower() == text.lower():
                    return choice
            raise ParamError(f"{where}: {value!r} is not one of {', '.join(self.choices)}")
        if isinstance(value, bool):
            raise ParamError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value.strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float range (JSON allows it)
            raise ParamError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ParamError(f"{where}: expected a finite number, got {value!r}")
        if self.kind == "int":
            if number != int(number):
                raise ParamError(f"{where}: expected a whole number, got {value!r}")
            number = int(number)
        if (self.minimum is not None and number < self.minimum) or (
            self.maximum is not None and number > self.maximum
        ):
            raise ParamError(f"{where}: {value!r} is outside [{self.minimum:g}, {self.maximum:g}]")
        return number

    def _coerce_text(self, value: Any, where: str) -> str:
        """A compact list such as "1,2|3": whitespace around ',' and '|' is dropped (so "5, -5"
        typed in a textbox is fine); whitespace, ';' and '=' left inside are refused, since
        the canonical text form could not carry them."""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ParamError(f"{where}: expected text, got {value!r}")
        text = re.sub(r"\s*([,|])\s*", r"\1", str(value).strip())
        if any(c.isspace() or c in TEXT_FORBIDDEN for c in text):
            raise ParamError(f"{where}: {value!r} may not contain spaces, ';' or '=' (separate with ',' and '|')")
        if self.pattern and not re.fullmatch(self.pattern, text):
            raise ParamError(f"{where}: {value!r} is not in the expected form ({self.tooltip})")
        return text

    def format(self, value: Any) -> str:
        if self.kind == "bool":
            return "true" if value else "false"
        if self.kind == "float":
            return repr(float(value))
        return str(value)


@dataclass(frozen=True)
class TechniqueSpec:
    """A technique's declared parameters; params[0] is always the on/off switch `enabled`."""

    id: str
    title: str
    params: tuple[Param, ...]
    description: str = ""
    version: int = 1  # version of the infotext format; bump when a default or meaning changes
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    recommended: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # family -> values

    def __post_init__(self) -> None:
        assert self.params[0].name == "enabled" and self.params[0].kind == "bool", self.id
        names = [p.name for p in self.params]
        assert len(set(names)) == len(names), f"duplicate parameter in {self.id}"
        for p in self.params:
            assert p.kind != "choice" or p.default in p.choices, (self.id, p.name)
            assert all(c and not set(c) & set(" ;=") for c in p.choices), (self.id, p.name)
            assert p.kind != "text" or p.coerce(p.default) == p.default, (self.id, p.name)
        assert AUTO_VALUES not in names or self.family_keys(), f"{self.id}: auto values without recommended values"

    @property
    def infotext_key(self) -> str:
        return f"{INFOTEXT_PREFIX} {self.id} v{self.version}"

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ParamError(f"{self.id}: unknown parameter {name!r}")

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def recommended_values(self, family: str) -> dict[str, Any]:
        """Defaults with the family's recommended values (an SDXL variant falls back to SDXL's, a
        derived family such as the lab's proxy to its layout's)."""
        from .families import SDXL, is_sdxl, layout

        values = self.defaults()
        fallback = self.recommended.get(SDXL if is_sdxl(family) else layout(family))
        values.update(self.recommended.get(family) or fallback or self.recommended.get("default", {}))
        values["enabled"] = True
        return values

    def family_keys(self) -> set[str]:
        """The parameters some family recommends a value for (auto values set all of them)."""
        return {name for values in self.recommended.values() for name in values}

    def with_family_values(self, values: Mapping[str, Any], family: str) -> dict[str, Any]:
        """`values` with auto values resolved for `family`: the recommended values written in,
        auto switched off, so the result (and the infotext) names the values used."""
        out = dict(values)
        if out.get(AUTO_VALUES):
            recommended = self.recommended_values(family)
            out.update({name: recommended[name] for name in self.family_keys()})
            out[AUTO_VALUES] = False
        return out

    def update(self, values: dict[str, Any], changes: Mapping[str, Any], errors: list[str]) -> None:
        """Apply `changes` (a preset name under "preset" first) to `values`; bad entries are
        reported in `errors` and leave the previous value in place."""
        changes = dict(changes)
        preset = changes.pop("preset", None)
        if preset is not None:
            match = next((k for k in self.presets if k.lower() == str(preset).lower()), None)
            if match is None:
                errors.append(f"{self.id}.preset: {preset!r} is not one of {', '.join(self.presets)}")
            else:
                values.update(self.presets[match])
        for name, raw in changes.items():
            try:
                values[name] = self.param(name).coerce(raw, f"{self.id}.{name}")
            except ParamError as e:
                errors.append(str(e))

    def to_text(self, values: Mapping[str, Any]) -> str:
        """Canonical text: the non-default parameters as name=value, separated by spaces."""
        parts = [
            f"{p.name}={p.format(values[p.name])}"
            for p in self.params[1:]
            if values[p.name] != p.default
        ]
        return " ".join(parts) or "default"

    def from_text(self, text: str, errors: list[str], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Inverse of to_text; the technique counts as enabled unless the text says enabled=false.
        With `base`, the text updates those values instead of the defaults."""
        values = dict(base) if base is not None else self.defaults()
        values["enabled"] = True
        changes: dict[str, str] = {}
        for token in text.split():
            if token == "default":
                continue
            name, sep, raw = token.partition("=")
            if not sep or not name:
                errors.append(f"{self.id}: malformed text {token!r} (expected name=value)")
                continue
            changes[name] = raw
        self.update(values, changes, errors)
        return values


def first_pass_or_hires_box(values: Mapping[str, Any], hires: bool) -> bool:
    """`runs_in_pass` of a technique with an "Apply in hires pass" box: the first pass always,
    the hires-fix pass when the box is ticked."""
    return not hires or values["hires"]


def auto_values_param(title: str) -> Param:
    """The switch that replaces a technique's tuned values by the ones recommended for the loaded
    model's family, chosen when generating."""
    return Param(AUTO_VALUES, "bool", False, "Auto values for this model",
                 f"Use the {title} values recommended for the loaded model (SD1, SD2 or SDXL), chosen when generating "
                 "(the sliders are ignored for those values); the infotext records the values used.")
