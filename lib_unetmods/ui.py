"""Gradio controls, paste-back and tooltips, all derived from the parameter declarations.

Written against the API common to gradio 3.41 (A1111 1.10) and 4.40 (Forge): gr.update, plain
Slider/Checkbox/Dropdown arguments, InputAccordion from modules.ui_components.
"""
from __future__ import annotations

import functools
import html
import json
from collections import Counter
from typing import Any, Callable

from .host import LOG_PREFIX
from .params import Param, TechniqueSpec
from .settings import Settings, arg_layout
from .techniques import SPECS


def labels() -> dict[tuple[str, str], str]:
    """UI label per (technique, parameter). Labels must be unique within the script (the WebUI's
    ui-config keys and tooltips go by label), so a label two techniques share gets the title."""
    counts = Counter(p.label for spec in SPECS.values() for p in spec.params)
    return {
        (spec.id, p.name): p.label if counts[p.label] == 1 else f"{spec.title} {p.label.lower()}"
        for spec in SPECS.values() for p in spec.params
    }


def titles() -> dict[str, str]:
    """label -> tooltip, read by javascript/unetmods.js into the WebUI's `titles` map."""
    lab = labels()
    out = {lab[(spec.id, p.name)]: p.tooltip for spec in SPECS.values() for p in spec.params}
    out.update({f"{spec.title} preset": f"Fill {spec.title}'s controls from a preset." for spec in SPECS.values() if spec.presets})
    return out


def _control(gr: Any, param: Param, label: str, elem_id: str) -> Any:
    if param.kind == "bool":
        return gr.Checkbox(value=param.default, label=label, elem_id=elem_id)
    if param.kind == "choice":
        return gr.Dropdown(choices=list(param.choices), value=param.default, label=label, elem_id=elem_id)
    if param.kind == "text":
        return gr.Textbox(value=param.default, label=label, elem_id=elem_id, lines=1)
    step = param.step if param.step is not None else (1 if param.kind == "int" else 0.01)
    return gr.Slider(minimum=param.minimum, maximum=param.maximum, step=step, value=param.default, label=label,
                     elem_id=elem_id)


def build(elem_id: Callable[[str], str]) -> list[Any]:
    """One InputAccordion per technique (its enable box in the header), the main controls, an
    Advanced sub-accordion, and a preset dropdown where the technique has presets. Returns the
    components in the order of settings.arg_layout()."""
    import gradio as gr
    from modules.ui_components import InputAccordion

    lab = labels()
    components: dict[tuple[str, str], Any] = {}
    with gr.Group(elem_id=elem_id("panel")):
        # tooltips for javascript/unetmods.js (a hidden div: gradio 4 leaves invisible components out of the page)
        gr.HTML(f'<div hidden class="unetmods-titles" data-titles="{html.escape(json.dumps(titles()))}"></div>',
                elem_classes=["unetmods-titles-holder"])
        for spec in SPECS.values():
            with InputAccordion(False, label=spec.title, elem_id=elem_id(spec.id)) as enabled:
                components[(spec.id, "enabled")] = enabled
                if spec.description:
                    gr.Markdown(spec.description, elem_classes=["unetmods-description"])
                preset = _preset_dropdown(gr, spec, elem_id) if spec.presets else None
                main = [p for p in spec.params[1:] if not p.advanced]
                advanced = [p for p in spec.params[1:] if p.advanced]
                for param in main:
                    components[(spec.id, param.name)] = _control(gr, param, lab[(spec.id, param.name)], elem_id(f"{spec.id}_{param.name}"))
                if advanced:
                    with gr.Accordion("Advanced", open=False, elem_id=elem_id(f"{spec.id}_advanced")):
                        for param in advanced:
                            components[(spec.id, param.name)] = _control(gr, param, lab[(spec.id, param.name)], elem_id(f"{spec.id}_{param.name}"))
                if preset is not None:
                    _wire_preset(gr, spec, preset, components)
    return [components[key] for key in arg_layout()]


def _preset_dropdown(gr: Any, spec: TechniqueSpec, elem_id: Callable[[str], str]) -> Any:
    return gr.Dropdown(choices=["(custom)", *spec.presets], value="(custom)", label=f"{spec.title} preset",
                       elem_id=elem_id(f"{spec.id}_preset"))


def _wire_preset(gr: Any, spec: TechniqueSpec, dropdown: Any, components: dict[tuple[str, str], Any]) -> None:
    names = sorted({name for values in spec.presets.values() for name in values})
    outputs = [components[(spec.id, name)] for name in names]

    def fill(choice: str) -> list[Any]:
        values = spec.presets.get(choice, {})
        return [gr.update(value=values[name]) if name in values else gr.update() for name in names]

    dropdown.change(fn=fill, inputs=[dropdown], outputs=outputs, show_progress=False)


def notify(message: str) -> None:
    """A paste-back problem: to the console, and as a gradio warning toast where a UI event is
    running (gradio 3.41 and 4.x; outside an event gradio only logs it)."""
    print(f"{LOG_PREFIX} {message}")
    try:
        import gradio as gr

        gr.Warning(f"UNet Mods: {message}")
    except Exception:  # no gradio, or one without Warning: the console has it
        pass


def _paste_value(spec: TechniqueSpec, name: str, report: bool) -> Callable[[dict[str, Any]], Any]:
    """Paste-back for one control: the value from our key; without the key the technique is
    switched off and its other controls are left as they are. The `report` one (called once
    per paste) names every problem of the pasted text: bad values, unknown keys and versions."""

    def value(params: dict[str, Any]) -> Any:
        if report:
            for problem in Settings.from_infotext(params).errors:
                notify(f"pasted infotext: {problem}")
        text = params.get(spec.infotext_key)
        if text is None:
            return False if name == "enabled" else None
        return spec.from_text(str(text), [])[name]

    return value


@functools.lru_cache(maxsize=None)
def paste_functions() -> tuple[Callable[[dict[str, Any]], Any], ...]:
    """One paste function per control, in arg_layout() order. The same function objects serve
    both tabs: "Send to txt2img/img2img" pairs the fields of two tabs by these targets."""
    return tuple(_paste_value(SPECS[tid], name, report=i == 0) for i, (tid, name) in enumerate(arg_layout()))


def infotext_fields(components: list[Any]) -> list[tuple[Any, Callable[[dict[str, Any]], Any]]]:
    return list(zip(components, paste_functions()))


def paste_field_names() -> list[Callable[[dict[str, Any]], Any]]:
    """What "Send to" carries: every control of ours (the WebUI matches infotext_fields' targets)."""
    return list(paste_functions())
