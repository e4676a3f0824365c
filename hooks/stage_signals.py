"""Collect one stage's signals: the :class:`vtoken.signals.SegmentSignals` its scorer reads.

The signals a scorer may declare are those of :data:`vtoken.signals.SIGNALS`; this module fills
them from the hidden states entering the stage's layer, the captures the probes recorded during
this call (:mod:`vtoken.hooks.captures`: attention rows and keys at earlier layers, vision
encoder attention) and the adapter (final norm, per-sample rotary phase). Candidates are laid out
per segment: ``slot_pad`` (S, n) is each candidate's slot in its row of the current layout.
"""

from __future__ import annotations

import torch

from vtoken.hooks.call_state import on_layout
from vtoken.hooks.prefill_plan import text_rows


def fill_signals(rt, ctx, stage, sig, hidden, slot_pad, safe_slot) -> None:
    """Fill the signals ``stage``'s scorer declares (``needs``; ``optional_needs`` where the model
    provides them) into ``sig`` from the hidden states entering the stage's layer, the probes'
    captures of this call (``ctx.attn``, ``ctx.vision``) and the adapter (final norm, rotary
    phase). ``slot_pad`` (S, n): slot of each candidate in its row (-1 padding).
    """
    needs = getattr(stage.scorer, "needs", frozenset())
    sample = sig.sample
    rows_b = sample.unsqueeze(1)
    if "hidden" in needs:
        sig.hidden = hidden[rows_b, safe_slot]
    if needs & {"text_hidden", "attn_text", "attn_text_text", "attn_last_text", "text_keys", "text_after",
                "normed_text_hidden"}:
        text_slot, text_mask = text_slots(ctx)
        sig.text_mask = text_mask[sample]
        tsafe = text_slot.clamp(min=0)[sample]
        if "text_hidden" in needs:
            sig.text_hidden = hidden[rows_b, tsafe]
        if "text_after" in needs:  # text rows whose original position follows the segment's last token
            text_pos = ctx.cur_pos[sample].gather(1, tsafe)
            sig.text_after = sig.text_mask & (text_pos > segment_end(ctx.layout).unsqueeze(1))
    if needs & {"normed_hidden", "normed_text_hidden"}:
        norm = rt.adapter.final_norm
        if norm is None:
            from vtoken.errors import PruningConfigError

            raise PruningConfigError(f"scorer {stage.scorer.name!r} needs the language model's final norm, "
                                     f"which this model's adapter cannot provide")
        if "normed_hidden" in needs:
            sig.normed_hidden = norm(sig.hidden if sig.hidden is not None else hidden[rows_b, safe_slot])
        if "normed_text_hidden" in needs:
            sig.normed_text_hidden = norm(sig.text_hidden if sig.text_hidden is not None else hidden[rows_b, tsafe])
    rec = ctx.attn.get(stage.layer - 1, {})
    if "attn_last" in needs:
        sig.attn_last = per_segment(rec["last"][:, :, 0, :], sample, safe_slot)
    if "attn_last_text" in needs:
        sig.attn_last_text = per_segment(rec["last"][:, :, 0, :], sample, tsafe)
    if "attn_text" in needs:
        text = rec["text"]  # (B, H, T, Nc)
        per = text[sample]  # (S, H, T, Nc)
        sig.attn_text = per.gather(3, safe_slot.view(-1, 1, 1, safe_slot.shape[1]).expand(-1, per.shape[1], per.shape[2], -1))
    if "attn_text_text" in needs:  # the same text rows, gathered at the text columns
        per = rec["text"][sample]  # (S, H, T, Nc)
        sig.attn_text_text = per.gather(3, tsafe.view(-1, 1, 1, tsafe.shape[1]).expand(-1, per.shape[1], per.shape[2], -1))
    if needs & {"keys", "text_keys"}:
        key = rec["keys"]  # (B, Hkv, Nc, D)
        if ctx.pos_emb0 is not None:  # the rotary phase of each sample alone (left padding: see the adapter)
            key = rt.adapter.keys_at_sample_positions(key, ctx.pos_emb0, ctx.orig_valid.int().argmax(dim=1))
        flat = key.permute(0, 2, 1, 3).reshape(key.shape[0], key.shape[2], -1)
        if "keys" in needs:
            sig.keys = flat[rows_b, safe_slot]
        if "text_keys" in needs:
            sig.text_keys = flat[rows_b, tsafe]
    if needs & {"vision_attn", "vision_keys"}:
        _fill_vision(rt, ctx, stage, sig)
    elif rt.vision_probed and getattr(stage.scorer, "optional_needs", frozenset()) & {"vision_attn"}:
        _fill_optional_vision(rt, ctx, sig)
    if needs & {"layer_attn_full", "full_pos", "full_query"}:
        full = torch.stack([ctx.attn[layer]["full"] for layer in range(stage.layer)], dim=1)  # (B, Lyr, N, N)
        sig.layer_attn_full = full[sample]
        sig.full_pos = torch.where(sig.mask, slot_pad, torch.full_like(slot_pad, -1))
        sig.full_query = last_valid(ctx.cur_valid)[sample]
    if "layer_attn_last" in needs:
        per_layer = [ctx.attn[layer]["last"][:, :, 0, :] for layer in range(stage.layer)]
        sig.layer_attn_last = torch.stack([per_segment(t, sample, safe_slot) for t in per_layer], dim=1)


def _fill_optional_vision(rt, ctx, sig):
    """``vision_attn`` for a scorer that reads it only where available: the image segments'
    encoder attention (the captures, in order, belong to the images: the towers run images
    first), NaN rows for the other segments (video); left None when the captures do not
    match the images' tokens."""
    lay = ctx.layout
    counts = ctx.prepared.seg_count_host if ctx.prepared is not None else lay.seg_count.tolist()
    repeat_for_expanded_rows(ctx, rt.session, counts)
    S, n = sig.mask.shape
    images = [s for s, kind in enumerate(lay.seg_kind) if kind == "image"]
    caps = ctx.vision[:len(images)]
    if not S or not images or len(counts) != S or len(caps) != len(images) or any(
            v[0].numel() != counts[s] for v, s in zip(caps, images)):
        return
    rows = [None] * S
    width = max([n] + [v[0].numel() for v in caps])  # indexed by original token (see _fill_vision)
    for v, s in zip(caps, images):
        rows[s] = torch.nn.functional.pad(v[0].float(), (0, width - v[0].numel()))
    nan = torch.full((width,), float("nan"), dtype=torch.float32, device=caps[0][0].device)
    attn = torch.stack([nan if r is None else r for r in rows])
    sig.vision_attn = attn.gather(1, sig.index.clamp(min=0).to(attn.device)).to(sig.mask.device)

def _fill_vision(rt, ctx, stage, sig):
    """``vision_attn`` / ``vision_keys`` of image segments from the encoder captures. A video
    segment is not mapped to encoder patches: it may only come with a budget that keeps it
    whole (nothing to rank: NaN scores, zero keys), else the call is refused."""
    from vtoken.errors import PruningConfigError
    from vtoken.plan import tokens_for

    lay = ctx.layout
    counts = ctx.prepared.seg_count_host if ctx.prepared is not None else lay.seg_count.tolist()
    images = [s for s, kind in enumerate(lay.seg_kind) if kind == "image"]
    if any(kind != "image" and tokens_for(stage.keep, c) < c for kind, c in zip(lay.seg_kind, counts)):
        raise PruningConfigError(
            f"scorer {stage.scorer.name!r} reads vision-encoder attention, which vtoken maps to LLM tokens for "
            "images only (not video) so far; for inputs with video use an LLM-side method (e.g. fastv or "
            "divprune), or a budget that keeps every video token (keep=1.0)")
    repeat_for_expanded_rows(ctx, rt.session, counts)
    caps = ctx.vision[:len(images)] if len(images) < len(counts) else ctx.vision  # video captures follow
    if len(caps) != len(images) or any(v[0].numel() != counts[s] for v, s in zip(caps, images)):
        raise PruningConfigError(
            f"scorer {stage.scorer.name!r} needs vision-encoder signals, but the captured encoder attention "
            f"({[v[0].numel() for v in caps]}) does not match the images' tokens ({[counts[s] for s in images]})"
        )
    S, n = sig.mask.shape
    if not S:
        sig.vision_attn = None
        return
    idx = sig.index.clamp(min=0)
    dev = caps[0][0].device if caps else sig.mask.device
    # indexed by ORIGINAL token (sig.index): as wide as the widest image, which a stage after an
    # earlier one (fewer candidate slots n) exceeds
    width = max([n] + [v[0].numel() for v in caps])
    attn = torch.full((S, width), float("nan"), dtype=torch.float32, device=dev)
    for v, s in zip(caps, images):
        attn[s, : v[0].numel()] = v[0].float()
    sig.vision_attn = attn.gather(1, idx.to(dev)).to(sig.mask.device)
    if "vision_keys" in getattr(stage.scorer, "needs", ()):
        if not caps:
            raise PruningConfigError(f"scorer {stage.scorer.name!r} needs vision-encoder keys of an image")
        keys = torch.zeros(S, width, caps[0][1].shape[-1], dtype=caps[0][1].dtype, device=caps[0][1].device)
        for v, s in zip(caps, images):
            keys[s, : v[1].shape[0]] = v[1]
        sig.vision_keys = keys.gather(1, idx.to(keys.device).unsqueeze(-1).expand(-1, -1, keys.shape[-1])).to(
            sig.mask.device)


def repeat_for_expanded_rows(ctx, session, counts) -> None:
    """Match the vision-encoder captures to a batch that ``generate`` expanded after encoding.

    transformers >= 5.2x encodes each image once, then repeats its features for beam search /
    ``num_return_sequences``: every row of the ``session.batch`` rows the call was given comes
    ``k`` times in a row (``repeat_interleave``), while the captures (images first, in order) are
    those of the original rows. Repeat each original row's image captures ``k`` times (the
    callers check the token counts); nothing changes outside such a call or when the captures
    already cover every image (older transformers encode the expanded pixels).
    """
    lay, caps = ctx.layout, ctx.vision
    B = int(lay.segment_of.shape[0])
    b0 = getattr(session, "batch", None)
    if not caps or not b0 or B <= b0 or B % b0:
        return
    img_counts = [c for c, kind in zip(counts, lay.seg_kind) if kind == "image"]
    if len(caps) >= len(img_counts) and all(v[0].numel() == c for v, c in zip(caps, img_counts)):
        return  # the captures already cover the expanded rows
    k = B // b0
    per_row = [0] * B
    for b, kind in zip(lay.seg_sample.tolist(), lay.seg_kind):
        per_row[b] += kind == "image"
    out, off = [], 0
    for g in range(0, B, k):
        n = per_row[g]
        if any(per_row[g + j] != n for j in range(k)):
            return
        out += caps[off:off + n] * k
        off += n
    if off <= len(caps):
        ctx.vision = out


def per_segment(rows: torch.Tensor, sample: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, H, Nc) per-row values -> (S, H, n) values of each segment's candidate slots
    ``slots`` (S, n) in row ``sample`` (S,): two gathers (cheaper on the host than advanced
    indexing)."""
    per = rows.index_select(0, sample)
    return per.gather(2, slots.unsqueeze(1).expand(-1, per.shape[1], -1))


def last_valid(valid: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last valid slot."""
    N = valid.shape[1]
    idx = torch.arange(N, device=valid.device).expand_as(valid)
    return torch.where(valid, idx, torch.full_like(idx, -1)).max(dim=1).values.clamp(min=0)


def segment_end(layout) -> torch.Tensor:
    """(S,) original position of each segment's last visual token (structural ones included)."""
    seg = layout.segment_of
    S = layout.num_segments
    pos = torch.arange(seg.shape[1], device=seg.device).expand_as(seg).reshape(-1)
    idx = torch.where(seg >= 0, seg, torch.full_like(seg, S)).reshape(-1)  # text/padding -> a spare slot
    end = torch.full((S + 1,), -1, dtype=torch.long, device=seg.device)
    return end.scatter_reduce_(0, idx, pos, reduce="amax")[:S]


def text_slots(ctx):
    """(B, T) slot indices of valid non-visual tokens (-1 padded), and (B, T) mask."""
    if not ctx.relaid and ctx.prepared is not None:
        return ctx.prepared.text
    return on_layout(ctx, "text_rows", lambda: text_rows(ctx.layout, ctx.cur_pos, ctx.cur_valid))
