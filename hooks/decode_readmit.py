"""Readmit stages (``DecodeStage(readmit=True)``, the ``lazyllm`` preset) on the dynamic cache, for
plans whose decode stages all re-admit (:func:`readmit_stage`, called by
:meth:`vtoken.hooks.decode_runtime.DecodeRuntime.evict`).

Each layer a later stage re-ranks keeps one candidate buffer (:class:`CandidateKV`): its entries
at its first stage (the whole layer, in original position order) followed by every token appended
since, so a stage's candidates (the kept AND the stashed entries) are read off it as they lie: no
merge of a stash with the live slots (cat, sort by position, gather of the whole visual KV), and
each step copies into it only the tokens appended since. The live cache is gathered from it at the
kept slots. The selection's per-image index (:class:`vtoken.scorers.decode_select.SelectionIndex`)
is built once per layout: the appended tokens are never candidates. A stage reads the device once:
the kept and evicted counts of all its layers together (the live length, its left padding, whether
anything was evicted). The slots kept, their order and bytes, the record of what each stage evicted
and the cache's layouts are those of the stash-and-merge path (plans that mix readmit with other
stages), except that the record's padding slots follow the buffer's layout.
"""

from __future__ import annotations

from typing import Optional

import torch

from vtoken.hooks.decode_cache import LayerLayout, compact, take_slots
from vtoken.scorers.decode_select import SelectionIndex, indexed_selection, selection_index


class CandidateKV:
    """A layer's readmit candidates: keys, values (B, H, L, D) in original position order
    (``positions``, ``valid`` (B, L)) inside buffers with room for the tokens still to come; the
    live cache holds the ``kept`` (B, L) ones. ``keys`` / ``values`` / ``positions`` / ``valid``
    of the stashed entries (the candidates not kept, padding on the left) are built on request,
    as the stash of the merge path held them."""

    def __init__(self, keys, values, positions, valid, index: Optional[SelectionIndex]):
        self.buf_k, self.buf_v, self.length = keys, values, keys.shape[2]
        self.cand_pos, self.cand_valid, self.index = positions, valid, index
        self.kept = valid

    def candidates(self) -> tuple:
        """(positions, valid, keys, values) of every candidate (views of the buffers)."""
        n = self.length
        return self.cand_pos, self.cand_valid, self.buf_k[:, :, :n], self.buf_v[:, :, :n]

    def extend(self, keys, values, positions, valid, room: int) -> None:
        """Append the live cache's tail (tokens appended since the last stage); ``room`` more
        slots are reserved when the buffers grow (their only whole copy)."""
        t, n = keys.shape[2], self.length
        if n + t > self.buf_k.shape[2]:
            grown = []
            for buf in (self.buf_k, self.buf_v):
                new = buf.new_empty(buf.shape[0], buf.shape[1], n + t + room, buf.shape[3])
                new[:, :, :n] = buf[:, :, :n]
                grown.append(new)
            self.buf_k, self.buf_v = grown
        self.buf_k[:, :, n:n + t] = keys
        self.buf_v[:, :, n:n + t] = values
        self.length = n + t
        self.cand_pos = torch.cat([self.cand_pos, positions], 1)
        self.cand_valid = torch.cat([self.cand_valid, valid], 1)

    def _stashed(self) -> tuple:
        out, out_valid = compact(self.cand_valid & ~self.kept)
        pos = self.cand_pos.gather(1, out).masked_fill(~out_valid, -1)
        return out, out_valid, pos

    keys = property(lambda self: take_slots(self.candidates()[2], *self._stashed()[:2]))
    values = property(lambda self: take_slots(self.candidates()[3], *self._stashed()[:2]))
    positions = property(lambda self: self._stashed()[2])
    valid = property(lambda self: self._stashed()[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.buf_k, self.buf_v))


def readmit_stage(runtime, cache, state, index: int) -> None:
    """Run readmit stage ``index`` on every layer it prunes (see the module docstring)."""
    stage, budget = runtime.plan[index], state.budgets[index]
    scorer, n = stage.scorer, state.n_prefill
    indexes, work = {}, []
    for layer in runtime.stage_layer_sets[index]:
        kv, rec = cache.layers[layer], state.layers.get(layer)
        pos, valid = runtime.layer_layout(state, layer)
        live = pos.shape[1]
        if kv.keys.shape[2] != live:
            raise RuntimeError(f"layer {layer} caches {kv.keys.shape[2]} slots, its layout {live}")
        cand = state.stash.pop(layer, None)
        stashed = cand is not None
        if not stashed:
            key = None if rec is None else id(rec.valid)  # layers of one layout share its selection index
            if key not in indexes:
                seg = torch.where((pos >= 0) & (pos < n), state.segment.gather(1, pos.clamp(0, n - 1)), -1)
                indexes[key] = selection_index(seg, budget.shape[0])
            cand = CandidateKV(kv.keys, kv.values, pos, valid, indexes[key])
        else:
            P = rec.positions.shape[1]  # the tail: the tokens appended since the last stage
            cand.extend(kv.keys[:, :, P:], kv.values[:, :, P:], pos[:, P:], valid[:, P:],
                        _room(runtime, state, index, layer))
        pos, valid, keys, values = cand.candidates()
        last = state.queries.get(layer)
        scores = torch.zeros(pos.shape, device=pos.device) if last is None else \
            scorer.score_from_query(last[0], keys, valid, last[1])
        evicted = indexed_selection(scorer, cand.index, scores, budget)
        kept = valid & ~evicted
        work.append((layer, kv, live, cand, stashed, scores, evicted, kept,
                     torch.stack([kept.sum(1), evicted.sum(1)])))
    counts = torch.stack([w[-1] for w in work]).tolist() if work else []  # the stage's one host sync
    record, shared = {}, {}
    for (layer, kv, live, cand, stashed, scores, evicted, kept, count), (kept_n, evicted_n) in zip(work, counts):
        record[layer] = evicted
        if not any(evicted_n) and not stashed:
            continue  # nothing evicted from the layer as it was: left as it is (no record, nothing stashed)
        P = max(kept_n)
        take, new_valid = compact(kept, count[0], P)
        pos, valid, keys, values = cand.candidates()
        kv.keys, kv.values = take_slots(keys, take, new_valid), take_slots(values, take, new_valid)
        valid_slots = shared.setdefault((P, tuple(kept_n)), new_valid)  # one mask per layout at decode
        state.layers[layer] = LayerLayout(pos.gather(1, take).masked_fill(~new_valid, -1), valid_slots,
                                          state.extra, min(kept_n) == P)
        state.offsets[layer] = state.offsets.get(layer, 0) + live - P  # slots gone from (back to) the layer
        if layer in state.scores:
            state.scores[layer] = scores.gather(1, take).masked_fill(~new_valid, 0)
        if any(evicted_n) and runtime.readmits_later(index, layer):
            cand.kept = kept
            state.stash[layer] = cand
    state.evicted.append(record)


def _room(runtime, state, index: int, layer: int) -> int:
    """Tokens still to be appended to ``layer``'s candidates: up to its last readmit stage."""
    later = [st.step for j, st in enumerate(runtime.plan) if j > index and layer in runtime.stage_layer_sets[j]]
    return max(later, default=state.extra) - state.extra + 1
