"""Model adapters. :func:`get_adapter` picks one by the model's class; nothing else in vtoken
tests model classes."""

from __future__ import annotations

from vtoken.adapters.base import Adapter, VisualLayout
from vtoken.adapters.llava import LlavaAdapter, LlavaNextAdapter
from vtoken.adapters.qwen import QwenVLAdapter
from vtoken.errors import UnsupportedModelError

ADAPTERS = (LlavaAdapter, LlavaNextAdapter, QwenVLAdapter)


def supported_models() -> list:
    """Class names of the supported ``transformers`` models."""
    return [name for cls in ADAPTERS for name in cls.model_types]


def get_adapter(model) -> Adapter:
    import torch

    if not isinstance(model, torch.nn.Module):
        what = f"the class {model.__name__} itself" if isinstance(model, type) else f"{type(model).__name__} {model!r:.80}"
        raise UnsupportedModelError(
            f"vtoken prunes a loaded transformers model instance (e.g. "
            f"LlavaForConditionalGeneration.from_pretrained(...)); got {what}. Supported models: "
            f"{', '.join(supported_models())}"
        )
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.model_types:
            return cls(model)
    raise UnsupportedModelError(
        f"vtoken does not support {name}; supported models: {', '.join(supported_models())}"
    )


__all__ = ["Adapter", "VisualLayout", "get_adapter", "supported_models"]
