"""Static-cache decode: preallocated KV buffers, kept-index lists, ``gather_attend``, CUDA graphs.

``model.generate`` (the default path) decodes through ``transformers``' dynamic cache: every step
is launched from Python layer by layer, and a 7B model's decode is bound by those launches (about
1.3 ms per layer on an H100 whatever the context, docs/DESIGN.md section 7), so a shorter pruned KV
cache barely shows. :class:`StaticDecoder` is the serving-style path:

1. **Prefill** runs the model's own forward (pruned by the attached :func:`vtoken.apply_pruning`
   handle, if any) with a dynamic cache; on CUDA it stops at the last pruning stage (the first
   decoder layer when unpruned) and runs the remaining layers and the LM head as one CUDA graph
   that writes their keys/values straight into the static buffers of step 2 (CLIP vision towers
   are replayed as graphs too). Graphs are kept per input shape and replayed by later calls.
2. **Static buffers**: each decoder layer gets a preallocated KV buffer
   ``[B, Hkv, N_l + T, D]`` (``N_l`` = that layer's prefill length after pruning, ``T`` = new
   tokens), the prefill keys/values copied in. Padding and pruned-away slots are never attended:
   each group of layers sharing a layout has a per-sample kept-index list ``[B, N_l + T]`` (the
   valid prefill slots in order, then the slots of the tokens to come) and a kept count
   ``[B]`` that grows by one per step. Counts are ragged across the batch.
3. **Decode steps** run the model's own decoder layers on one token per sample, with the
   attention implementation of every attention module swapped (on a private config copy) to
   :func:`vtoken.kernels.gather_attend` over the buffers, and a cache object that writes the new
   key/value into slot ``N_l + t``. Every shape is static and no step syncs with the host, so the
   whole step (embedding -> layers -> lm head -> argmax) is captured once in a CUDA graph and
   replayed.

Positions: a new token's position is the sample's largest prefill position + 1 + t (for 1-D RoPE
and for Qwen's M-RoPE, where the three components of a generated token are equal); pruning never
changes it (original positions, docs/DESIGN.md section 3).

Decoding is greedy (argmax, no logits processors), which is what ``model.generate(do_sample=False)``
does with a default generation config; finished rows are padded after their EOS as ``generate``
does, and the output stops when every row has finished. ``next_token`` (logits -> tokens, between
steps) lets ``apply_pruning(..., compile=True)`` sample (:mod:`vtoken.engine.generate_route`).
Beams and multi-turn continuation stay on ``model.generate``.

Decode-time stages (a handle whose plan holds :class:`vtoken.plan.DecodeStage` s: ``a2sf``,
``lookm``, ``zipvl_kv``): the prefill runs eagerly in full (its attention is scored by the
handle's probes), every layer gets its own kept-index list, and :mod:`vtoken.engine.static_stages`
edits the lists (merges into the buffers, stores low-bit entries) at each stage's step, between
two decode steps; graphs are captured once per phase between stages. Plans that also prune in the
prefill, and ``prefill_batch``, are refused there.

Modules: :mod:`vtoken.engine.static_kv` (the buffers and kept-index lists),
:mod:`vtoken.engine.merged_projections` (``fused_ops``' one GEMM for q/k/v and one for gate/up),
:mod:`vtoken.engine.graphs` (capture / replay, the per-shape session), :mod:`vtoken.engine.prefill`
(the prefill and its captured tail), :mod:`vtoken.engine.static_stages` (decode-time stages), this
module (the decode step, the attention swap, ``generate``).
"""

from __future__ import annotations

import inspect
import time
from typing import Optional

import torch

from vtoken.adapters import get_adapter
from vtoken.engine.attention_swap import AttentionSwap
from vtoken.engine.eos import CHECK_EVERY, EndWatch, finish, special_ids
from vtoken.engine.graphs import _GraphedForward, _Session, capture, graph_mode
from vtoken.engine.merged_projections import MergedProjections
from vtoken.engine.prefill import _check_same_visual_inputs, _Prefill, _slice_inputs
from vtoken.engine.static_kv import _KVBuffers, LayoutGroup, StaticKV
from vtoken.engine.static_stages import decode_loop, runnable_decode_plan, StaticStages
from vtoken.engine.static_kv import _kept_index  # noqa: F401 - importable from here as before the split
from vtoken.errors import PruningConfigError, UnsupportedCallError
from vtoken.hooks import register_attention_implementation

__all__ = ["STATIC_IMPL", "LayoutGroup", "StaticDecoder", "StaticKV"]

STATIC_IMPL = "vtoken_static"


# ------------------------------------------------------------------------------------ attention
def _static_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention implementation used inside decode steps: ``query [B, H, 1, D]`` over the layer's
    static buffers ``key``/``value`` ``[B, Hkv, L, D]`` read through its kept-index list."""
    from vtoken.kernels import gather_attend

    decoder = module.config._vtoken_static
    if decoder.stages is not None:  # a decode-time plan: its lists, low-bit reads and score accumulation
        scale = scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)
        return decoder.stages.attend(module.layer_idx, query, key, value, scale, decoder.backend).transpose(1, 2), None
    group = decoder.groups[decoder.layer_group[module.layer_idx]]
    out = gather_attend(query, key, value, group.idx, group.count, scale=scaling, backend=decoder.backend)
    return out.transpose(1, 2), None


def _register() -> None:
    register_attention_implementation(STATIC_IMPL, _static_attention)


class StaticDecoder(_Prefill, _KVBuffers):
    """Greedy generation with static KV buffers, kept-index lists and (on CUDA) CUDA graphs.

    ``StaticDecoder(model).generate(**inputs, max_new_tokens=T)`` returns what
    ``model.generate(**inputs, max_new_tokens=T, do_sample=False)`` returns (prompt ids followed
    by the new tokens, ``[B, N + T']``), with or without a :func:`vtoken.apply_pruning` handle on
    the model. After a call, :attr:`last` holds ``prefill_ms``, ``setup_ms``, ``capture_ms``,
    ``decode_ms_per_token`` (CUDA-synchronised when ``timing=True``), ``decode_steps`` (steps run:
    greedy decoding stops within :data:`vtoken.engine.eos.CHECK_EVERY` steps once every row has
    ended), ``kv_bytes`` (the static buffers: the kept session's, sized for its longest call),
    ``prefill_lengths`` (each layer group's prefill KV length), whether graphs ran,
    ``session_reused``, ``merged_projections`` (groups run as one GEMM) and ``decode_stages_run``
    (decode-time stages applied; :attr:`stages` holds them after the call).

    Graph prefill (``graph_prefill``, default on with ``cuda_graph``): the prefill runs eagerly up
    to the last pruning stage (vision tower, the full-length layers, scoring and the gather; with
    no handle: up to the first decoder layer), and the remaining layers, the final norm and the
    LM head run as one CUDA graph writing their keys/values straight into the static buffers. The
    graphs and buffers are kept for the next call with the same shapes and no more new tokens
    (serving engines capture per shape bucket the same way; ``last["session_reused"]``), with one
    decode graph per token choice (in-graph argmax, or ``next_token``); the first call of a shape,
    or of a longer generation, pays the capture (``capture_ms``).

    Args:
        model: a supported VLM (see :func:`vtoken.adapters.supported_models`).
        backend: ``gather_attend``'s backend: ``"auto"`` (Triton on CUDA), ``"triton"``, ``"torch"``.
        cuda_graph: capture the decode step in a CUDA graph (default: when the model is on CUDA);
            ``"emulate"``: the same captures replayed op by op on any device (tests: ``graph_emulator``).
        graph_prefill: split the prefill as above (default: as ``cuda_graph``); ``"all"``: the eager
            head too, one graph per prompt layout (:meth:`_graphed_head`). On the CPU ``True`` splits without graphs.
        fused_ops: run the decode step's layers with fused element-wise kernels
            (:mod:`vtoken.engine.fused_decode`; Llama-layout layers only, else a clear error).
            Exactly the model's arithmetic with the PyTorch references; with the Triton kernels the
            norms and the gate may differ by one bfloat16 rounding step.
        merge_projections: with ``fused_ops``, one GEMM for each layer's q/k/v and one for gate/up,
            the model's weights re-pointed at views of merged buffers (no extra memory;
            :mod:`vtoken.engine.merged_projections`) until :meth:`close`. Default: as ``fused_ops``.
        gemv: with ``fused_ops``, a batch-1 decode step's projections and LM head run as Triton GEMVs
            (:mod:`vtoken.kernels.gemv`), not cuBLAS GEMMs. Off by default: not yet timed on a GPU.
    """

    def __init__(self, model, *, backend: str = "auto", cuda_graph: bool | str | None = None,
                 graph_prefill: bool | str | None = None, fused_ops: bool = False,
                 merge_projections: Optional[bool] = None, gemv: bool = False):
        self.model = model
        self.adapter = get_adapter(model)
        self.backend = backend
        self.cuda_graph = graph_mode(cuda_graph)
        self.graph_prefill = graph_mode(graph_prefill, "graph_prefill", "all")
        cfg = self.adapter.text_config
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise PruningConfigError("StaticDecoder does not support sliding-window attention layers")
        self.fused_ops = bool(fused_ops)
        if self.fused_ops:
            from vtoken.engine.fused_decode import unsupported_reason

            reason = unsupported_reason(list(self.adapter.layers), self.adapter.text_model.norm, cfg)
            if reason is not None:
                raise PruningConfigError(f"fused_ops=True needs Llama-layout decoder layers; {reason}")
        if merge_projections and not self.fused_ops:
            raise PruningConfigError("merge_projections=True runs inside the fused layers: set fused_ops=True too")
        if gemv and not self.fused_ops:
            raise PruningConfigError("gemv=True runs inside the fused layers: set fused_ops=True too")
        self.gemv = bool(gemv)
        merge = self.fused_ops if merge_projections is None else bool(merge_projections)
        # merged at each generate where not merged and intact (new buffers: the kept session is dropped)
        self._projections = MergedProjections(self.adapter.layers) if merge else None
        self.groups: list = []
        self.layer_group: list = []
        self.last: dict = {}
        self.stages = None  # this call's decode-time stages (vtoken.engine.static_stages), if the plan has any
        self._session: Optional[_Session] = None
        self._tower_graph: Optional[_GraphedForward] = None
        self._heads, self.head_graph = {}, None  # captured prefill heads by layout (oldest use first)
        self._attention_swap = AttentionSwap(STATIC_IMPL, _vtoken_static=self)  # private configs, kept

    # -------------------------------------------------------------- captured pieces
    def _layer_call(self):
        params = inspect.signature(self.adapter.layers[0].forward).parameters
        cache_kw = "cache" if "cache" in params else "past_key_values"

        def call(layer, h, mask, pe, cache):
            h = layer(h, attention_mask=mask, position_embeddings=pe, use_cache=True, **{cache_kw: cache})
            return h[0] if isinstance(h, tuple) else h

        return call

    def _make_step(self, session: _Session, choose_outside: bool):
        """The decode step closure: reads ``tok [B, 1]`` and step ``t [1]``; writes token t+1 into
        ``new`` (its argmax), or the logits into ``session.logits`` when ``choose_outside``."""
        model, adapter = self.model, self.adapter
        head = model.get_output_embeddings()
        text = adapter.text_model
        layers = list(adapter.layers)
        call = self._layer_call()
        kv, tok, t, out, pos_next = session.kv, session.tok, session.t, session.new, session.pos_next
        suppress = session.suppress
        groups = kv.groups
        fused, backend = self.fused_ops, self.backend
        if fused:
            from vtoken.engine.fused_decode import decode_linear, run_layers, run_linear

            linear = decode_linear(backend, self.gemv)
        attend = None if self.stages is None else self.stages.attend
        chosen_outside = session.logits if choose_outside else None

        def step():
            for g in groups:
                g.slot.copy_(t + g.n_prefill)
                torch.add(g.base, t.to(g.base.dtype) + 1, out=g.count)
            h = adapter.decode_embeddings(tok)
            pe = text.rotary_emb(h, adapter.decode_position_ids(pos_next + t))
            if fused:
                hidden = run_layers(layers, text.norm, h, pe, kv, groups, kv.layer_group, backend,
                                    attend=attend, projections=self._projections, linear=linear)
                logits = run_linear(head, hidden[:, -1], linear)
            else:
                for layer in layers:
                    h = call(layer, h, None, pe, kv)
                logits = head(text.norm(h)[:, -1])
            if suppress is not None:
                logits.index_fill_(1, suppress, float("-inf"))
            if chosen_outside is not None:  # the caller's ``next_token`` picks the token between two steps
                chosen_outside.copy_(logits)
                t.add_(1)
                return
            nxt = logits.argmax(-1)
            out.index_copy_(1, t + 1, nxt.unsqueeze(1))
            tok.copy_(nxt.unsqueeze(1))
            t.add_(1)

        return step

    def _swap_attention(self) -> list:
        _register()
        return self._attention_swap.swap(layer.self_attn for layer in self.adapter.layers)

    def close(self) -> None:
        """Give the model's merged projection weights their own storage back and drop the kept
        session (buffers, graphs). The decoder can still be used: the next call merges again."""
        if self._projections is not None:
            self._projections.restore()
        self._drop_graphs()

    def _capture(self, fn, dev, warmups: int = 1):  # (the prefill's and generate's captures)
        return capture(self.cuda_graph, fn, dev, warmups)

    # -------------------------------------------------------------- generate
    def generate(self, *args, **kwargs):
        """:meth:`_generate` with the handle's budget checks run at its end, where it reads the tokens
        back anyway (:meth:`~vtoken.hooks.PruningHandle.deferred_checks`), not between the prefill's
        eager part and its captured tail."""
        with self._deferred_checks():
            return self._generate(*args, **kwargs)

    @torch.no_grad()
    def _generate(self, max_new_tokens: int = 16, eos_token_id=None, pad_token_id=None, suppress_tokens=None,
                  prefill_batch: Optional[int] = None, timing: bool = False, next_token=None, **inputs):
        """``next_token``: logits ``[B, V]`` (float32) -> next tokens ``[B]``, or None to stop; run between
        steps, outside the captured one (which then writes logits, not their argmax; EOS is the caller's)."""
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise PruningConfigError("StaticDecoder.generate needs input_ids")
        decode_plan = runnable_decode_plan(self._handle)
        if self._projections is not None and self._projections.merge():
            self._drop_graphs()  # they read the buffers merged before
        if max_new_tokens < 1:
            raise PruningConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prefill_batch is not None and (not isinstance(prefill_batch, int) or prefill_batch < 1):
            raise PruningConfigError(f"prefill_batch must be a positive int or None, got {prefill_batch!r}")
        eos_ids, pad, suppress_ids = special_ids(getattr(self.model, "generation_config", None), eos_token_id,
                                                 pad_token_id, suppress_tokens)  # on the host, before any work
        dev = input_ids.device
        if self.cuda_graph is True and dev.type != "cuda":
            raise PruningConfigError(f"cuda_graph=True needs a model on a CUDA device; the inputs are on {dev}")
        use_graph = bool(self.cuda_graph) if self.cuda_graph is not None else dev.type == "cuda"
        sync = (lambda: torch.cuda.synchronize(dev)) if (timing and dev.type == "cuda") else (lambda: None)
        B, T = input_ids.shape[0], max_new_tokens
        slots = max(T, 4) if use_graph else T  # room for new tokens: a step's capture runs it thrice, from slot 1 on
        mask2d = inputs.get("attention_mask")
        mask2d = torch.ones_like(input_ids, dtype=torch.bool) if mask2d is None else mask2d.bool()
        chunk = B if not prefill_batch else prefill_batch
        if chunk < B and decode_plan:
            raise UnsupportedCallError("StaticDecoder runs decode-time stages (a2sf, lookm, zipvl_kv) on one prefill "
                                       "of the whole batch: leave prefill_batch unset")
        if chunk < B:
            _check_same_visual_inputs(self.model.config, input_ids)
        # decode-time stages score every layer's prompt attention in the prefill: no captured tail
        split = (self.graph_prefill if self.graph_prefill is not None else use_graph) and chunk >= B and not decode_plan
        stop = self._stop_layer() if split else None
        graphs = (dev.type == "cuda" or self.cuda_graph == "emulate") and use_graph
        suppress = None if suppress_ids is None else torch.tensor(suppress_ids, dtype=torch.long, device=dev)
        like = next(self.adapter.text_model.parameters())

        sync(); t0 = time.perf_counter()
        capture_ms = 0.0
        kv, session, firsts, nexts, reused = None, None, [], [], False
        for start in range(0, B, chunk):
            rows = slice(start, min(B, start + chunk))
            part = inputs if rows.stop - rows.start == B else _slice_inputs(inputs, rows, B)
            logits, prefill_pos, cache, tail = self._run_prefill(part, stop, graphs)
            # a generated token's position: the sample's largest prefill position + 1 (+ t)
            pos = prefill_pos.to(dev)
            pos = pos.amax(dim=0) if pos.dim() == 3 else pos
            nexts.append((pos.amax(dim=-1) + 1).expand(rows.stop - rows.start))
            valids, layer_group = self._layer_valid(cache, mask2d[rows])
            record = self._handle.decode_prefill(cache) if decode_plan else None
            if record is not None:  # one kept-index list per layer: each layer evicts its own entries
                valids, layer_group = [valids[g] for g in layer_group], list(range(len(layer_group)))
            if tail is None:
                kv = self._store_chunk(kv, cache, valids, layer_group, rows, B, slots, like)
            else:
                signature = (B, tuple(v.shape[1] for v in valids), stop, tuple(tail["hidden"].shape),
                             None if tail["mask"] is None else (tuple(tail["mask"].shape), tail["mask"].dtype),
                             tuple(tail["position_embeddings"][0].shape), suppress_ids, like.dtype, str(dev), self.backend)
                # the kept session (every tensor a captured graph reads lives on it, not in this call's
                # locals, or a replay would read freed memory), or a new one kept for later calls
                reused = self._session is not None and self._session.serves(signature, T)
                if not reused:
                    kv0 = self._allocate(B, [v.shape[1] for v in valids], layer_group, slots, like)
                    self._session = _Session.fresh(signature, kv0, B, slots, pad, dev, suppress)
                session = self._session
                session.kv.valid_rows = [[] for _ in valids]
                room = session.new.shape[1]  # the buffers' room for new tokens (a kept session may have more)
                kv = session.kv = self._store_chunk(session.kv, cache, valids, layer_group, rows, B, room, like,
                                                    upto=stop)
                if session.tail_inputs is None:
                    session.tail_inputs = {
                        "hidden": tail["hidden"].clone(),
                        "mask": None if tail["mask"] is None else tail["mask"].clone(),
                        "position_embeddings": tuple(p.clone() for p in tail["position_embeddings"]),
                    }
                    session.tail_logits = like.new_empty(B, self.model.get_output_embeddings().out_features)
                else:
                    inp = session.tail_inputs
                    inp["hidden"].copy_(tail["hidden"])
                    if inp["mask"] is not None:
                        inp["mask"].copy_(tail["mask"])
                    for dst, src in zip(inp["position_embeddings"], tail["position_embeddings"]):
                        dst.copy_(src)
                run_tail = self._make_tail(session, stop)
                if graphs and session.tail_graph is None:
                    c0 = time.perf_counter()
                    session.tail_graph = self._capture(run_tail, dev)
                    capture_ms += 1000 * (time.perf_counter() - c0)
                if graphs:
                    session.tail_graph.replay()
                else:
                    run_tail()
                logits = session.tail_logits
            if suppress is not None:
                logits = logits.index_fill(1, suppress, float("-inf"))
            firsts.append(logits.argmax(-1) if next_token is None else logits)
            if start == 0:
                sync(); t1 = time.perf_counter()
            del cache, tail
        room = slots if session is None else session.new.shape[1]  # a kept session may have room for more
        self._finish_buffers(kv, B, room, dev)
        self.stages = None if record is None else StaticStages(self._handle, record, kv, self.groups,
                                                                self.layer_group, T)
        first = torch.cat(firsts)
        if session is None:
            session = _Session.fresh(None, kv, B, slots, pad, dev, suppress)  # not kept: its buffers are this call's
        done, chose = T, None  # tokens chosen (``next_token`` may stop earlier)
        if next_token is not None:
            session.logits = first.new_empty(first.shape) if session.logits is None else session.logits
            first = next_token(first.float())
            done, first = (1, session.new[:, 0]) if first is None else (T, first)

        def choose(i: int) -> bool:  # after decode step i: the caller's token i + 1; False stops
            nonlocal done
            nxt = next_token(session.logits.float())
            done = i + 1 if nxt is None else done
            return nxt is not None and session.chosen(i + 1, nxt)
        chose = None if next_token is None else choose
        session.pos_next.copy_(torch.cat(nexts))
        session.tok.copy_(first.unsqueeze(1))
        session.t.zero_()
        session.new.fill_(pad)
        session.new[:, 0] = first
        outside = next_token is not None
        step = self._make_step(session, outside)
        sync(); t2 = time.perf_counter()

        undo = self._swap_attention() if done > 1 else []  # (no decode step: nothing reads them)
        try:
            if self.stages is not None:
                t3 = time.perf_counter()
                capture = (lambda fn: self._capture(fn, dev, warmups=2)) if use_graph else None
                loop_capture_ms = decode_loop(step, done - 1, self.stages, capture, (session.t, session.tok), chose)
                capture_ms += loop_capture_ms
                t3 += loop_capture_ms / 1000  # the decode time excludes the captures between phases
            elif done > 1 and use_graph and outside not in session.decode_graphs:
                c0 = time.perf_counter()  # one graph per token choice, both kept: alternating calls replay
                session.decode_graphs[outside] = self._capture(step, dev, warmups=2)
                session.t.zero_()
                session.tok.copy_(first.unsqueeze(1))
                sync()
                capture_ms += 1000 * (time.perf_counter() - c0)
            if self.stages is None:
                t3 = time.perf_counter()
                run = session.decode_graphs[outside].replay if done > 1 and use_graph else step
                watch = EndWatch(eos_ids)
                for i in range(done - 1):
                    run()
                    if chose is not None and not chose(i):
                        break
                    if chose is None and (i + 1) % CHECK_EVERY == 0 and watch.all_ended(session.new[:, :i + 2]):
                        done = i + 2  # every row has ended: the rest would be padding
                        break
            sync(); t4 = time.perf_counter()
        finally:
            AttentionSwap.restore(undo)
        new = finish(session.new[:, :done].clone(), eos_ids, pad) if next_token is None else session.new[:, :done].clone()
        self.last = dict(
            prefill_ms=1000 * (t1 - t0), setup_ms=1000 * (t2 - t1), capture_ms=capture_ms, prefill_chunks=len(firsts),
            decode_ms_per_token=1000 * (t4 - t3) / (done - 1) if done > 1 else None, decode_steps=max(done - 1, 0),
            kv_bytes=kv.nbytes, prefill_lengths=[g.n_prefill for g in self.groups],
            cuda_graph=bool(use_graph and done > 1), graph_prefill_from_layer=stop if split else None,
            vision_tower_graph=None if self._tower_graph is None else (self._tower_graph.failed or "captured"),
            fused_ops=self.fused_ops, gemv=self.gemv, session_reused=reused, head_graph=self.head_graph,
            merged_projections=0 if self._projections is None else self._projections.merged, decode_stages_run=0 if self.stages is None else self.stages.done,
        )
        if self.stages is not None:  # a kept engine must not hold this call's cache
            self.stages.release()
        return torch.cat([input_ids, new], dim=1)

