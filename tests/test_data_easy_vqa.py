"""The easy-vqa loader returns well-formed records (needs `pip install easy-vqa`)."""

import pytest

pytest.importorskip("easy_vqa", reason="pip install easy-vqa")

from vtoken.data import easy_vqa  # noqa: E402


def test_test_split_records_are_well_formed():
    recs = easy_vqa.load_easy_vqa("test", limit=40)
    vocab = set(easy_vqa.answer_vocab())
    assert len(recs) == 40
    for r in recs:
        assert {"image", "question", "answers", "answer", "qtype", "id"} <= set(r)
        assert r["image"].mode == "RGB" and r["image"].size == (64, 64)
        assert r["question"].endswith("?")
        assert r["answer"] in vocab and r["answers"] == [r["answer"]] * 10
        assert r["qtype"] in ("yes/no", "color", "shape")
    assert len({r["id"] for r in recs}) == 40


def test_whole_test_split_and_seeded_subsets():
    assert len(easy_vqa.questions("test")) == 9673
    a = easy_vqa.load_easy_vqa("test", limit=10, seed=3)
    b = easy_vqa.load_easy_vqa("test", limit=10, seed=3)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [r["id"] for r in a] != [r["id"] for r in easy_vqa.load_easy_vqa("test", limit=10)]
    with pytest.raises(ValueError):
        easy_vqa.load_easy_vqa("val")


def test_every_question_tokenizes_without_unknown_words():
    from vtoken.zoo.build import build_tokenizer

    tok = build_tokenizer()
    for split in ("train", "test"):
        for q, a, _ in easy_vqa.questions(split)[:3000]:
            ids = tok(f"{q} {a}", add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, q
