"""The decode steps' attention modules routed through an implementation of the engine's own, cheaply.

Each LLM attention module gets a private shallow copy of its ``config`` whose attention implementation
is the engine's (:func:`vtoken.hooks.private_attention_config`), for the decode steps only. Copying 32
transformers configs costs a batch-1 ``generate`` call about 2 ms of host time (transformers 5.17,
session 19's H100 profile), so :class:`AttentionSwap` keeps each copy and makes a new one only when the
module's config object or one of its attributes changed since (a nested value changed in place is seen
by the shallow copy as well).
"""

from __future__ import annotations

from vtoken.hooks import private_attention_config


class AttentionSwap:
    """``swap(modules)`` gives each module its private config (implementation ``impl``, plus ``attrs``);
    returns ``undo``, a list of ``(module, original config)`` that :meth:`restore` puts back."""

    def __init__(self, impl: str, **attrs):
        self.impl, self.attrs = impl, attrs
        self._kept: dict = {}  # module -> (its config, that config's attributes then, the private copy)

    def swap(self, modules) -> list:
        undo = []
        for module in modules:
            cfg = module.config
            kept = self._kept.get(module)
            if kept is None or kept[0] is not cfg or kept[1] != cfg.__dict__:
                kept = (cfg, dict(cfg.__dict__), private_attention_config(cfg, self.impl, **self.attrs))
                self._kept[module] = kept
            undo.append((module, cfg))
            module.config = kept[2]
        return undo

    @staticmethod
    def restore(undo: list) -> None:
        for module, original in undo:
            module.config = original
