"""Stage execution: select (or merge) the visual tokens of one stage and re-lay-out the sequence.

At a stage layer the runtime hands the hidden states to :func:`run_stage`. The kept tokens stay
in their original order with new padding on the left; every later layer receives the rotary
cos/sin and position ids of the kept tokens (their ORIGINAL positions, M-RoPE included) and a
mask for the new layout (``ctx.span``). A prefill records each stage's layout on its
:class:`vtoken.hooks.call_state.PruneState` (decode steps and replays read it back).
"""

from __future__ import annotations

import torch

from vtoken.hooks import masks as M
from vtoken.hooks.call_state import MergeRecord, StageOps, StageState, StageTrace, on_layout
from vtoken.hooks.prefill_plan import candidates, kept_slots
from vtoken.hooks.stage_signals import fill_signals
from vtoken.signals import Diagnostics, SegmentSignals


def run_stage(rt, ctx, i: int, hidden: torch.Tensor) -> torch.Tensor:
    """Run stage ``i`` of ``rt.plan`` on ``hidden`` (B, Nc, D), the hidden states entering its layer:
    gather the signals, let the scorer select (or, replaying a no-cache step, re-apply the
    prompt's decision), merge if the stage merges, and move to the kept tokens' layout (new
    padding on the left). Returns the hidden states of the new layout (B, Nn, D); ``ctx`` then
    holds the layout (``cur_pos``, ``cur_valid``) and the kwargs its layers receive (``span``).
    """
    stage = rt.plan[i]
    ctx.stage_ops = StageOps(None, None)
    if ctx.mode == "replay":
        saved = ctx.replay.stages[i]
        if saved.identity and not ctx.relaid:  # the prompt's stage dropped nothing: nor does its replay
            return hidden
        if saved.merge is not None:  # the prompt's slots come first in the replayed layout too
            hidden = apply_merge(hidden, saved.merge)
            ctx.stage_ops = StageOps(saved.merge, None)
        B = hidden.shape[0]
        extra = torch.arange(ctx.replay.n_prefill, ctx.n, device=hidden.device).expand(B, -1)
        new_pos = torch.cat([saved.positions, extra], dim=1)
        return relayout(rt, ctx, hidden, new_pos, stage.layer, record=False)
    lay = ctx.layout
    cur_pos, cur_valid = ctx.cur_pos, ctx.cur_valid
    prep = ctx.prepared
    # the first stage on the original layout: candidates prepared on the host (no syncs)
    first = rt.host_first_stage and prep is not None and i == 0 and ctx.mode == "prefill"
    c = prep.first if first else on_layout(ctx, ("candidates", stage.keep),
                                           lambda: candidates(lay, cur_pos, cur_valid, prep.index_in_seg, stage.keep))
    slot_pad, smask, index, budget, cand = c.slot_pad, c.smask, c.index, c.budget, c.cand
    sample = lay.seg_sample
    safe_slot = slot_pad.clamp(min=0)
    sig = SegmentSignals(
        mask=smask,
        budget=budget,
        index=index,
        sample=sample,
        ordinal=lay.seg_ordinal,
        original=lay.seg_count,
        grid=lay.seg_grid,
        kind=lay.seg_kind,
        video=lay.seg_video,
        generator=None,
    )
    fill_signals(rt, ctx, stage, sig, hidden, slot_pad, safe_slot)
    sel = stage.scorer.select(sig)
    # a topk_selection over this stage's own mask and budget meets the budget by construction
    trusted = sel.exact_for is not None and sel.exact_for[0] is smask and sel.exact_for[1] is budget
    keep = sel.keep if trusted else sel.keep & smask
    exact = not getattr(stage.scorer, "adaptive", False)
    name = getattr(stage.scorer, "name", type(stage.scorer).__name__)
    if exact and not trusted:
        if ctx.checks is not None:  # checked when the forward ends (a check here would sync)
            ctx.checks.append((name, keep.sum(1), budget))
        else:
            check_budget(name, keep.sum(1), budget)
    known = first and exact  # what the stage keeps per row is known on the host
    nothing_dropped = (not prep.drop_any) if known else not bool((smask & ~keep).any())
    merged = None
    if stage.mode == "merge" and not nothing_dropped:
        merged = merge_targets(hidden, sig, keep, sel.merge_into, slot_pad)
        hidden = apply_merge(hidden, merged)
        ctx.stage_ops = StageOps(merged, None)
    trace = StageTrace(
        layer=stage.layer,
        scorer=name,
        mode=stage.mode,
        positions=cur_pos,
        seg_sample=sample,
        seg_index=index,
        seg_keep=keep,
        seg_scores=sel.scores,
        diagnostics=Diagnostics.unresolved_copy(sig.diagnostics),
    )
    ctx.trace.append(trace)
    if nothing_dropped:
        # nothing dropped (nor merged) anywhere: keep the layout (and the model's own masks) as they are
        if ctx.state is not None:
            all_valid = prep.all_valid if known else on_layout(ctx, "all_valid", lambda: bool(cur_valid.all()))
            ctx.state.stages.append(StageState(layer=stage.layer, positions=cur_pos, valid=cur_valid,
                                               all_valid=all_valid, identity=not ctx.relaid))
        return hidden
    if known:  # kept slots and per-row counts from the host plan: no syncs, few launches
        keep_slot = kept_slots(prep.keep_base, prep.cand_flat, keep, cur_pos.shape)
        Nn, rank = max(prep.kept_host), keep_slot.cumsum(1) + prep.rank_shift
    else:
        B, Nc = cur_pos.shape
        base = torch.cat([((cur_pos >= 0) & cur_valid & ~cand).view(-1), cand.new_zeros(1)])
        flat = torch.where(smask, sample.unsqueeze(1) * Nc + slot_pad, torch.full_like(slot_pad, B * Nc))
        keep_slot = kept_slots(base, flat, keep, (B, Nc))
        n_b = keep_slot.sum(1)
        Nn = int(n_b.max())
        rank = keep_slot.cumsum(1) - 1 + (Nn - n_b).unsqueeze(1)
    # scatter each kept slot to its rank (new padding on the left); the rest to a spare column
    # (the clamp only matters when a scorer broke its budget, which the deferred check reports)
    target = torch.where(keep_slot, rank, Nn).clamp_(0, Nn)
    new_pos = torch.full((cur_pos.shape[0], Nn + 1), -1, dtype=torch.long, device=hidden.device)
    new_pos = new_pos.scatter_(1, target, cur_pos)[:, :Nn]
    trace.positions = new_pos
    all_valid = (prep.all_valid and len(set(prep.kept_host)) == 1) if known else None
    return relayout(rt, ctx, hidden, new_pos, stage.layer, record=True, all_valid=all_valid, merged=merged)


def relayout(rt, ctx, hidden, new_pos, layer, record, all_valid=None, merged=None):
    """Move to the layout ``new_pos`` (B, Nn) of original positions (-1 = padding slot);
    ``all_valid``: whether every new slot is valid, when the caller knows it (else one sync);
    ``record``: append the new layout (and ``merged``, the stage's MergeRecord) to the prefill's
    PruneState."""
    B, Nc = ctx.cur_pos.shape
    safe = new_pos.clamp(min=0)
    if not ctx.relaid:  # still the original layout: slot == original position
        take = safe
    else:  # inv[b, p] = current slot of original position p (positions not present: a spare column)
        where = torch.where(ctx.cur_pos >= 0, ctx.cur_pos, torch.full_like(ctx.cur_pos, ctx.n))
        inv = torch.zeros(B, ctx.n + 1, dtype=torch.long, device=hidden.device)
        inv = inv.scatter_(1, where, torch.arange(Nc, device=hidden.device).expand(B, Nc))[:, : ctx.n]
        take = inv.gather(1, safe)
    ctx.relaid = True  # the original layout's text rows (prepared.text) no longer apply
    hidden = gather_rows(hidden, take)
    ctx.stage_ops = StageOps(ctx.stage_ops.merge if ctx.stage_ops is not None else None, take)
    if all_valid:
        valid = torch.ones(new_pos.shape, dtype=torch.bool, device=new_pos.device)
    else:
        valid = ctx.orig_valid.gather(1, safe) & (new_pos >= 0)
    ctx.cur_pos, ctx.cur_valid = new_pos, valid
    span = {}
    if ctx.pos_emb0 is not None:
        span["position_embeddings"] = tuple(gather_seq(t, safe) for t in ctx.pos_emb0)
    if ctx.pos_ids0 is not None:
        span["position_ids"] = gather_seq(ctx.pos_ids0, safe)
    all_valid = bool(valid.all()) if all_valid is None else all_valid
    if ctx.fixed is not None:  # the layers write into fixed slots: keys longer than queries
        slots = ctx.fixed_len - (ctx.n - new_pos.shape[1])
        span["attention_mask"] = M.fixed_prefill_mask(valid, slots, rt.attn_impl(), hidden.dtype)
    else:
        span["attention_mask"] = M.prefill_mask(valid, rt.attn_impl(), hidden.dtype, all_valid)
    ctx.span = span
    if record and ctx.state is not None:
        ctx.state.stages.append(StageState(layer=layer, positions=new_pos, valid=valid, all_valid=all_valid,
                                           merge=merged))
    return hidden


def gather_rows(hidden: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """(B, Nc, D) hidden states -> (B, Nn, D) of the slots ``take`` (B, Nn)."""
    return hidden.gather(1, take.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def redo_stage(hidden: torch.Tensor, ops: StageOps) -> torch.Tensor:
    """What a stage did to ``hidden`` (see :class:`StageOps`), done again on the same input."""
    if ops.merge is not None:
        hidden = apply_merge(hidden, ops.merge)
    return hidden if ops.take is None else gather_rows(hidden, ops.take)


def check_budget(name: str, got: torch.Tensor, budget: torch.Tensor) -> None:
    """A non-adaptive scorer must keep exactly its budget per segment."""
    if not torch.equal(got, budget):
        raise RuntimeError(f"scorer {name!r} kept {got.tolist()} tokens, budget was {budget.tolist()}")


def merge_targets(hidden, sig, keep, merge_into, slot_pad) -> MergeRecord:
    """Where each dropped candidate of a merging stage goes: ``merge_into`` (S, n) from the
    scorer (-1: nowhere), or else the kept candidate of its segment with the most similar hidden
    state (cosine)."""
    S, n = keep.shape
    arange = torch.arange(n, device=keep.device).expand(S, n)
    if merge_into is None:
        h = hidden[sig.sample.unsqueeze(1), slot_pad.clamp(min=0)].float()  # (S, n, D)
        hn = torch.nn.functional.normalize(h, dim=-1)
        sim = hn @ hn.transpose(1, 2)
        sim = sim.masked_fill(~keep.unsqueeze(1), float("-inf"))
        merge_into = sim.argmax(dim=-1)
    dropped = sig.mask & ~keep
    target = torch.where(dropped & (merge_into >= 0), merge_into, arange)
    target = torch.where(sig.mask, target, arange)
    return MergeRecord(sig.sample, slot_pad, sig.mask, keep, target)


def apply_merge(hidden: torch.Tensor, rec: MergeRecord) -> torch.Tensor:
    """Average every candidate into its target (:func:`merge_targets`): each kept candidate that
    received others becomes the mean of itself and them. Returns updated (B, Nc, D) states."""
    S, n = rec.keep.shape
    rows_b = rec.sample.unsqueeze(1)
    h = hidden[rows_b, rec.slot_pad.clamp(min=0)].float()  # (S, n, D)
    summed = torch.zeros_like(h).scatter_add_(1, rec.target.unsqueeze(-1).expand_as(h), h * rec.mask.unsqueeze(-1))
    count = torch.zeros(S, n, dtype=torch.float32, device=h.device).scatter_add_(1, rec.target, rec.mask.float())
    merged = summed / count.clamp(min=1).unsqueeze(-1)
    upd = rec.keep & (count > 1)
    out = hidden.clone()
    sb = rows_b.expand(S, n)[upd]
    out[sb, rec.slot_pad[upd]] = merged[upd].to(hidden.dtype)
    return out


def gather_seq(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather a per-token tensor along its sequence axis with a (B, M) index.

    Rotary cos/sin are float (..., B, N, D) (M-RoPE adds a leading axis of 3); position ids are
    integer (..., B, N). A batch axis of size 1 is broadcast to B.
    """
    B, Mlen = idx.shape
    seq_dim = x.dim() - 2 if x.is_floating_point() else x.dim() - 1
    batch_dim = seq_dim - 1
    if B == 1 and x.shape[batch_dim] == 1:  # one row: a single index_select
        return x.index_select(seq_dim, idx[0])
    shape = list(x.shape)
    shape[batch_dim] = B
    x = x.expand(*shape)
    view = [1] * x.dim()
    view[batch_dim], view[seq_dim] = B, Mlen
    full = list(x.shape)
    full[seq_dim] = Mlen
    return x.gather(seq_dim, idx.view(view).expand(full))
