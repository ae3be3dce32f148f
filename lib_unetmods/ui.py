"""Gradio controls, paste-back and tooltips, all derived from the parameter declarations.

Written against the API common to gradio 3.41 (A1111 1.10) and 4.40 (Forge): gr.update, plain
Slider/Checkbox/Dropdown arguments, InputAccordion from modules.ui_components.
"""
from __future__ import annotations

import functools
import html
import json
from collections import Counter
from types import SimpleNamespace
from typing import Any, Callable

from .host import LOG_PREFIX
from .params import Param, TechniqueSpec
from .preview import Image, compute, render, summary
from .settings import Settings, arg_layout
from .stacks import STACKS, stack_settings
from .techniques import SPECS
from .unet_map import SD1, UNetMap


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
    out.update({_stack_label(name): f"Set every control for the '{name}' stack on the loaded model "
                f"({', '.join(STACKS[name][SD1])}; everything else off). See the README, 'Speed stack'."
                for name in STACKS})
    return out


def _stack_label(name: str) -> str:
    return f"Stack: {name}"


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


# The WebUI's controls the schedule preview reads, by elem_id (A1111 1.10 / Forge modules/ui.py;
# A1111's hires fix is an InputAccordion whose input is the checkbox "<id>-checkbox").
SOURCE_IDS: dict[str, tuple[str, ...]] = {
    "steps": ("{tab}_steps",),
    "width": ("{tab}_width",),
    "height": ("{tab}_height",),
    "hires": ("txt2img_hr-checkbox", "txt2img_enable_hr"),
    "hr_scale": ("txt2img_hr_scale",),
    "hr_resize_x": ("txt2img_hr_resize_x",),
    "hr_resize_y": ("txt2img_hr_resize_y",),
    "hr_steps": ("txt2img_hires_steps",),
    "denoising": ("img2img_denoising_strength",),
}
_WANTED = {i.format(tab=tab) for ids in SOURCE_IDS.values() for i in ids for tab in ("txt2img", "img2img")}
_components: dict[str, Any] = {}  # elem_id -> the WebUI component seen with it (latest wins)


def remember_component(component: Any, **kwargs: Any) -> None:
    """on_after_component callback: keep the WebUI controls the preview needs."""
    elem_id = getattr(component, "elem_id", None) or kwargs.get("elem_id")
    if elem_id in _WANTED:
        _components[elem_id] = component


def webui_sources(tab: str) -> dict[str, Any]:
    """name -> component of the tab's controls created so far (the WebUI builds them before
    the scripts' panels in its default layout)."""
    out = {}
    for name, ids in SOURCE_IDS.items():
        found = next((_components[i.format(tab=tab)] for i in ids if i.format(tab=tab) in _components), None)
        if found is not None:
            out[name] = found
    return out


def image_of(values: dict[str, Any], img2img: bool) -> Image:
    """The preview's Image from the sources' current values (defaults for those not found)."""
    base = Image(img2img=img2img)
    fields = {name: type(getattr(base, name))(values[name]) for name in SOURCE_IDS if values.get(name) is not None}
    return Image(**{**fields, "img2img": img2img})


ModelSource = Callable[[], "tuple[str | None, UNetMap | None]"]
_model_map: list[UNetMap] = []  # the loaded model's map, dropped when a model loads (it holds the UNet)


def loaded_model() -> tuple[str | None, UNetMap | None]:
    """(family, UNet map) of the WebUI's current model, or (None, None) without one."""
    from modules import shared

    from .host import host_unet
    from .unet_map import UnsupportedModel, map_unet

    unet = host_unet(SimpleNamespace(sd_model=getattr(shared, "sd_model", None)))
    if unet is None:
        return None, None
    if not _model_map or _model_map[0].unet is not unet:
        try:
            _model_map[:] = [map_unet(unet)]
        except UnsupportedModel:
            return None, None
    return _model_map[0].family, _model_map[0]


def forget_model(*_: Any) -> None:
    _model_map.clear()


def _gradio4(gr: Any) -> bool:
    return int(str(getattr(gr, "__version__", "3")).split(".")[0]) >= 4


def _quiet(gr: Any) -> Any:
    """show_progress for instant updates: gradio 4 takes "hidden", gradio 3 False."""
    return "hidden" if _gradio4(gr) else False


def _follow(gr: Any, components: list[Any], fn: Callable[..., Any], inputs: list[Any], outputs: list[Any]) -> None:
    """fn on every change of `components`, keeping up with fast changes. Gradio 4: one event
    for all of them that runs again after a busy spell ("always_last"). Gradio 3 drops a
    trigger while the same event is still running (a slider dragged quickly would leave its last
    value unseen), so there each component gets its event and fn runs once more when it
    finishes, on the values of that moment."""
    if _gradio4(gr) and hasattr(gr, "on"):
        gr.on(triggers=[c.change for c in components], fn=fn, inputs=inputs, outputs=outputs,
              show_progress="hidden", trigger_mode="always_last")
        return
    for component in components:
        event = component.change(fn=fn, inputs=inputs, outputs=outputs, show_progress=_quiet(gr))
        if hasattr(event, "then"):
            event.then(fn=fn, inputs=inputs, outputs=outputs, show_progress=False)


def build(elem_id: Callable[[str], str], sources: dict[str, Any] | None = None, model: ModelSource | None = None,
          img2img: bool = False) -> list[Any]:
    """The "UNet Mods" panel: an accordion whose label and first line say which techniques are
    on, a "Reset all" button, one InputAccordion per technique (its enable box in the header),
    the main controls, an Advanced sub-accordion, a preset dropdown where the technique has
    presets, and the schedule preview, which follows the controls and the WebUI's `sources`
    (steps, size, hires fix; see SOURCE_IDS) on the model `model()` returns. Returns the
    technique controls in the order of settings.arg_layout()."""
    import gradio as gr
    from modules.ui_components import InputAccordion

    lab = labels()
    sources = dict(sources or {})
    model = model or (lambda: (None, None))
    components: dict[tuple[str, str], Any] = {}
    presets: list[Any] = []
    with gr.Accordion(PANEL_TITLE, open=False, elem_id=elem_id("panel"), elem_classes=["unetmods-panel"]) as panel:
        with gr.Row(elem_classes=["unetmods-header"]):
            summary_line = gr.HTML(_summary_html(Settings()), elem_id=elem_id("summary"))
            stacks = {name: gr.Button(_stack_label(name), elem_id=elem_id(f"stack_{name}"), variant="secondary",
                                      size="sm", elem_classes=["unetmods-reset"]) for name in STACKS}
            reset = gr.Button("Reset all", elem_id=elem_id("reset"), variant="secondary", size="sm",
                              elem_classes=["unetmods-reset"])
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
                    presets.append(preset)
        with gr.Accordion("Schedule preview", open=True, elem_id=elem_id("preview_box")):
            preview_html = gr.HTML(_preview_html(Settings(), {}, img2img, model), elem_id=elem_id("preview"))
    controls = [components[key] for key in arg_layout()]
    _wire_panel(gr, controls, presets, sources, summary_line, panel, reset, preview_html, model, img2img)
    for name, button in stacks.items():
        _wire_stack(gr, name, button, controls, presets, model)
    return controls


PANEL_TITLE = "UNet Mods"


def _summary_html(settings: Settings) -> str:
    text = summary(settings)
    return f'<div class="unetmods-summary" data-on="{",".join(settings.enabled_ids())}">{html.escape(text)}</div>'


def _preview_html(settings: Settings, source_values: dict[str, Any], img2img: bool, model: ModelSource) -> str:
    try:
        family, umap = model()
        return render(compute(settings, image_of(source_values, img2img), family, umap))
    except Exception as e:  # the preview must never break the panel
        return f'<div class="unetmods-preview um-error">Preview unavailable: {html.escape(str(e))}</div>'


def _wire_panel(gr: Any, controls: list[Any], presets: list[Any], sources: dict[str, Any], summary_line: Any,
                panel: Any, reset: Any, preview_html: Any, model: ModelSource, img2img: bool) -> None:
    layout = arg_layout()
    boxes = [c for c, (_, name) in zip(controls, layout) if name == "enabled"]
    box_ids = [tid for tid, name in layout if name == "enabled"]

    def on_boxes(*flags: bool) -> list[Any]:
        settings = Settings({tid: {"enabled": bool(f)} for tid, f in zip(box_ids, flags)})
        label = f"{PANEL_TITLE} · {summary(settings)}" if settings.enabled_ids() else PANEL_TITLE
        return [_summary_html(settings), gr.update(label=label)]

    _follow(gr, boxes, on_boxes, boxes, [summary_line, panel])

    names = list(sources)

    def on_any(*values: Any) -> str:
        settings = Settings.from_args(values[:len(controls)])
        return _preview_html(settings, dict(zip(names, values[len(controls):])), img2img, model)

    inputs = controls + [sources[n] for n in names]
    _follow(gr, inputs, on_any, inputs, [preview_html])

    reset.click(fn=lambda: _panel_updates(gr, Settings(), presets), inputs=[], outputs=controls + presets,
                show_progress=_quiet(gr))


def _panel_updates(gr: Any, settings: Settings, presets: list[Any]) -> list[Any]:
    """Updates that set every control to `settings` and every preset dropdown back to (custom)."""
    return [gr.update(value=v) for v in settings.to_args()] + [gr.update(value="(custom)") for _ in presets]


def _wire_stack(gr: Any, name: str, button: Any, controls: list[Any], presets: list[Any], model: ModelSource) -> None:
    """The stack's button: every control to the stack's settings for the loaded model's family
    (SD1's before a model is known), the techniques outside the stack back to their defaults."""
    def fill() -> list[Any]:
        return _panel_updates(gr, Settings(stack_settings(name, model()[0] or SD1)), presets)

    button.click(fn=fill, inputs=[], outputs=controls + presets, show_progress=_quiet(gr))


def _preset_dropdown(gr: Any, spec: TechniqueSpec, elem_id: Callable[[str], str]) -> Any:
    return gr.Dropdown(choices=["(custom)", *spec.presets], value="(custom)", label=f"{spec.title} preset",
                       elem_id=elem_id(f"{spec.id}_preset"))


def _wire_preset(gr: Any, spec: TechniqueSpec, dropdown: Any, components: dict[tuple[str, str], Any]) -> None:
    names = sorted({name for values in spec.presets.values() for name in values})
    outputs = [components[(spec.id, name)] for name in names]

    def fill(choice: str) -> list[Any]:
        values = spec.presets.get(choice, {})
        return [gr.update(value=values[name]) if name in values else gr.update() for name in names]

    dropdown.change(fn=fill, inputs=[dropdown], outputs=outputs, show_progress=_quiet(gr))


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
            pasted = Settings.from_infotext(params)
            problems = [f"pasted infotext: {problem}" for problem in pasted.errors]
            _pasted[:] = [(pasted, problems)] if problems else []
            for problem in problems:
                notify(problem)
        text = params.get(spec.infotext_key)
        if text is None:
            return False if name == "enabled" else None
        return spec.from_text(str(text), [])[name]

    return value


_pasted: list[tuple[Settings, list[str]]] = []  # the last paste's settings and problems, until a generation takes them


def take_paste_problems(settings: Settings) -> list[str]:
    """The problems of the last paste (UI or the API's `infotext` field), for the next generation
    if it runs the pasted settings, so they reach its messages (infotext, API response). Taken by
    the next generation either way: a later one is never blamed for an old paste."""
    if not _pasted:
        return []
    pasted, problems = _pasted.pop()
    return problems if pasted == settings else []


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
