"""vtoken.data.synthetic_video: answers recovered from the rendered pixels, determinism, disjoint
splits, balanced types, the vocabulary (appended: the shipped checkpoints' ids unchanged)."""

import json
import os
from collections import Counter

import numpy as np
import pytest

from vtoken.data import synthetic_video as sv
from vtoken.data.synthetic import COLORS

N = 120  # records checked from pixels


def _cells_from_pixels(frames):
    """{pair: {colour: (row, col)}} read off the frames: the colour at each cell's centre pixel."""
    size = frames[0].size[0]
    cell = size / sv.GRID
    palette = {c: np.array(rgb) for c, rgb in COLORS.items()}
    out = {}
    for p in range(len(frames) // 2):
        a, b = np.asarray(frames[2 * p], np.int32), np.asarray(frames[2 * p + 1], np.int32)
        assert np.array_equal(a, b), "the two frames of a pair differ"
        seen = {}
        for r in range(sv.GRID):
            for c in range(sv.GRID):
                px = a[int((r + 0.5) * cell), int((c + 0.5) * cell)]
                hit = [name for name, rgb in palette.items() if np.abs(px - rgb).max() <= 2]
                if hit:
                    assert hit[0] not in seen, "a colour in two cells of one frame pair"
                    seen[hit[0]] = (r, c)
        out[p] = seen
    return out


def _answer_from_pixels(frames, question, qtype):
    """The answer computed from the pixels alone (independent of the generator's bookkeeping)."""
    cells = _cells_from_pixels(frames)
    first = {}
    for p in sorted(cells):
        for col in cells[p]:
            first.setdefault(col, p)
    words = question.replace("?", " ?").split()
    if qtype == "order":
        a, b = words[2], words[7]
        assert first[a] != first[b]
        return "yes" if first[a] < first[b] else "no"
    if qtype == "motion":
        col = words[4]
        track = [cells[p][col] for p in sorted(cells) if col in cells[p]]
        dr, dc = track[-1][0] - track[0][0], track[-1][1] - track[0][1]
        assert (dr == 0) != (dc == 0) and max(abs(dr), abs(dc)) >= 2  # one axis, >= 2 cells (28 px)
        return {(0, -1): "left", (0, 1): "right", (-1, 0): "up", (1, 0): "down"}[(int(np.sign(dr)), int(np.sign(dc)))]
    if qtype == "count_video":
        per_pair = [len(cells[p]) for p in cells]
        total = len(first)
        assert max(per_pair) < total, "one frame pair shows every object"
        return str(total)
    if qtype == "flash":
        n_pairs = Counter(col for p in cells for col in cells[p])
        once = [col for col, k in n_pairs.items() if k == 1]
        assert len(once) == 1
        return once[0]
    if qtype == "when":
        return str(first[words[3]])
    raise AssertionError(qtype)


@pytest.fixture(scope="module")
def test_records():
    return sv.make_split("test", N, seed=0, qtypes=sv.QTYPES + sv.AUX_QTYPES)


def test_answers_are_correct_from_the_pixels(test_records):
    for r in test_records:
        assert len(r["video"]) == sv.FRAMES and r["video"][0].size == (sv.FRAME_SIZE, sv.FRAME_SIZE)
        assert _answer_from_pixels(r["video"], r["question"], r["qtype"]) == r["answer"], r["id"]


def test_hand_built_clip():
    clip = sv.Clip((
        sv.Track("red", "circle", 0, 3, ((2, 1), (2, 2), (2, 3), (2, 4))),  # moves right
        sv.Track("blue", "triangle", 2, 2, ((5, 5),)),  # flashes in pair 2
        sv.Track("green", "rectangle", 1, 3, ((5, 2), (5, 2), (5, 2))),
    ))
    frames = sv.render_clip(clip)
    rng = np.random.default_rng(0)
    assert sv.make_question(clip, "motion", rng) == ("which way does the red object move?", "right")
    assert sv.make_question(clip, "flash", rng) == ("what color is the object that flashes?", "blue")
    assert sv.make_question(clip, "count_video", rng) == ("how many objects appear in the video?", "3")
    cells = _cells_from_pixels(frames)
    assert cells[0] == {"red": (2, 1)} and cells[2] == {"red": (2, 3), "blue": (5, 5), "green": (5, 2)}
    for _ in range(10):
        q, a = sv.make_question(clip, "order", rng)
        assert _answer_from_pixels(frames, q, "order") == a


def test_flash_object_is_one_token_of_the_clip(test_records):
    """Pruning matters: the flash object covers exactly one (frame pair, cell) token of 256."""
    for r in test_records:
        if r["qtype"] == "flash":
            cells = _cells_from_pixels(r["video"])
            assert sum(r["answer"] in cells[p] for p in cells) == 1


def test_deterministic_and_prefix_stable():
    a = sv.make_split("test", 12, seed=3)
    b = sv.make_split("test", 20, seed=3)[:12]
    for x, y in zip(a, b):
        assert (x["question"], x["answer"], x["clip"]) == (y["question"], y["answer"], y["clip"])
        assert all(np.array_equal(np.asarray(f), np.asarray(g)) for f, g in zip(x["video"], y["video"]))
    c = sv.make_split("test", 12, seed=4)
    assert [x["clip"] for x in a] != [x["clip"] for x in c]


def test_splits_are_disjoint():
    train = {sv.clip_key(sv.make_clip(np.random.default_rng([1, i]), "train")) for i in range(300)}
    test = {sv.clip_key(r["clip"]) for r in sv.make_split("test", 100, seed=0)}
    assert not train & test
    assert all(sv.clip_split(r["clip"]) == "test" for r in sv.make_split("test", 20, seed=1))


def test_question_types_are_balanced():
    recs = sv.make_split("test", 400, seed=0)
    assert Counter(r["qtype"] for r in recs) == {t: 100 for t in sv.QTYPES}
    order = Counter(r["answer"] for r in recs if r["qtype"] == "order")
    assert abs(order["yes"] - order["no"]) <= 25
    motion = Counter(r["answer"] for r in recs if r["qtype"] == "motion")
    assert set(motion) == set(sv.DIRECTIONS) and min(motion.values()) >= 12
    assert set(r["answer"] for r in recs if r["qtype"] == "count_video") == {"3", "4", "5"}


def test_bad_arguments():
    with pytest.raises(ValueError):
        sv.make_split("val", 2)
    with pytest.raises(ValueError):
        sv.make_split("test", 2, qtypes=("shape",))


def test_vocabulary_covers_every_word_and_keeps_old_ids(test_records):
    from vtoken.zoo import build

    tok = build.build_tokenizer()
    unk = tok.unk_token_id
    rng = np.random.default_rng(0)
    texts = [r["question"] + " " + r["answer"] for r in test_records]
    for i in range(40):
        clip = sv.make_clip(np.random.default_rng([5, i]))
        texts += [q + " " + a for q, a, _ in sv.make_questions(clip, rng, 30, sv.QTYPES + sv.AUX_QTYPES)]
    for t in texts:
        assert unk not in tok(t, add_special_tokens=False)["input_ids"], t
    vocab = build.vocabulary()
    here = os.path.join(os.path.dirname(build.__file__), "checkpoints")
    for name in ("tiny-llava", "tiny-qwen2vl", "tiny-qwen2vl-video"):
        with open(os.path.join(here, name, "tokenizer.json")) as fh:
            old = json.load(fh)["model"]["vocab"]
        assert all(vocab[i] == w for w, i in old.items()), name  # appended, earlier ids unchanged
        assert len(vocab) >= len(old)  # the image checkpoints trained since the video words came have them all


def test_visual_tokens_per_clip_through_the_processor():
    from vtoken.zoo import build

    proc = build.build_processor("qwen2vl")
    r = sv.make_split("test", 1)[0]
    out = proc(videos=[r["video"]], text=[build.prompt("qwen2vl", r["question"], video=True)], return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[sv.PAIRS, 16, 16]]
    assert int((out["input_ids"] == proc.video_token_id).sum()) == sv.visual_tokens() == 256
