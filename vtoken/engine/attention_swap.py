"""The decode steps' attention modules routed through an implementation of the engine's own, cheaply.

Each LLM attention module gets a private shallow copy of its ``config`` whose attention implementation
is the engine's (:func:`vtoken.hooks.private_attention_config`), for the decode steps only. Copying 32
transformers configs costs a batch-1 ``generate`` call about 2 ms of host time (transformers 5.17,
session 19's H100 profile), so :class:`AttentionSwap` keeps one copy per config object (the layers of a
model share one) and makes a new one only when a module's config object or one of that config's
attributes changed since (a nested value changed in place is seen by the shallow copy as well).
"""

from __future__ import annotations

from vtoken.hooks import private_attention_config


class AttentionSwap:
    """``swap(modules)`` gives each module its private config (implementation ``impl``, plus ``attrs``);
    returns ``undo``, a list of ``(module, original config)`` that :meth:`restore` puts back."""

    def __init__(self, impl: str, **attrs):
        self.impl, self.attrs = impl, attrs
        # id(config) -> (the config, its attributes then, its private copy); modules that share a config
        # (the layers of a model do) share the copy, as they shared the original
        self._kept: dict = {}

    def swap(self, modules) -> list:
        undo = []
        this_call: dict = {}  # id(config) -> its private copy, checked once a call
        try:
            for module in modules:
                cfg = module.config
                private = this_call.get(id(cfg))
                if private is None:
                    kept = self._kept.get(id(cfg))
                    if kept is None or kept[0] is not cfg or not _same_attributes(kept[1], vars(cfg)):
                        kept = (cfg, dict(vars(cfg)), private_attention_config(cfg, self.impl, **self.attrs))
                        self._kept[id(cfg)] = kept
                    private = this_call[id(cfg)] = kept[2]
                undo.append((module, cfg))
                _set_config(module, private)
        except BaseException:
            self.restore(undo)
            raise
        for key in set(self._kept) - set(this_call):  # configs no module holds now
            del self._kept[key]
        return undo

    @staticmethod
    def restore(undo: list) -> None:
        for module, original in undo:
            _set_config(module, original)


def _same_attributes(then: dict, now: dict) -> bool:
    """The same attribute names holding the same objects (identity: a value's own ``==`` may be
    costly, ambiguous (tensors) or raise)."""
    return len(then) == len(now) and all(now.get(k, _MISSING) is v for k, v in then.items())


_MISSING = object()


def _set_config(module, config) -> None:
    """``module.config = config`` without ``nn.Module.__setattr__``'s lookups where ``config`` is a
    plain attribute already (it is no parameter, buffer or sub-module)."""
    if "config" in module.__dict__:
        module.__dict__["config"] = config
    else:
        module.config = config
