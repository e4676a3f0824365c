"""The entry point lmms-eval 0.7.x loads from the group ``lmms_eval.models`` (``pyproject.toml``):
a :class:`lmms_eval.models.registry_v2.ModelManifest` naming model id ``vtoken`` and its class
(a "simple" model: it gets the task's prompt text and visuals, not chat messages)."""

from __future__ import annotations

MODEL_ID = "vtoken"
CLASS_PATH = "vtoken.lmms.model.VTokenLMMS"

__all__ = ["MODEL_ID", "CLASS_PATH", "manifest"]


def manifest():
    """The manifest lmms-eval's registry registers (called by ``load_entrypoint_manifests``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
