"""The only code that changes a model: every change is recorded and undone in reverse order.

State is keyed by model identity (the hires checkpoint and the refiner swap models in the
middle of a generation), a marker attribute on the model finds a leftover patch from a run
that crashed (or from a reloaded copy of this module), and restore() is exact and idempotent.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

MARKER = "_unetmods_patcher"
_MISSING = object()
ACTIVE: dict[int, "Patcher"] = {}  # id(model) -> its patcher, while it holds any change


class Patcher:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def __len__(self) -> int:
        return len(self._undo)

    @property
    def active(self) -> bool:
        return bool(self._undo)

    def set_attr(self, obj: Any, name: str, value: Any, owner: str = "") -> None:
        """Set an instance attribute (a forward, a conv's dilation...) and remember the old one."""
        old = obj.__dict__.get(name, _MISSING)

        def undo() -> None:
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old

        object.__setattr__(obj, name, value)
        self._push(owner, undo)

    def add_handle(self, handle: torch.utils.hooks.RemovableHandle, owner: str = "") -> None:
        self._push(owner, handle.remove)

    def on_restore(self, fn: Callable[[], None], owner: str = "") -> None:
        self._push(owner, fn)

    def _push(self, owner: str, undo: Callable[[], None]) -> None:
        if not self._undo:
            object.__setattr__(self.model, MARKER, self)
            ACTIVE[id(self.model)] = self
        self._undo.append((owner, undo))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Undo everything recorded inside the block if it raises."""
        mark = len(self._undo)
        try:
            yield
        except BaseException:
            self._undo_to(mark)
            raise

    def _undo_to(self, mark: int) -> None:
        while len(self._undo) > mark:
            _, undo = self._undo.pop()
            undo()
        if not self._undo:
            self.model.__dict__.pop(MARKER, None)
            ACTIVE.pop(id(self.model), None)

    def restore(self) -> None:
        self._undo_to(0)


def current_forward(module: nn.Module) -> Callable[..., Any]:
    """The forward to wrap: the one in place now (an instance forward another technique or
    extension set), else the class's, looked up per call, so a later class-level replacement
    (a host switching the attention kernel) still runs under the wrapper."""
    own = module.__dict__.get("forward")
    return own if own is not None else (lambda *args, **kwargs: type(module).forward(module, *args, **kwargs))


def leftover(model: nn.Module) -> Patcher | None:
    return model.__dict__.get(MARKER)


def restore_model(model: nn.Module) -> bool:
    """Remove whatever a previous run left on `model`; True if there was something."""
    patcher = leftover(model)
    if patcher is None:
        return False
    patcher.restore()
    model.__dict__.pop(MARKER, None)
    return True


def restore_all() -> int:
    """Undo every live patch on every model (model load, script unload); returns how many."""
    patchers = list(ACTIVE.values())
    for patcher in patchers:
        patcher.restore()
    return len(patchers)
