"""AdaptInfer: kept sets against a plain-loop reference of its rule (text->text priors weighting
text->vision attention, per head), the preset, and the ``attn_text_text`` signal against an
unpatched eager run."""

import pytest
import torch

import vtoken
from conftest import get_inputs, get_model
from vtoken.errors import PruningConfigError
from vtoken.methods import build_plan, depth_scaled_options
from vtoken.plan import Stage
from vtoken.scorers.adaptinfer import AdaptInferScorer, adaptinfer_budgets
from vtoken.scorers.testing import make_signals

IMAGE_IDS = (90, 91)


def reference_scores(att_tt, att_tv, rows):
    """Plain loops: w_h[j] = sum_{i in R} (A_h[i, j] + A_h[j, i]) - A_h[j, j];
    score[v] = sum_h sum_{j in R} w_h[j] * B_h[j, v]. att_tt (H, T, T), att_tv (H, T, n)."""
    H, _, n = att_tv.shape
    out = []
    for v in range(n):
        s = 0.0
        for h in range(H):
            for j in rows:
                w = sum(float(att_tt[h, i, j]) + float(att_tt[h, j, i]) for i in rows) - float(att_tt[h, j, j])
                s += w * float(att_tv[h, j, v])
        out.append(s)
    return out


def reference_kept(att_tt, att_tv, rows, budget):
    scores = reference_scores(att_tt, att_tv, rows)
    order = sorted(range(len(scores)), key=lambda v: -scores[v])
    return sorted(order[:budget])


def kept(sel, s):
    return sel.keep[s].nonzero().flatten().tolist()


def test_hand_computed_case():
    # one head, two text rows after the image, three candidates
    a_tt = torch.tensor([[[0.1, 0.0], [0.05, 0.5]]])  # w = (0.1+0.05+0.1-0.1, 0.5+0.55-0.5) = (0.15, 0.55)
    a_tv = torch.tensor([[[0.6, 0.1, 0.1], [0.1, 0.45, 0.15]]])  # scores .145 .2625 .0975
    after = [torch.tensor([True, True])]
    sig = make_signals([3], [1], text_counts=[2], attn_text_text=[a_tt], attn_text=[a_tv], text_after=after)
    scorer = AdaptInferScorer()
    torch.testing.assert_close(scorer.priors(sig)[0, 0], torch.tensor([0.15, 0.55]))
    torch.testing.assert_close(scorer.score(sig)[0], torch.tensor([0.145, 0.2625, 0.0975]))
    assert kept(scorer.select(sig), 0) == [1]  # the unweighted row mean would keep candidate 0
    sig.budget = torch.tensor([2])
    assert kept(scorer.select(sig), 0) == [0, 1]


def test_rows_after_ignores_text_before_the_image():
    a_tt = torch.tensor([[[0.9, 0.0, 0.0], [0.5, 0.1, 0.0], [0.5, 0.05, 0.3]]])
    a_tv = torch.tensor([[[0.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 0.2, 0.1]]])
    after = [torch.tensor([False, True, True])]
    sig = make_signals([3], [1], text_counts=[3], attn_text_text=[a_tt], attn_text=[a_tv], text_after=after)
    # R = rows 1, 2: w = (0.1 + 0.15 - 0.1, 0.3 + 0.35 - 0.3) = (0.15, 0.35)
    torch.testing.assert_close(AdaptInferScorer().priors(sig)[0, 0], torch.tensor([0.0, 0.15, 0.35]))
    assert kept(AdaptInferScorer().select(sig), 0) == reference_kept(a_tt, a_tv, [1, 2], 1) == [1]
    full = AdaptInferScorer(rows="all").priors(sig)[0, 0]
    torch.testing.assert_close(full, torch.tensor([0.9 + 1.9 - 0.9, 0.15 + 0.6 - 0.1, 0.3 + 0.85 - 0.3]))


def random_case(counts, text_counts, heads, seed, no_after=()):
    g = torch.Generator().manual_seed(seed)
    tt, tv, after = [], [], []
    for s, (c, t) in enumerate(zip(counts, text_counts)):
        rows = torch.softmax(torch.randn(heads, t, t + c + 2, generator=g) * 2, dim=-1)
        tt.append(rows[:, :, :t])
        tv.append(rows[:, :, t:t + c])
        a = torch.rand(t, generator=g) > 0.4
        after.append(torch.zeros(t, dtype=torch.bool) if s in no_after else a)
    return tt, tv, after


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rows", ["after", "all"])
def test_random_ragged_segments_match_reference(seed, rows):
    counts, text_counts, budget = [7, 3, 9, 5], [4, 6, 2, 5], [3, 1, 4, 5]
    tt, tv, after = random_case(counts, text_counts, heads=3, seed=seed, no_after=(2,))
    sig = make_signals(counts, budget, text_counts=text_counts, attn_text_text=tt, attn_text=tv, text_after=after)
    sel = AdaptInferScorer(rows=rows).select(sig)
    for s in range(len(counts)):
        r = [j for j in range(text_counts[s]) if rows == "all" or bool(after[s][j])]
        if not r:  # no text after the segment: all its text rows
            r = list(range(text_counts[s]))
        assert kept(sel, s) == reference_kept(tt[s], tv[s], r, budget[s])
        assert int(sel.keep[s].sum()) == budget[s]


def test_preset_budgets_layers_and_options():
    assert adaptinfer_budgets(64) == (133, 27, 3)
    assert adaptinfer_budgets(128) == (290, 72, 18)
    assert adaptinfer_budgets(32) == (40, 12, 1)  # the table's 0 becomes 1
    assert adaptinfer_budgets(96) == (218, 54, 14)  # 128 table scaled by 96/128 (tie -> larger)
    plan = build_plan("adaptinfer", 64)
    assert [(st.layer, st.keep) for st in plan] == [(2, 133), (11, 27), (21, 3)]
    assert all(st.scorer.name == "adaptinfer" for st in plan)
    assert depth_scaled_options("adaptinfer", 4) == {"layers": (1, 2, 3)}
    assert all(isinstance(b, float) and b <= 1.0 for b in adaptinfer_budgets(0.25))
    assert adaptinfer_budgets(1.0) == (1.0, 1.0, 1.0)
    with pytest.raises(PruningConfigError):
        build_plan("adaptinfer", 64, layers=(2, 11))
    with pytest.raises(PruningConfigError):
        AdaptInferScorer(rows="before")


class _Recording(AdaptInferScorer):
    """AdaptInfer that records the signals it was given."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def select(self, sig):
        self.seen.append(sig)
        return super().select(sig)


@pytest.mark.parametrize("arch_name", ["llava", "qwen2_vl"])
def test_signal_and_kept_set_match_unpatched_eager_attention(arch_name):
    """``attn_text_text`` == the text rows x text columns of layer L-1's attention of an unpatched
    eager run (output_attentions=True); the kept set == the reference rule on that attention."""
    L, keep = 2, 4
    model = get_model(arch_name, attn="eager")
    inputs = get_inputs(arch_name, model)
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[L - 1]  # (B, H, N, N)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    seen = []
    with vtoken.apply_pruning(model, plan=[Stage(L, _Recording(seen), keep)]) as h:
        with torch.no_grad():
            model(**inputs)
        stats = h.stats
    sig = seen[0]
    seg_of_sample = {}
    for s in range(sig.num_segments):
        seg_of_sample.setdefault(int(sig.sample[s]), []).append(s)
    checked = 0
    for b in range(ids.shape[0]):
        is_vis = (ids[b] == IMAGE_IDS[0]) | (ids[b] == IMAGE_IDS[1])
        text = torch.nonzero(mask[b] & ~is_vis).flatten()
        visual = torch.nonzero(is_vis & mask[b]).flatten()
        ref_tt = att[b][:, text][:, :, text]  # (H, T, T)
        expected = []
        for s, seg in zip(seg_of_sample.get(b, []), stats.segments[b]):
            T = int(sig.text_mask[s].sum())
            assert T == text.numel() and bool(sig.text_mask[s, :T].all())
            torch.testing.assert_close(sig.attn_text_text[s, :, :T, :T].float(), ref_tt.float(), rtol=1e-5, atol=1e-6)
            cols = visual[seg.offset: seg.offset + seg.length]
            after = [j for j in range(T) if int(text[j]) > int(cols[-1])] or list(range(T))
            ref_tv = att[b][:, text][:, :, cols]
            expected += [seg.offset + v for v in reference_kept(ref_tt, ref_tv, after, min(keep, seg.count))]
            checked += 1
        assert sorted(expected) == stats.stages[0].kept[b].tolist()
    assert checked == sig.num_segments > 0


def test_preset_runs_end_to_end_with_exact_budgets():
    model = get_model("llava")
    inputs = get_inputs("llava", model)
    with vtoken.apply_pruning(model, method="adaptinfer", keep=0.5, layers=(1, 2, 3)) as h:
        with torch.no_grad():
            model(**inputs)
        stats = h.stats
    assert [st.layer for st in stats.stages] == [1, 2, 3]
    for b, segs in enumerate(stats.segments):
        for i, st in enumerate(stats.stages):
            assert len(st.counts[b]) == len(segs)
            if i:
                assert set(st.kept[b].tolist()) <= set(stats.stages[i - 1].kept[b].tolist())


def test_final_budget_count_keeps_n_after_the_last_stage():
    """``budget="final"`` (what ``vtoken eval``'s "Retain N" blocks ask for, as for SparseVLM): the
    table whose last stage is nearest N, scaled so that the last stage keeps exactly N; hand-computed
    from the released tables (128: 290 / 72 / 18, 64: 133 / 27 / 3, 48: 80 / 24 / 2)."""
    from vtoken.methods import budget_count_options

    assert adaptinfer_budgets(64, "final") == (1031, 256, 64)  # 128 table x 64/18
    assert adaptinfer_budgets(192, "final") == (3093, 768, 192)  # more than 576: keeps all there
    assert adaptinfer_budgets(3, "final") == (133, 27, 3)  # the 64 table itself
    assert adaptinfer_budgets(2, "final") == (80, 24, 2)  # the 48 table; the 32 table (ends at 0) never
    b = adaptinfer_budgets(64 / 576, "final")
    assert b[0] == 1.0 and b[2] == 64 / 576 and b[1] == pytest.approx(72 * 64 / 18 / 576)
    assert budget_count_options("adaptinfer", "final") == {"budget": "final"}
    plan = build_plan("adaptinfer", 64, budget="final")
    assert [st.keep for st in plan] == [1031, 256, 64]
    with pytest.raises(PruningConfigError, match="'equivalent' or 'final'"):
        adaptinfer_budgets(64, "layer")
