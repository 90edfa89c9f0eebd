"""Values derived from a model's weights, kept until the weights change."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.weak import WeakIdKeyDictionary


def kept_while_unchanged(cache: WeakIdKeyDictionary, owner, tensors, build: Callable):
    """`build()` for `owner`, kept in `cache` while `tensors` are the same tensors, unchanged in
    place (their version counters) and holding the same storage (a `.data` swap, as `model.half()`
    makes, leaves the counter as it was): for values derived from weights, rebuilt when they change."""
    state = tuple((id(t), t._version, t.data_ptr(), t.dtype) for t in tensors)
    cached = cache.get(owner)
    if cached is None or cached[0] != state:
        cached = (state, build())
        cache[owner] = cached
    return cached[1]
