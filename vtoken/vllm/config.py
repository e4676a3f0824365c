"""The server's pruning configuration, read from the environment of the vLLM process.

``VTOKEN_METHOD`` (a vtoken method name), ``VTOKEN_KEEP`` (an int: tokens kept per image; a float
in (0, 1]: fraction of each image's tokens) and optionally ``VTOKEN_OPTIONS`` (a JSON object of
the method's options, e.g. ``{"seed": 1}``). vLLM starts its engine in child processes, which
inherit the environment, so one setting covers the API server and every worker.

Only methods that prune once, before the LLM, from the visual embeddings, the vision encoder's
attention (or from nothing but the image grid) run in vLLM: ``divprune``, ``random``, ``uniform``,
``fastervlm``, ``visionzip`` (merge mode included; encoder attention on Qwen2-VL and LLaVA) and
other layer-0 scorers reading only those signals. Anything else is refused with the reason (:func:`unsupported_reason`); what a given model
cannot provide (e.g. encoder attention on Qwen2.5-VL) is refused when vLLM builds the model
(:func:`model_unsupported_reason`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from vtoken.errors import PruningConfigError
from vtoken.methods import available_methods, build_plan, normalize_name
from vtoken.plan import Budget, Stage, is_decode_plan, tokens_for, validate_budget

ENV_METHOD, ENV_KEEP, ENV_OPTIONS = "VTOKEN_METHOD", "VTOKEN_KEEP", "VTOKEN_OPTIONS"
#: signals the vLLM plugin can give a scorer: the image's embeddings after the vision tower and
#: merger (what enters the LLM), the vision encoder's attention and keys (a probe in the tower's
#: last block, :mod:`vtoken.vllm.model`), plus the layout fields every SegmentSignals has
VISION_SIGNALS = frozenset({"vision_attn", "vision_keys"})
SUPPORTED_SIGNALS = frozenset({"hidden"}) | VISION_SIGNALS

IN_LLM_HELP = (
    "it prunes inside the LLM (a stage at decoder layer {layer}), which vLLM cannot do from a plugin: "
    "vLLM writes every prompt token's keys and values into its paged KV cache at each layer and its "
    "attention kernels read fixed block tables, so dropping tokens after layer 0 would need engine "
    "changes (a per-layer sequence length in the scheduler's block tables and attention metadata, "
    "the attention scores of the layer before the stage, and the KV blocks of dropped tokens freed "
    "per layer). Use a method that prunes before the LLM (divprune, random, uniform) or vtoken with "
    "transformers (`apply_pruning`)."
)


@dataclass(frozen=True)
class PruneConfig:
    method: str
    keep: Budget
    stage: Stage = field(compare=False)

    def tokens_kept(self, original: int) -> int:
        """Visual tokens an image of ``original`` tokens keeps (the placeholder count vLLM emits)."""
        return tokens_for(self.keep, original)


def parse_keep(text: str) -> Budget:
    """``"64"`` -> 64 tokens, ``"0.25"`` -> a fraction; anything else raises PruningConfigError."""
    try:
        value = int(text) if text.strip().lstrip("+").isdigit() else float(text)
    except ValueError:
        raise PruningConfigError(f"{ENV_KEEP} must be an int (tokens per image) or a float in (0, 1]; got {text!r}")
    return validate_budget(value, what=ENV_KEEP)


def unsupported_reason(stages) -> str | None:
    """Why a plan cannot run in vLLM's plugin, or None when it can."""
    if is_decode_plan(stages):
        return "its stages act during decoding on transformers' dynamic KV cache, which vLLM's paged cache is not"
    if len(stages) != 1:
        layers = ", ".join(str(s.layer) for s in stages)
        return f"it has {len(stages)} stages (layers {layers}); " + IN_LLM_HELP.format(layer=stages[-1].layer)
    stage = stages[0]
    if stage.layer != 0:
        return IN_LLM_HELP.format(layer=stage.layer)
    needs = frozenset(getattr(stage.scorer, "needs", frozenset()))
    if not needs <= SUPPORTED_SIGNALS:
        missing = ", ".join(sorted(needs - SUPPORTED_SIGNALS))
        return (f"its scorer needs signals the vLLM plugin does not capture ({missing}); it gives only the "
                "visual embeddings entering the LLM ('hidden') and the vision encoder's attention and keys "
                "('vision_attn', 'vision_keys'). Text signals would need the prompt's text embeddings at "
                "encoder time.")
    if getattr(stage.scorer, "adaptive", False):
        return "its scorer chooses its own token count, but vLLM must size each image's placeholders before the encoder runs"
    if stage.mode not in ("select", "merge"):
        return f"mode {stage.mode!r} is not supported in vLLM (only 'select' and 'merge')"
    return None


def needs_vision(stage) -> bool:
    """True when the stage's scorer reads the vision encoder's attention or keys."""
    return bool(frozenset(getattr(stage.scorer, "needs", frozenset())) & VISION_SIGNALS)


def model_unsupported_reason(stage, model: str, vision_probe: bool, cls_attention: bool) -> str | None:
    """Why ``stage`` cannot run on vLLM's ``model``, or None when it can: the model has no
    vision-encoder probe (``vision_probe``) for a scorer reading encoder attention, or no [CLS]
    token (``cls_attention``) for a scorer that needs [CLS] attention (as ``apply_pruning`` refuses)."""
    name = stage.scorer.name
    if needs_vision(stage) and not vision_probe:
        return (f"{name!r} reads vision-encoder attention, which vtoken's vLLM plugin records on Qwen2-VL and "
                f"LLaVA (one vision_feature_layer) only, not on {model} (Qwen2.5-VL: apply_pruning does not map "
                "its windowed tower either); "
                "use divprune, random or uniform")
    if getattr(stage.scorer, "needs_cls_attention", False) and not cls_attention:
        return (f"{name!r} reads the vision encoder's [CLS] attention, which {model}'s tower does not have "
                "(as with apply_pruning); use fastervlm, visionzip or divprune")
    return None


def make_config(method: str, keep, options: dict | None = None) -> PruneConfig:
    """A checked PruneConfig; raises PruningConfigError for unknown or unsupported methods."""
    name = normalize_name(method)
    if name not in available_methods():
        raise PruningConfigError(f"{ENV_METHOD}={method!r} is not a vtoken method; known: {', '.join(available_methods())}")
    stages = build_plan(name, validate_budget(keep, what=ENV_KEEP), **(options or {}))
    why = unsupported_reason(stages)
    if why is not None:
        raise PruningConfigError(f"method {name!r} cannot run in vLLM: {why}")
    return PruneConfig(method=name, keep=stages[0].keep, stage=stages[0])


def from_env(environ=None) -> PruneConfig | None:
    """The configuration set by ``VTOKEN_METHOD`` / ``VTOKEN_KEEP`` / ``VTOKEN_OPTIONS``, or None
    when ``VTOKEN_METHOD`` is unset or empty (no pruning)."""
    env = os.environ if environ is None else environ
    method = env.get(ENV_METHOD, "").strip()
    if not method:
        return None
    keep_text = env.get(ENV_KEEP, "").strip()
    if not keep_text:
        raise PruningConfigError(f"{ENV_METHOD}={method} is set but {ENV_KEEP} is not (e.g. {ENV_KEEP}=0.25 or {ENV_KEEP}=64)")
    options = {}
    if env.get(ENV_OPTIONS, "").strip():
        try:
            options = json.loads(env[ENV_OPTIONS])
        except json.JSONDecodeError as exc:
            raise PruningConfigError(f"{ENV_OPTIONS} must be a JSON object: {exc}")
        if not isinstance(options, dict):
            raise PruningConfigError(f"{ENV_OPTIONS} must be a JSON object, got {options!r}")
    return make_config(method, parse_keep(keep_text), options)


__all__ = ["PruneConfig", "from_env", "make_config", "parse_keep", "unsupported_reason", "model_unsupported_reason",
           "needs_vision", "SUPPORTED_SIGNALS", "VISION_SIGNALS",
           "ENV_METHOD", "ENV_KEEP", "ENV_OPTIONS"]
