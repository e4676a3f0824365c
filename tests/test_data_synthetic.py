"""The synthetic multi-object VQA generator: deterministic, disjoint splits, consistent answers."""

import numpy as np
import pytest

from vtoken.data import synthetic as S


def _sig(rec):
    return (rec["id"], rec["question"], rec["answer"], rec["qtype"], np.asarray(rec["image"]).tobytes())


def test_records_have_the_documented_keys():
    recs = S.make_split("test", 16)
    for r in recs:
        assert {"image", "question", "answers", "answer", "qtype", "id"} <= set(r)
        assert r["image"].mode == "RGB" and r["image"].size == (336, 336)
        assert isinstance(r["question"], str) and r["question"].endswith("?")
        assert r["answer"] in S.ANSWER_VOCAB
        assert r["answers"] and all(a == r["answer"] for a in r["answers"])
        assert r["qtype"] in S.QTYPES
    assert len({r["id"] for r in recs}) == len(recs)
    # question types are balanced round-robin
    assert [r["qtype"] for r in recs[:8]] == list(S.QTYPES)


def test_deterministic_by_seed_and_prefix_stable():
    a = S.make_split("train", 12, seed=5)
    b = S.make_split("train", 12, seed=5)
    assert [_sig(r) for r in a] == [_sig(r) for r in b]
    c = S.make_split("train", 20, seed=5)
    assert [_sig(r) for r in a] == [_sig(r) for r in c[:12]]
    d = S.make_split("train", 12, seed=6)
    assert [_sig(r)[1:] for r in a] != [_sig(r)[1:] for r in d]


def test_splits_are_disjoint():
    train = S.make_split("train", 150, seed=0)
    test = S.make_split("test", 150, seed=0)
    tr = {S.scene_key(r["scene"]) for r in train}
    te = {S.scene_key(r["scene"]) for r in test}
    assert not tr & te
    assert all(S.scene_split(r["scene"]) == "train" for r in train)
    assert all(S.scene_split(r["scene"]) == "test" for r in test)
    # whatever the seeds: a train seed never yields a test scene
    rng = np.random.default_rng(123)
    for _ in range(50):
        assert S.scene_split(S.make_scene(rng, "train")) == "train"
    with pytest.raises(ValueError):
        S.make_split("val", 1)


def test_answers_agree_with_the_scene():
    for r in S.make_split("test", 80, seed=2):
        objs = r["scene"].objects
        by_color = {o.color: o for o in objs}
        q, a, t = r["question"], r["answer"], r["qtype"]
        assert len({o.color for o in objs}) == len(objs)  # colours name objects uniquely
        assert S.MIN_OBJECTS <= len(objs) <= S.MAX_OBJECTS
        if t == "count_all":
            assert a == str(len(objs))
        elif t == "count_shape":
            plural = q.split()[2]
            shape = {v: k for k, v in S.SHAPE_PLURAL.items()}[plural]
            assert a == str(sum(o.shape == shape for o in objs))
        elif t in ("shape", "size"):
            color = q.split()[4]
            assert a == getattr(by_color[color], t)
        elif t == "color":
            shape = q.rstrip("?").split()[-1]
            assert [o.color for o in objs if o.shape == shape] == [a]
        elif t == "exist":
            _, _, _, color, shape = q.rstrip("?").split()
            assert (a == "yes") == any(o.color == color and o.shape == shape for o in objs)
        elif t in ("left", "above"):
            words = q.rstrip("?").split()
            c1, c2 = words[2], words[-2]
            axis = "x" if t == "left" else "y"
            assert (a == "yes") == (getattr(by_color[c1], axis) < getattr(by_color[c2], axis))


def test_objects_are_small_and_drawn():
    rec = S.make_split("test", 1, seed=9)[0]
    img = np.asarray(rec["image"]).astype(int)
    for o in rec["scene"].objects:
        side = S.SIZE_FRAC[o.size] * 336
        assert side <= 2 * 14  # at most about two 14 px patches wide
        cx, cy = int(o.x * 336), int(o.y * 336)
        assert tuple(img[cy + 2, cx]) == S.COLORS[o.color]  # just below the centre: inside every shape
    # most of the canvas is background (blue channel 255, red >= the last band, green >= 255 - GRADIENT):
    # objects are small
    red_floor, green_floor = 255 - S.BAND_STEP * (S.POS_BINS - 1), 255 - S.GRADIENT
    bg = ((img[..., 2] == 255) & (img[..., 0] >= red_floor) & (img[..., 1] >= green_floor)).mean()
    assert bg > 0.9
    assert tuple(img[0, 0]) == S.BACKGROUND


def test_other_image_sizes_scale_the_scene():
    small = S.make_split("test", 2, seed=1, image_size=224)
    big = S.make_split("test", 2, seed=1)
    assert small[0]["image"].size == (224, 224)
    assert [r["question"] for r in small] == [r["question"] for r in big]


def test_relation_questions_are_unambiguous_and_balanced():
    recs = [r for r in S.make_split("test", 400, seed=3) if r["qtype"] in ("left", "above")]
    assert len(recs) == 100
    for r in recs:
        words = r["question"].rstrip("?").split()
        by_color = {o.color: o for o in r["scene"].objects}
        axis = "x" if r["qtype"] == "left" else "y"
        gap = getattr(by_color[words[-2]], axis) - getattr(by_color[words[2]], axis)
        assert abs(gap) >= S._MIN_SEP  # clearly separated along the compared axis
    yes = sum(r["answer"] == "yes" for r in recs)
    assert 35 <= yes <= 65


def test_training_questions_ask_each_fact_once_and_aux_positions_are_right():
    rng = np.random.default_rng(11)
    qtypes = S.QTYPES + ("left", "above") + S.AUX_QTYPES
    seen_aux = set()
    for _ in range(30):
        scene = S.make_scene(rng, "train")
        by_color = {o.color: o for o in scene.objects}
        qas = S.make_questions(scene, rng, 24, qtypes)
        assert len({q for q, _, _ in qas}) == len(qas)
        pairs = [(t, frozenset(q.split()[i] for i in (2, -2))) for q, _, t in qas if t in ("left", "above")]
        assert len(set(pairs)) == len(pairs)  # never both orders of one pair in one sequence
        for q, a, t in qas:
            if t in S.AUX_QTYPES:
                seen_aux.add(t)
                o = by_color[q.split()[4]]
                v = o.x if t == "column" else o.y
                assert int(a) == min(S.POS_BINS - 1, int(v * S.POS_BINS))
    assert seen_aux == set(S.AUX_QTYPES)
    # training-only types never enter a default split, and make_record is make_split's element
    assert {r["qtype"] for r in S.make_split("test", 16)} == set(S.QTYPES)
    aux = S.make_split("test", 4, seed=2, qtypes=S.AUX_QTYPES)
    assert [r["qtype"] for r in aux] == ["column", "row", "column", "row"]
    assert _sig(S.make_record("test", 2, 3)) == _sig(S.make_split("test", 4, seed=2)[3])
    with pytest.raises(ValueError):
        S.make_split("test", 1, qtypes=("nope",))


def test_detail_questions_are_decided_by_one_small_off_centre_object():
    recs = S.make_split("test", 90, seed=3, qtypes=S.DETAIL_QTYPES)
    assert {r["qtype"] for r in recs} == set(S.DETAIL_QTYPES)
    answers = {t: set() for t in S.DETAIL_QTYPES}
    for r in recs:
        objs, q, a, t = r["scene"].objects, r["question"], r["answer"], r["qtype"]
        words = q.rstrip("?").split()
        if t == "detail_shape":  # "what shape is the C object"
            target = [o for o in objs if o.color == words[4]]
            assert [o.shape for o in target] == [a]
        elif t == "detail_color":  # "what color is the S": S unique in the scene
            target = [o for o in objs if o.shape == words[-1]]
            assert [o.color for o in target] == [a]
        else:  # "is there a C S": the colour belongs to the target, the shape may not
            target = [o for o in objs if o.color == words[3]]
            assert (a == "yes") == (target[0].shape == words[4])
        (o,) = target
        assert o.size == "small"
        # off-centre by hand: the centre's distance to the image centre along x or y
        assert abs(o.x - 0.5) >= 0.3 or abs(o.y - 0.5) >= 0.3
        answers[t].add(a)
    assert answers["detail_exist"] == {"yes", "no"} and len(answers["detail_shape"]) == 3


def test_band_canvas_names_the_column_bin_and_keeps_the_row_ramp(monkeypatch):
    scene = S.Scene(())
    bands = np.asarray(S.render(scene, 336, canvas="bands")).astype(int)
    for x in range(0, 336, 7):
        assert bands[100, x, 0] == 255 - S.BAND_STEP * (x * S.POS_BINS // 336)  # the bin, by hand
    assert (bands[..., 1] == np.asarray(S.render(scene, 336, canvas="gradient"))[..., 1]).all()
    monkeypatch.setenv("VTOKEN_SYNTH_CANVAS", "bands")
    assert (np.asarray(S.render(scene, 336)) == bands).all()
    monkeypatch.setenv("VTOKEN_SYNTH_CANVAS", "stripes")
    with pytest.raises(ValueError, match="canvas must be one of"):
        S.render(scene, 336)
