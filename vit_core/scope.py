"""Brief changes to a shared model that only the calling thread sees.

The app answers several requests at once from one model. A hook or a replaced `forward` that one
request puts on a module for a moment (to knock a head out, or to catch attention probabilities)
would act on every other request's passes through that module too. Here the change is tied to the
context that made it (`contextvars`: each thread, and each asyncio task, has its own): passes from
anywhere else run the module as it is. A setting the model holds only once (the attention kernel
of a transformers model) cannot differ per thread: `while_needed` keeps it on until the last
context that needs it is done, so one request ending never switches it off under another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import nn

# The pre-hooks active in this context (an object standing for each).
_HOOKS: ContextVar[frozenset] = ContextVar("vit_core_pre_hooks", default=frozenset())
# The forward overrides active in this context, by id of the module they replace the forward of.
_OVERRIDES: ContextVar[dict[int, Callable]] = ContextVar("vit_core_forward_overrides", default={})


@contextmanager
def pre_hook(module: nn.Module, hook: Callable) -> Iterator[None]:
    """Inside, `hook(module, args)` is a forward pre-hook of `module` for this context's passes only."""
    owner = object()
    token = _HOOKS.set(_HOOKS.get() | {owner})
    handle = module.register_forward_pre_hook(lambda m, args: hook(m, args) if owner in _HOOKS.get() else None)
    try:
        yield
    finally:
        handle.remove()
        _HOOKS.reset(token)


# How many contexts need each shared setting on (`while_needed`), and what turns it back, by key.
_NEEDED: dict[object, int] = {}
_UNDO: dict[object, Callable[[], None]] = {}
_LOCK = threading.Lock()


@contextmanager
def while_needed(key: object, switch_on: Callable[[], Callable[[], None]]) -> Iterator[None]:
    """For a setting every context shares (a model's attention kernel): inside, it is on.
    `switch_on()` turns it on and returns what turns it back; it runs when the first context
    needs it, and that undo when the last one is done, so one context ending never switches it
    off under another."""
    with _LOCK:
        if not _NEEDED.get(key):
            _UNDO[key] = switch_on()
        _NEEDED[key] = _NEEDED.get(key, 0) + 1
    try:
        yield
    finally:
        with _LOCK:
            _NEEDED[key] -= 1
            if not _NEEDED[key]:
                del _NEEDED[key]
                _UNDO.pop(key)()


def _dispatching_forward(module: nn.Module) -> Callable:
    own = type(module).forward

    def forward(*args, **kwargs):
        override = _OVERRIDES.get().get(id(module))
        return own(module, *args, **kwargs) if override is None else override(*args, **kwargs)
    return forward


@contextmanager
def forward_override(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Inside, `module(...)` runs `forward(...)` in this context; elsewhere, the module's own forward.
    The module is left as it came (no instance attribute) once the last override ends."""
    def install():  # an instance attribute shadows the method, for every context at once
        module.forward = _dispatching_forward(module)
        return lambda: delattr(module, "forward")
    with while_needed(("dispatching forward", id(module)), install):
        token = _OVERRIDES.set({**_OVERRIDES.get(), id(module): forward})
        try:
            yield
        finally:
            _OVERRIDES.reset(token)
