"""``apply_pruning``'s machinery: attach the hooks, and the handle that removes them.

The handle (:class:`PruningHandle`) is the only owner of pruning state for its model:
``remove()`` restores the model exactly (hooks removed, private attention configs and instance
attributes undone); it is also a context manager; ``stats`` describes the last pruned prefill.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional

from vtoken.adapters import get_adapter
from vtoken.errors import AlreadyPrunedError, HandleRemovedError, PruningConfigError
from vtoken.hooks.probe import chain_probe, install_probe
from vtoken.hooks.call_state import GenerateSession
from vtoken.hooks.checkpointing import checkpointing
from vtoken.hooks.generation_check import cached_generation_check
from vtoken.hooks.host_checks import install_placeholder_mask, without_full_mask
from vtoken.hooks.kv_cache import STATE_ATTR, fixed_slots_of
from vtoken.hooks.runtime import Runtime
from vtoken.hooks.stage import check_budget
from vtoken.hooks.stats import build_stats
from vtoken.kernels import patch_vision_varlen
from vtoken.methods import build_plan, method_spec, with_model_depth
from vtoken.plan import split_plan, validate_budget, validate_plan

HANDLE_ATTR = "_vtoken_handle"
BACKENDS = ("auto", "torch", "triton")


class PruningHandle:
    """Returned by :func:`vtoken.apply_pruning`.

    Attributes: ``plan`` (list of Stage); ``method``: the registered (normalised) name of the
    preset the plan was built from (``apply_pruning(model, method="FastV")`` -> ``"fastv"``), or
    None when an explicit ``plan=`` was given (then ``method`` is ignored: the plan is nobody's
    preset, whatever its scorers).
    """

    def __init__(self, model, runtime: Runtime, method, undo: list):
        self.model = model
        self.runtime = runtime
        self.plan = runtime.plan
        self.method = method
        self._undo = undo
        self.active = True
        #: the runtime of the plan's decode-time stages (:mod:`vtoken.hooks.decode_runtime`), or None
        self.decode_runtime = None

    @property
    def decode_plan(self) -> list:
        """The plan's decode-time stages (:class:`vtoken.plan.DecodeStage`); empty when it has none."""
        return [] if self.decode_runtime is None else list(self.decode_runtime.plan)

    @property
    def stats(self):
        """:class:`vtoken.hooks.stats.PruneStats` of the last pruned prefill in this thread (or
        in any thread if this one has none), or None before the first one."""
        rt = self.runtime
        last = getattr(rt.tls, "last", None)
        if last is None:
            if rt.last_trace is None:
                return None
            last = (rt.last_trace, rt.last_meta)
        trace, meta = last
        return build_stats(trace, meta.layout, meta.prepared.vis_ordinal, rt.num_layers, meta.orig_valid)

    @property
    def prefills(self) -> int:
        """Number of pruned prefills this handle has run in this thread. ``stats`` describes the
        latest; a caller that reads ``stats`` after each of its batches can check that this count
        moved (a batch whose prefill skipped pruning leaves it, and ``stats``, as they were)."""
        return getattr(self.runtime.tls, "prefills", 0)

    # ------------------------------------------------ the surface engines use (vtoken.engine, plugins)
    @property
    def reads_vision_encoder(self) -> bool:
        """Whether the plan reads vision-encoder attention (required or optional): captured by
        Python probes inside the vision tower, which a CUDA-graph replay of the tower would skip."""
        return bool(self.runtime.needs_vision or self.runtime.vision_probed)

    @property
    def layer_stage(self) -> tuple:
        """Per decoder layer: the index of the stage whose layout it sees (-1 before the first)."""
        return tuple(self.runtime.layer_stage)

    def pruned_layouts(self, cache) -> Optional[list]:
        """The layouts a pruned prefill recorded on ``cache`` (the KV cache object it filled): per
        stage, (B, N_i) bool validity of the slots its layers cached; None when ``cache`` holds no
        pruned prefill. Raises if the prefill recorded another number of stages than the plan."""
        state = getattr(cache, STATE_ATTR, None)
        if state is None:
            return None
        if len(state.stages) != len(self.plan):
            raise RuntimeError(f"the pruned prefill recorded {len(state.stages)} stages of {len(self.plan)}")
        return [s.valid for s in state.stages]

    def decode_layouts(self, cache) -> Optional[dict]:
        """What a decode-time plan (:class:`vtoken.plan.DecodeStage`) did to ``cache`` (the KV cache a
        ``generate`` call filled, e.g. ``out.past_key_values``): per pruned layer, ``(positions,
        valid)``, both (B, P): the original position of each slot the stage left (-1 padding; in
        ``"quantize"`` mode the low-bit slots first), before the tokens appended after it. None
        when ``cache`` holds no decode-time record."""
        from vtoken.hooks.decode_cache import DECODE_ATTR

        state = getattr(cache, DECODE_ATTR, None)
        if state is None:
            return None
        return {layer: (rec.positions, rec.valid) for layer, rec in sorted(state.layers.items())}

    def decode_prefill(self, cache):
        """What a decode-time plan recorded at the prefill that filled ``cache`` (a
        :class:`vtoken.hooks.decode_record.DecodePrefill`: the prompt's visual segments, the
        per-stage budgets, each ranked layer's accumulated prompt scores), for an engine that runs
        the plan's :class:`vtoken.plan.DecodeStage` s on its own KV storage; None when the plan has
        no decode stages or the prefill recorded nothing (nothing can be evicted)."""
        return None if self.decode_runtime is None else self.decode_runtime.prefill_record(cache)

    def decode_accumulating(self, done: int) -> dict:
        """layer -> decode scorer: the layers whose attention scores keep accumulating (and with which
        scorer's rule) during decode steps once the first ``done`` decode stages have run."""
        return {} if self.decode_runtime is None else self.decode_runtime.accumulating_layers(done)

    @contextlib.contextmanager
    def deferred_checks(self):
        """Within the block (this thread), the budget checks of each pruned forward (a non-adaptive
        scorer kept exactly its budget per segment; reading the counts waits for the device) are
        collected instead of run when the forward ends, and run when the block ends without an
        error: an engine opens it around a prefill whose output it reads back anyway, so that no
        wait falls between the prefill's eager part and its captured tail. The checks raise what
        they raise at a forward's end."""
        tls = self.runtime.tls
        outer, tls.deferred_checks = getattr(tls, "deferred_checks", None), []
        pending = tls.deferred_checks
        try:
            yield
        finally:
            tls.deferred_checks = outer
        for name, got, budget in pending:
            check_budget(name, got, budget)

    @contextlib.contextmanager
    def host_inputs(self, ids_host: torch.Tensor, mask_host: Optional[torch.Tensor] = None):
        """Within the block (this thread), a pruned forward whose ``input_ids`` have ``ids_host``'s
        shape takes ``ids_host`` (and ``mask_host``, the 2-D mask as bool) as its host copies instead
        of copying them from the device: an engine that captures the whole prefill in a CUDA graph
        (which cannot hold a copy to the host) makes them before the capture. Both on the CPU.
        Yields a list that receives each such forward's host plan (device tensors its graph reads,
        which the plan cache may drop: the caller keeps them as long as the graph)."""
        tls = self.runtime.tls
        plans: list = []
        outer, tls.host_inputs = getattr(tls, "host_inputs", None), (ids_host, mask_host, plans)
        try:
            yield plans
        finally:
            tls.host_inputs = outer

    def on_remove(self, undo) -> None:
        """Run ``undo()`` at :meth:`remove` (before the handle's own hooks come off): how an engine
        that wraps the model for this handle (``compile=True``'s ``generate`` route) is undone with it."""
        if not self.active:
            raise HandleRemovedError("this pruning handle was removed; call vtoken.apply_pruning(model, ...) again")
        self._undo.append(undo)

    def remove(self) -> None:
        """Detach everything; the model behaves exactly as before ``apply_pruning``. Calling it again
        does nothing (``stats`` still describes the last pruned prefill)."""
        if not self.active:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        self.model.__dict__.pop(HANDLE_ATTR, None)
        self.runtime.attached = False  # caches it pruned refuse to be continued without it
        if self.decode_runtime is not None:
            self.decode_runtime.attached = False
        self.active = False

    def __enter__(self):
        if not self.active:
            raise HandleRemovedError(
                "this pruning handle was removed and prunes nothing any more; call vtoken.apply_pruning(model, ...) "
                "again for a new handle"
            )
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self) -> str:
        return f"PruningHandle(method={self.method!r}, stages={[(s.layer, s.scorer.name, s.keep) for s in self.plan]}, active={self.active})"


def attach(model, method="fastv", keep=64, plan=None, backend: str = "auto", vision_varlen: bool = True,
           **options) -> PruningHandle:
    model = _uncompiled(model)
    if HANDLE_ATTR in getattr(model, "__dict__", {}):
        raise AlreadyPrunedError(
            "this model already has vtoken pruning applied; call handle.remove() (or use the handle as a "
            "context manager) before applying again"
        )
    adapter = get_adapter(model)
    if backend not in BACKENDS:
        raise PruningConfigError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if plan is None and method is None:
        raise PruningConfigError(
            "apply_pruning needs a method name (method='fastv'; see vtoken.available_methods()) or an explicit "
            "plan (plan=[vtoken.Stage(layer, scorer, keep), ...]); got method=None and plan=None"
        )
    if plan is None:
        keep = validate_budget(keep)
        plan = build_plan(method, keep, **with_model_depth(method, options, len(adapter.layers),
                                                          adapter.checkpoint_dir))
        method = method_spec(method).name  # the registered name ("FastV" -> "fastv")
    else:
        if options:
            raise PruningConfigError(f"options {sorted(options)} apply to method presets, not to an explicit plan")
        method = None  # an explicit plan: no preset name (see PruningHandle.method)
    plan = validate_plan(plan, num_layers=len(adapter.layers))
    plan, decode = split_plan(plan)
    if not plan:  # decode-time stages only
        return _attach_decode(model, adapter, decode, method, backend)
    runtime = Runtime(adapter, plan, backend=backend)
    decode_runtime = None
    undo = []
    try:
        top_params = _param_names(model)
        # a step after the prefill on a fixed-slot cache (fixed_slots_of: traceable) skips the eager
        # hook bodies: transformers compiles those steps, and only the layers' masks change
        h0 = model.register_forward_pre_hook(
            lambda m, a, kw: None if fixed_slots_of(kw) is not None else runtime.on_model_call(top_params, a, kw),
            with_kwargs=True)
        undo.append(h0.remove)
        mm = adapter.multimodal_model
        mm_params = _param_names(mm)
        h1 = mm.register_forward_pre_hook(
            lambda m, a, kw: None if fixed_slots_of(kw) is not None else runtime.on_multimodal_call(
                {**dict(zip(mm_params, a)), **kw}), with_kwargs=True
        )
        h2 = mm.register_forward_hook(
            lambda m, a, kw, out: None if fixed_slots_of(kw) is not None else runtime.on_multimodal_done(),
            with_kwargs=True, always_call=True)
        tm_params = _param_names(adapter.text_model)
        h3 = adapter.text_model.register_forward_pre_hook(functools.partial(_text_hook, runtime, tm_params),
                                                          with_kwargs=True)
        undo += [h1.remove, h2.remove, h3.remove]
        unpatch = install_placeholder_mask(mm, runtime)  # counted on the host: no wait after the tower
        if unpatch is not None:
            undo.append(unpatch)
        for idx in range(runtime.first_layer, runtime.num_layers):
            hook = functools.partial(_layer_hook, runtime, idx)
            undo.append(adapter.layers[idx].register_forward_pre_hook(hook, with_kwargs=True).remove)
        for layer in sorted(runtime.probe_needs):
            undo.append(install_probe(adapter.layers[layer].self_attn, runtime.probe(layer), runtime))
        cls_readers = sorted({st.scorer.name for st in plan if getattr(st.scorer, "needs_cls_attention", False)})
        if cls_readers and not getattr(adapter, "vision_attn_from_cls", False):
            raise PruningConfigError(
                f"{', '.join(cls_readers)} reads the vision encoder's [CLS] attention, which vtoken cannot provide "
                f"on {type(model).__name__} (its tower has no [CLS] token, or vtoken does not map it yet; LLaVA "
                f"with a CLIP tower has it); use vispruner or an LLM-side method (e.g. fastv) instead"
            )
        if runtime.needs_vision or runtime.wants_vision:
            module = adapter.vision_attention_module()
            if module is None and runtime.needs_vision:
                raise PruningConfigError(
                    f"this plan reads vision-encoder attention, which vtoken cannot map to LLM tokens on "
                    f"{type(model).__name__} yet; use an LLM-side method (e.g. fastv) instead"
                )
            if module is not None:  # optional readers (FlowCut's relay) go without it where it is None
                undo.append(install_probe(module, runtime.vision_probe()))
                runtime.vision_probed = True
        undo += adapter.install(runtime)
        tower = adapter.varlen_vision_tower() if vision_varlen else None
        if tower is not None:  # the kernel where it runs (CUDA, no gradients); the model's own forward elsewhere
            probed = adapter.vision_attention_module() if runtime.vision_probed else None
            try:
                undo.append(patch_vision_varlen(tower, backend=backend, triton_only=True, skip=(probed,)))
            except ValueError:  # the user patched it already, or this version's tower has no such attention
                pass
        undo.append(_wrap_generate(model, runtime))
        if decode:  # after the prefill runtime's hooks: the decode runtime's masks and probes come last
            decode_runtime = _install_decode(model, adapter, decode, backend, undo, prefill_runtime=runtime)
    except Exception:
        _undo_all(undo)
        raise
    return _handle_on(model, runtime, method, undo, decode_runtime)


def _attach_decode(model, adapter, plan, method, backend) -> PruningHandle:
    """``attach`` for a plan of decode-time stages (:mod:`vtoken.hooks.decode_runtime`): pre-hooks on
    the multimodal model, the language model and every decoder layer, probes on the layers whose
    scores a stage reads, the adapter's patches and the ``generate`` wrapper."""
    undo = []
    try:
        runtime = _install_decode(model, adapter, plan, backend, undo)
    except Exception:
        _undo_all(undo)
        raise
    return _handle_on(model, runtime, method, undo, runtime)


def _install_decode(model, adapter, plan, backend, undo: list, prefill_runtime=None):
    """Install a :class:`~vtoken.hooks.decode_runtime.DecodeRuntime` for the decode-time stages
    ``plan`` (after ``prefill_runtime``'s hooks where the plan also has prefill stages: a probed
    layer's probes chain); its undo callables go to ``undo``. Returns the runtime."""
    from vtoken.hooks.decode_runtime import DecodeRuntime

    runtime = DecodeRuntime(adapter, plan, backend=backend, prefill_runtime=prefill_runtime)
    mm = adapter.multimodal_model
    mm_params, tm_params = _param_names(mm), _param_names(adapter.text_model)
    hooks = [
        mm.register_forward_pre_hook(
            lambda m, a, kw: runtime.on_multimodal_call({**dict(zip(mm_params, a)), **kw}), with_kwargs=True),
        mm.register_forward_hook(lambda m, a, kw, out: runtime.on_multimodal_done(), with_kwargs=True,
                                 always_call=True),
        adapter.text_model.register_forward_pre_hook(
            lambda m, a, kw: runtime.on_text_call({**dict(zip(tm_params, a)), **kw}), with_kwargs=True),
    ]
    hooks += [adapter.layers[idx].register_forward_pre_hook(
        functools.partial(lambda i, m, a, kw: runtime.on_layer(i, a, kw), idx), with_kwargs=True)
        for idx in range(runtime.num_layers)]
    undo += [h.remove for h in hooks]
    for layer in runtime.probed_layers:
        module = adapter.layers[layer].self_attn
        if "_vtoken_probe" in module.__dict__:  # the prefill runtime probes this layer too
            undo.append(chain_probe(module, runtime.probe(layer)))
        else:
            undo.append(install_probe(module, runtime.probe(layer)))
    if prefill_runtime is None:  # the prefill runtime installed the adapter's patches
        undo += adapter.install(runtime)
    undo.append(_wrap_generate(model, runtime))
    return runtime


def _undo_all(undo: list) -> None:
    for u in reversed(undo):
        u()


def _handle_on(model, runtime, method, undo: list, decode_runtime=None) -> PruningHandle:
    """The handle of an attached ``runtime`` (and ``decode_runtime``), recorded on ``model``."""
    handle = PruningHandle(model, runtime, method, undo)
    handle.decode_runtime = decode_runtime
    model.__dict__[HANDLE_ATTR] = handle
    return handle


def _uncompiled(model):
    """The module a ``torch.compile(model)`` wrapper (``OptimizedModule``) compiles: the hooks go on
    it, and the wrapper's ``generate`` / ``forward`` (which delegate to it) see them."""
    orig = getattr(model, "_orig_mod", None)
    if orig is not None and type(model).__name__ == "OptimizedModule":
        return orig
    return model


def _param_names(module) -> list:
    """Positional parameter names of ``module.forward`` (to read positional call arguments)."""
    params = inspect.signature(module.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _text_hook(runtime, names, module, args, kwargs):
    """The language model's pre-hook: the runtime reads the call; a pruned prefill whose mask is all
    ones goes on without it (:func:`vtoken.hooks.host_checks.without_full_mask`)."""
    if fixed_slots_of(kwargs) is not None:
        return None
    runtime.on_text_call({**dict(zip(names, args)), **kwargs})
    ctx = runtime.ctx
    if ctx is None or ctx.mode != "prefill":  # a decode step: one attribute read, no config lookup
        return None
    return without_full_mask(ctx, runtime.attn_impl(), args, kwargs)


def _layer_hook(runtime, idx, module, args, kwargs):
    fixed = fixed_slots_of(kwargs)
    if fixed is not None:
        return runtime.on_fixed_slot_step(idx, fixed, args, kwargs)
    return runtime.on_layer(idx, args, kwargs, checkpointing(module))


def _wrap_generate(model, runtime):
    """Instance-level ``generate`` wrapper: a session per call, so no-cache generation re-applies
    the prompt's pruning decisions instead of re-scoring a growing sequence."""
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        previous = getattr(runtime.tls, "session", None)
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        shape = tuple(ids.shape) if getattr(ids, "ndim", 0) == 2 else (None, None)
        runtime.tls.session = GenerateSession(batch=shape[0], prompt_len=shape[1])
        # transformers >= 5.2x encodes the pixels before the first forward and drops the encoder's
        # inputs (Qwen's image_grid_thw): the layout reads them from the session instead
        runtime.tls.session.layout_inputs = {k: kwargs[k] for k in (runtime.adapter.layout_inputs or ())
                                             if kwargs.get(k) is not None}
        runtime.discard_vision_captures()  # generate may run the encoders before the first forward
        try:
            with cached_generation_check(model.config):  # transformers' per-call check, once per state
                return original(*args, **kwargs)
        finally:
            runtime.tls.session = previous

    model.generate = generate
    return lambda: model.__dict__.pop("generate", None)


def handle_of(model) -> Optional[PruningHandle]:
    """The :class:`PruningHandle` attached to ``model`` by :func:`vtoken.apply_pruning`, or None."""
    return getattr(model, "__dict__", {}).get(HANDLE_ATTR)

