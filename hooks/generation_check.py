"""transformers' legacy-generation-parameters check, answered once per configuration state.

On every ``generate`` call without a ``generation_config``, transformers checks whether
``model.config`` carries generation parameters (a legacy way of setting them, refused since 5.0):
``PreTrainedConfig._get_generation_parameters()``. Up to some 5.2x release that check builds a
default instance of the config class and serialises it: 7.1 ms of host time per call for
LLaVA-1.5-7B's config on a 2-core CPU under transformers 5.17 (0.07 ms under 5.25, which reads the
dataclass fields instead), all of it before the first GPU work of the call is queued, so all of it
in the time to first token.

The check's answer depends on the config's class and on the values of the generation-parameter
keys it holds, nothing else, in both implementations. :func:`cached_generation_check` answers it
from a cache keyed by exactly those (the class, and the ``repr`` of each key's value), running
transformers' own check on the first call of each state: a config changed between calls (the
legacy usage the check exists to refuse) is checked again and refused as before. Where
transformers' check is already cheap (the first call of a config class takes under
:data:`SLOW_CHECK_S`: 5.25's 0.07 ms), keying the cache would cost more than it saves (the ``repr`` of
every key's value, ~0.1 ms), so that class's check is left as transformers has it.
"""

from __future__ import annotations

import contextlib
import time

_MISSING = object()
_RESULTS: dict = {}  # (config class, repr of the key values) -> the check's answer
_MAX_RESULTS = 256
_FAST_CLASSES: set = set()  # config classes whose own check took under SLOW_CHECK_S: left alone
#: a config class's check is answered from the cache only if its first call took at least this long
SLOW_CHECK_S = 0.5e-3
_KEYS: list = []  # GenerationConfig's generation-parameter names (1.3 ms to list under 5.17: once)


def _keys() -> list:
    if not _KEYS:
        from transformers import GenerationConfig

        _KEYS.extend(GenerationConfig._get_default_generation_params())
    return _KEYS


def generation_check_key(config) -> tuple:
    """What ``config._get_generation_parameters()`` reads: its class and its generation-key values."""
    values = []
    for key in _keys():
        try:
            values.append(getattr(config, key, _MISSING))
        except Exception:  # noqa: BLE001 - a property that raises counts as absent, as in hasattr
            values.append(_MISSING)
    return type(config), repr(values)


@contextlib.contextmanager
def cached_generation_check(config):
    """Within the block, ``config._get_generation_parameters()`` answers from the cache (see the
    module docstring); the instance attribute is removed on leaving."""
    original = getattr(config, "_get_generation_parameters", None)
    if (original is None or "_get_generation_parameters" in vars(config)  # no such check; or nested (the
            or type(config) in _FAST_CLASSES):                             # compile route); or cheap already
        yield
        return

    def check() -> dict:
        key = generation_check_key(config)
        result = _RESULTS.get(key)
        if result is None:
            if len(_RESULTS) >= _MAX_RESULTS:
                _RESULTS.clear()
            start = time.perf_counter()
            result = _RESULTS[key] = original()
            if time.perf_counter() - start < SLOW_CHECK_S:
                _FAST_CLASSES.add(type(config))
        return dict(result)

    object.__setattr__(config, "_get_generation_parameters", check)
    try:
        yield
    finally:
        vars(config).pop("_get_generation_parameters", None)
