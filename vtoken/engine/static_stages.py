"""Decode-time stages (:class:`vtoken.plan.DecodeStage`: A2SF, LOOK-M, ZipVL's mixed-precision KV)
on :class:`~vtoken.engine.StaticDecoder`'s static buffers.

The dynamic cache's runtime (:mod:`vtoken.hooks.decode_runtime`) removes evicted entries from the
cache tensors; static buffers cannot shrink (their shapes are what a CUDA graph captured), so here
a stage edits what :func:`vtoken.kernels.gather_attend` reads instead:

- every layer a stage prunes has its own kept-index list (``StaticDecoder`` gives each layer its
  own :class:`~vtoken.engine.static_kv.LayoutGroup`); at the stage's step (on the host, between two
  decode steps) the stage's selection — the handle's record
  (:meth:`vtoken.hooks.decode_record.DecodePrefill.eviction`) calls the function the dynamic
  runtime calls, on the same scores — drops the evicted slots from the list
  (rebuilt in place by ``_kept_index``, the same padded ``[B, N + T]`` list and count as the
  prefill's, so a captured graph reads the new list);
- ``"merge"``: the scorer's merge rule (LOOK-M's pivot merge) rewrites the kept slots of the
  buffer in place first;
- ``"quantize"``: the evicted entries are stored quantised (:mod:`vtoken.kernels.lowbit`) with their
  own index list, and the layer's attention becomes :func:`vtoken.kernels.gather_attend_lowbit`
  (kept entries at full precision, low-bit entries dequantised on read; Triton on CUDA);
- score accumulation (a stage still to come, e.g. A2SF at ``step > 0``): inside the decode step the
  layer's attention also returns its query's softmax row over the kept entries
  (``gather_attend(..., return_row=True)``, from the logits and log-sum-exp it computes anyway;
  :func:`kept_rows` recomputes it after a low-bit read; device ops only, no host sync), summed over
  heads and folded into the layer's running scores ``[B, N + T]`` (buffer-slot coordinates) with the
  scorer's own ``accumulate``.

Which layers accumulate changes only at a stage's step, so the decode loop (:func:`decode_loop`)
captures one CUDA graph per phase between stages (the handle says which layers accumulate in each
phase, :meth:`vtoken.hooks.handle.PruningHandle.decode_accumulating`).
"""

from __future__ import annotations

import time

import torch

from vtoken.engine.static_kv import _kept_index
from vtoken.kernels import LowBitEntries, gather_attend, gather_attend_lowbit
from vtoken.kernels.lowbit import quantize_tokens
from vtoken.errors import UnsupportedCallError
from vtoken.plan import DecodeStage
from vtoken.signals import attention_probs


def kept_rows(q: torch.Tensor, k_buf: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-summed softmax row of each sample's last query over its kept entries, in buffer-slot
    coordinates: q ``[B, H, Q, D]``, k_buf ``[B, Hkv, L, D]``, idx ``[B, K]``, count ``[B]`` ->
    ``[B, L]`` float32 (0 on slots not in the list). The static path's
    :func:`vtoken.hooks.probe.step_rows`, recomputed from the keys: what
    ``gather_attend(..., return_row=True)`` returns with the attention (:meth:`StaticStages.attend`
    uses that; this serves the low-bit read, whose softmax also spans the low-bit entries this row
    leaves out)."""
    B, _, _, D = q.shape
    Hkv, L, K = k_buf.shape[1], k_buf.shape[2], idx.shape[1]
    il = idx.long().clamp(0, L - 1)
    kg = k_buf.gather(2, il[:, None, :, None].expand(B, Hkv, K, D))
    live = torch.arange(K, device=q.device)[None, :] < count.long()[:, None]  # [B, K]
    probs = attention_probs(q[:, :, -1:], kg, live[:, None], scale).sum(dim=1)[:, 0]  # [B, K]
    return to_slots(probs.masked_fill(~live, 0), idx, L)


def to_slots(row: torch.Tensor, idx: torch.Tensor, L: int) -> torch.Tensor:
    """A row over a kept-index list ``[B, K]`` (0 past its count) -> buffer-slot coordinates ``[B, L]``."""
    return torch.zeros(row.shape[0], L, dtype=torch.float32, device=row.device).scatter_add_(
        1, idx.long().clamp(0, L - 1), row)


def _prefill_valid(group) -> torch.Tensor:
    """``[B, n_prefill]`` bool: the prefill slots a layout group's kept-index list holds now."""
    n, (B, W) = group.n_prefill, group.idx.shape
    live = torch.arange(W, device=group.idx.device)[None, :] < group.base.long()[:, None]
    take = torch.where(live, group.idx.long(), n)  # dead entries land in a spare column
    return torch.zeros(B, n + 1, dtype=torch.bool, device=group.idx.device).scatter_(1, take, True)[:, :n]


def _low_bit(keys: torch.Tensor, values: torch.Tensor, low: torch.Tensor, bits: int) -> LowBitEntries:
    """keys / values ``[B, Hkv, n, D]`` of the prefill slots, quantised per token, with the list of
    the ``low`` ``[B, n]`` slots (the ones read at low precision)."""
    idx, length = _kept_index(low, 0)
    return LowBitEntries(*quantize_tokens(keys, bits), *quantize_tokens(values, bits), idx, length, bits)


def runnable_decode_plan(handle) -> list:
    """The decode-time stages of ``handle`` (None: no handle) that :class:`StaticStages` runs; a plan
    this engine cannot run is refused with what to do instead."""
    plan = [] if handle is None else handle.decode_plan
    if plan and any(not isinstance(st, DecodeStage) for st in handle.plan):
        raise UnsupportedCallError(
            "StaticDecoder runs plans of decode-time stages alone (a2sf, lookm, zipvl_kv); a plan that also prunes "
            "in the prefill (vtoken.Stage + vtoken.DecodeStage) runs through model.generate on the dynamic cache")
    odd = [st.scorer.name for st in plan if st.readmit or getattr(st.scorer, "reads_query", False)
           or getattr(st.scorer, "reads_layout", False)]
    if odd:
        raise UnsupportedCallError(
            f"StaticDecoder runs decode-time stages that rank by accumulated attention (a2sf, lookm, zipvl_kv); "
            f"{sorted(set(odd))} (re-admission, last-query or output-layout scores) runs through model.generate "
            "on the dynamic cache")
    return plan


class StaticStages:
    """A decode-time plan running on one ``StaticDecoder.generate`` call's buffers.

    handle: the :func:`vtoken.apply_pruning` handle; record: its
    :meth:`~vtoken.hooks.handle.PruningHandle.decode_prefill` of this call's prefill; kv: the
    :class:`~vtoken.engine.static_kv.StaticKV`; groups / layer_group: its layout groups (one per
    pruned layer); new_tokens: T."""

    def __init__(self, handle, record, kv, groups, layer_group, new_tokens: int):
        self.handle, self.record, self.kv = handle, record, kv
        self.groups, self.layer_group, self.new_tokens = groups, layer_group, new_tokens
        self.plan = record.plan
        pruned = sorted({layer for layers in record.stage_layers for layer in layers})
        B, dev = record.segment.shape[0], record.segment.device
        self.scores = {}
        for layer in pruned:
            buf = torch.zeros(B, kv.keys[layer].shape[2], dtype=torch.float32, device=dev)
            prompt = record.scores.get(layer)
            if prompt is not None:
                buf[:, :prompt.shape[1]] = prompt
            self.scores[layer] = buf
        self.valid = {layer: _prefill_valid(self._group(layer)) for layer in pruned}
        self.low: dict = {}  # layer -> LowBitEntries
        self.evicted: list = []  # per stage run: layer -> [B, N + t] bool (stats, tests)
        self.done = 0
        self.accumulating = handle.decode_accumulating(0)

    def _group(self, layer: int):
        return self.groups[self.layer_group[layer]]

    def release(self) -> None:
        """After the call: drop the references to its KV buffers and score rows (the engine keeps
        this object for ``last`` / tests: what was evicted, the low-bit entries), so a kept engine
        (``compile=True``) does not hold a finished call's whole cache."""
        self.kv, self.scores, self.record = None, {}, None

    # ------------------------------------------------------------------ between steps (host)
    def before_step(self, t: int) -> bool:
        """Run every stage whose step has come before decode step ``t`` (as the dynamic runtime:
        ``step <= t``); True when one ran (the next step belongs to a new phase)."""
        ran = False
        while self.done < len(self.plan) and self.plan[self.done].step <= t:
            self._run(self.done, t)
            self.done += 1
            ran = True
        if ran:
            self.accumulating = self.handle.decode_accumulating(self.done)
        return ran

    def _run(self, index: int, t: int) -> None:
        stage = self.plan[index]
        record = {}
        for layer in self.record.stage_layers[index]:
            group, valid = self._group(layer), self.valid[layer]
            n, L = group.n_prefill, group.n_prefill + t
            held = torch.cat([valid, valid.new_ones(valid.shape[0], t)], dim=1)
            positions = torch.arange(L, device=valid.device)[None, :].masked_fill(~held, -1)
            evicted = self.record.eviction(index, positions, self.scores[layer][:, :L])
            record[layer] = evicted
            if not bool(evicted.any()):
                continue
            k_buf, v_buf = self.kv.keys[layer], self.kv.values[layer]
            if stage.mode == "merge":
                keys, values = stage.scorer.merge(k_buf[:, :, :L], v_buf[:, :, :L], held & ~evicted, evicted)
                k_buf[:, :, :L].copy_(keys)
                v_buf[:, :, :L].copy_(values)
            if stage.mode == "quantize":
                self.low[layer] = _low_bit(k_buf[:, :, :n], v_buf[:, :, :n], evicted[:, :n], stage.bits)
            self.valid[layer] = valid & ~evicted[:, :n]
            idx, base = _kept_index(self.valid[layer], self.new_tokens)
            group.idx.copy_(idx)
            group.base.copy_(base)
            group.count.copy_(base + t)
        self.evicted.append(record)

    # ------------------------------------------------------------------ inside a step (device only)
    def attend(self, layer: int, q, k_buf, v_buf, scale: float, backend: str):
        """Layer ``layer``'s decode attention over its list (and low-bit entries), folding the
        query's attention row into the layer's scores while a stage that ranks it is to come."""
        group = self._group(layer)
        low, scorer, rows = self.low.get(layer), self.accumulating.get(layer), None
        if low is not None:
            out = gather_attend_lowbit(q, k_buf, v_buf, group.idx, group.count, low, scale=scale, backend=backend)
            if scorer is not None:
                rows = kept_rows(q, k_buf, group.idx, group.count, scale)
        elif scorer is not None:  # the attention's own row of the last query (no second q.K pass)
            out, row = gather_attend(q, k_buf, v_buf, group.idx, group.count, scale=scale, return_row=True,
                                     backend=backend)
            rows = to_slots(row.sum(dim=1), group.idx, k_buf.shape[2])
        else:
            out = gather_attend(q, k_buf, v_buf, group.idx, group.count, scale=scale, backend=backend)
        if rows is not None:
            scores = self.scores[layer]
            scores.copy_(scorer.accumulate(scores, rows.unsqueeze(1)))
        return out


def decode_loop(step, steps: int, stages: StaticStages, capture=None, keep=(), after=None) -> float:
    """Run ``steps`` decode steps, the plan's stages before the steps they name. With ``capture``
    (a function ``fn -> graph``), each phase between stages is captured once and replayed; the
    tensors in ``keep`` (the step's inputs it advances) and the scores are restored after a
    capture's warm-up runs (a phase with fewer than 3 steps left runs eagerly: the warm-ups would
    write past the buffers' last slot). ``after(t)``, if given, runs after step ``t`` (the token
    choice outside the graph); False stops the loop. Returns the milliseconds spent capturing."""
    graphs, capture_ms = {}, 0.0
    for t in range(steps):
        stages.before_step(t)
        graph = graphs.get(stages.done)
        if graph is None and (capture is None or steps - t < 3):
            step()  # eager: no graphs, or too few steps left for a capture's two warm-up steps to stay in bounds
            if after is not None and not after(t):
                break
            continue
        if graph is None:
            c0 = time.perf_counter()
            saved = [x.clone() for x in keep] + [s.clone() for s in stages.scores.values()]
            graph = graphs[stages.done] = capture(step)
            for dst, src in zip(list(keep) + list(stages.scores.values()), saved):
                dst.copy_(src)
            capture_ms += 1000 * (time.perf_counter() - c0)
        graph.replay()
        if after is not None and not after(t):
            break
    return capture_ms
