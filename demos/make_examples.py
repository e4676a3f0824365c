"""Regenerate the demo's example images (``demos/examples/*.png`` + ``examples.json``).

The examples are scenes of vtoken's synthetic VQA set (:mod:`vtoken.data.synthetic`, test split),
the distribution the shipped ``vtoken/tiny-llava`` checkpoint was trained on, so its answers are
meaningful. Run from the repository root::

    python demos/make_examples.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "examples"
# one example per question type that shows pruning at work (small objects, spatial relations)
WANTED = ("shape", "color", "count_all", "above", "exist", "size")


def main() -> None:
    from vtoken.data import synthetic

    OUT.mkdir(exist_ok=True)
    records = synthetic.make_split("test", 48, seed=7)
    chosen = {}
    for rec in records:
        if rec["qtype"] in WANTED and rec["qtype"] not in chosen and len(rec["scene"].objects) >= 5:
            chosen[rec["qtype"]] = rec
    listing = []
    for qtype in WANTED:
        rec = chosen.get(qtype)
        if rec is None:
            continue
        name = f"{qtype}.png"
        rec["image"].save(OUT / name, optimize=True)
        listing.append({"image": name, "question": rec["question"], "answer": rec["answer"], "qtype": qtype})
    (OUT / "examples.json").write_text(json.dumps(listing, indent=1) + "\n")
    print(f"wrote {len(listing)} examples to {OUT}")


if __name__ == "__main__":
    main()
