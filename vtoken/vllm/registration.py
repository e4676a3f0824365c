"""The entry point vLLM loads from the group ``vllm.general_plugins`` (``pyproject.toml``) in
every process it starts (API server, engine core, workers).

With ``VTOKEN_METHOD`` set it checks the configuration (an unknown method, or one that prunes inside
the LLM, stops the server here with the reason) and registers vtoken's Qwen2-VL, Qwen2.5-VL and LLaVA
classes over vLLM's own under the same architecture names, so that checkpoints load unchanged.
Without ``VTOKEN_METHOD`` it does nothing.
"""

from __future__ import annotations

from vtoken.vllm.config import from_env

#: architecture name in config.json -> "module:class" of the pruning model
MODELS = {
    "Qwen2VLForConditionalGeneration": "vtoken.vllm.model:PrunedQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "vtoken.vllm.model:PrunedQwen2_5_VL",
    "LlavaForConditionalGeneration": "vtoken.vllm.model:PrunedLlava",
}


def register() -> None:
    config = from_env()
    if config is None:
        return
    from vllm import ModelRegistry

    for arch, cls in MODELS.items():
        ModelRegistry.register_model(arch, cls)


__all__ = ["MODELS", "register"]
