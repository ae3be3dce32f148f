"""A stand-in for the part of gradio the script uses: components record their arguments and
value, layout blocks are context managers, `.change` records the handler."""
from __future__ import annotations

from typing import Any

_created: list["Component"] = []


class Block:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs
        self.elem_id = kwargs.get("elem_id")
        _created.append(self)

    def __enter__(self) -> "Block":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class Component(Block):
    def __init__(self, *args: Any, value: Any = None, label: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.value, self.label = value, label
        self.handlers: list[tuple[str, Any, Any, Any]] = []

    def change(self, fn: Any = None, inputs: Any = None, outputs: Any = None, **kwargs: Any) -> None:
        self.handlers.append(("change", fn, inputs, outputs))

    def click(self, fn: Any = None, inputs: Any = None, outputs: Any = None, **kwargs: Any) -> None:
        self.handlers.append(("click", fn, inputs, outputs))


class Group(Block): ...
class Row(Block): ...
class Column(Block): ...
class Accordion(Block): ...
class Checkbox(Component): ...
class Slider(Component): ...
class Dropdown(Component): ...
class Textbox(Component): ...
class HTML(Component): ...
class Markdown(Component): ...
class Button(Component): ...


def update(**kwargs: Any) -> dict[str, Any]:
    return {"__type__": "update", **kwargs}


warnings: list[str] = []  # what gr.Warning showed (a toast in the real gradio)


def Warning(message: str = "") -> None:  # noqa: A001 - gradio's name
    warnings.append(message)
