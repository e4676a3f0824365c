"""Evaluation of :mod:`vtoken.zoo.train`: validation during training and the final metrics.

:class:`TrainingVal` scores held-out questions through the training pipeline every few hundred
steps; :func:`evaluate_records` scores a saved checkpoint through its processor (greedy first
token, random pre-LLM pruning, full generation); :func:`subset_accuracy` is the fixed subset the
CPU tests recompute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from vtoken.data import synthetic
from vtoken.zoo import build
from vtoken.zoo.train_data import _collate, _resize_like_processor
from vtoken.zoo.train_inputs import model_inputs

if TYPE_CHECKING:
    from vtoken.zoo.train_data import _Stream


class TrainingVal:
    """Held-out questions encoded exactly as the first training turn (right padding), on the device.

    Scores the greedy first answer token from one forward pass per batch through the training
    pipeline (no processor, no generation), cheap enough to run every few hundred steps. The final
    metrics use the saved processor instead (:func:`evaluate_records`).
    """

    def __init__(self, stream: "_Stream", arch: str, records: list[dict], device, batch_size: int = 64):
        if stream.__dict__.get("tok") is None:
            stream._setup()
        pad = stream.tok.pad_token_id
        self.batches = []
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            items = []
            for r in chunk:
                if "video" in r:  # synthetic_video frames are already at the processor's size
                    img = np.stack([np.asarray(f, dtype=np.uint8) for f in r["video"]])
                else:
                    img = np.asarray(_resize_like_processor(r["image"], arch), dtype=np.uint8)
                enc = stream.encode([(r["question"], r["answer"], r["qtype"])])
                items.append((img,) + tuple(np.asarray(x, np.int64) for x in enc))
            imgs, ids, labels, seg, pos = _collate(items, pad_id=pad)
            first = (labels != -100).long().argmax(1)  # index of the first answer token
            target = ids.gather(1, first[:, None])[:, 0]
            self.batches.append(
                tuple(t.to(device) for t in (imgs, ids, seg, pos, first - 1, target)) + ([r["qtype"] for r in chunk],)
            )
        self.n = len(records)

    @torch.no_grad()
    def score(self, model, arch, pixels, image_token_id, pos_template, amp) -> dict:
        correct, per_type = 0, {}
        for imgs, ids, seg, pos, at, target, qtypes in self.batches:
            inp = model_inputs(arch, pixels, imgs, ids, seg, pos, image_token_id, pos_template, packed=False)
            with amp:
                logits = model(**inp, use_cache=False).logits
            pred = logits[torch.arange(len(at), device=at.device), at].argmax(-1)
            ok = (pred == target).tolist()
            for q, o in zip(qtypes, ok):
                c = per_type.setdefault(q, [0, 0])
                c[0] += o
                c[1] += 1
            correct += sum(ok)
        return {
            "accuracy": 100.0 * correct / max(1, self.n),
            "per_qtype": {k: round(100.0 * v[0] / v[1], 1) for k, v in sorted(per_type.items())},
        }


def _make_drop_hook(input_ids, image_token_id, keep, gen):
    is_img = input_ids == image_token_id  # (B, L)
    B, L = is_img.shape
    keep_mask = torch.ones_like(is_img)
    for b in range(B):
        pos = torch.nonzero(is_img[b]).flatten().cpu()
        n = len(pos)
        k = keep if isinstance(keep, int) else max(1, round(keep * n))
        drop = pos[torch.randperm(n, generator=gen)[: n - min(k, n)]]
        keep_mask[b, drop.to(keep_mask.device)] = False
    idx = [torch.nonzero(keep_mask[b]).flatten() for b in range(B)]
    assert len({len(x) for x in idx}) == 1, "equal visual token counts per row expected"
    idx = torch.stack(idx)  # (B, L')

    def hook(module, args, kwargs):
        emb = kwargs["inputs_embeds"]
        kwargs["inputs_embeds"] = torch.gather(emb, 1, idx.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() == 2:
            kwargs["attention_mask"] = torch.gather(am, 1, idx)
        pos = kwargs.get("position_ids")
        if pos is None:  # what the model would use: cumulative over the padding mask (left padding)
            if am is not None and am.dim() == 2:
                pos = (am.long().cumsum(-1) - 1).clamp(min=0)
            else:
                pos = torch.arange(L, device=emb.device).unsqueeze(0).expand(B, L)
        if pos.dim() == 2:
            kwargs["position_ids"] = torch.gather(pos, 1, idx)
        else:  # (3 or 4, B, L) M-RoPE
            kwargs["position_ids"] = torch.gather(pos, 2, idx.unsqueeze(0).expand(pos.shape[0], -1, -1))
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(idx.shape[1], device=emb.device)
        return args, kwargs

    return hook


def _identity(x):
    return x


def _synthetic_records(split: str, seed: int, start: int, stop: int, qtypes=synthetic.QTYPES) -> list[dict]:
    return [synthetic.make_record(split, seed, i, qtypes=qtypes) for i in range(start, stop)]


def _synthetic_video_records(split: str, seed: int, start: int, stop: int) -> list[dict]:
    from vtoken.data import synthetic_video

    return [synthetic_video.make_record(split, seed, i) for i in range(start, stop)]


class _ListRecords:
    def __init__(self, records: list[dict]):
        self.records = records

    def __call__(self, start: int, stop: int) -> list[dict]:
        return self.records[start:stop]


class _ProcessedChunks(torch.utils.data.Dataset):
    """Chunk ``c`` of a record set, run through the processor (in DataLoader workers)."""

    def __init__(self, processor, arch: str, get_records, n: int, batch_size: int):
        self.processor, self.arch, self.get, self.n, self.bs = processor, arch, get_records, n, batch_size

    def __len__(self):
        return (self.n + self.bs - 1) // self.bs

    def __getitem__(self, c: int):
        recs = self.get(c * self.bs, min(self.n, (c + 1) * self.bs))
        self.processor.tokenizer.padding_side = "left"
        video = "video" in recs[0]
        visual = {"videos": [r["video"] for r in recs]} if video else {"images": [r["image"] for r in recs]}
        inp = self.processor(
            **visual,
            text=[build.prompt(self.arch, r["question"], video=video) for r in recs],
            return_tensors="pt",
            padding=True,
        )
        return dict(inp), [(r["answer"], r["qtype"]) for r in recs]


@torch.no_grad()
def evaluate_records(model, processor, arch, get_records, n, keep=None, seed=0, generate=True,
                     batch_size=64, workers=0) -> dict:
    """Unpruned (and optionally randomly pruned) accuracy of ``model`` on ``n`` records.

    Each chunk goes through the saved processor once (in ``workers`` DataLoader processes) and is
    scored three ways: the greedy first answer token (answers are one word), the same with
    pre-LLM random pruning (``keep`` visual tokens per image: an int, or a fraction; what
    ``apply_pruning(method="random")`` at layer 0 does, original positions kept), and the full
    greedy generation of :func:`vtoken.zoo.answer` (``max_new_tokens=4``).
    """
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tok = processor.tokenizer
    lm = model.model.language_model
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        _ProcessedChunks(processor, arch, get_records, n, batch_size),
        batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
    )
    stats = {"first": {}, "random": {}, "generate": {}}

    def add(kind, qtype, ok):
        c = stats[kind].setdefault(qtype, [0, 0])
        c[0] += bool(ok)
        c[1] += 1

    for inp, meta in loader:
        inp = {k: v.to(dev) for k, v in inp.items()}
        video = "pixel_values_videos" in inp
        px = "pixel_values_videos" if video else "pixel_values"
        inp[px] = inp[px].to(dtype)
        image_token_id = model.config.video_token_id if video else model.config.image_token_id
        logits = model(**inp, use_cache=False).logits[:, -1]
        for (a, q), p in zip(meta, tok.convert_ids_to_tokens(logits.argmax(-1).tolist())):
            add("first", q, p == a)
        if keep is not None:
            handle = lm.register_forward_pre_hook(
                _make_drop_hook(inp["input_ids"], image_token_id, keep, gen), with_kwargs=True
            )
            try:
                logits = model(**inp, use_cache=False).logits[:, -1]
            finally:
                handle.remove()
            for (a, q), p in zip(meta, tok.convert_ids_to_tokens(logits.argmax(-1).tolist())):
                add("random", q, p == a)
        if generate:  # exactly vtoken.zoo.answer's call
            out = model.generate(
                **inp, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
            )
            texts = tok.batch_decode(out[:, inp["input_ids"].shape[1] :], skip_special_tokens=True)
            for (a, q), t in zip(meta, texts):
                add("generate", q, t.strip() == a)

    def summary(kind):
        per = stats[kind]
        tot = sum(v[1] for v in per.values())
        return {
            "accuracy": round(100.0 * sum(v[0] for v in per.values()) / max(1, tot), 2),
            "n": tot,
            "per_qtype": {k: round(100.0 * v[0] / v[1], 2) for k, v in sorted(per.items())},
        }

    res = {"first_token": summary("first")}
    if keep is not None:
        res["random_keep"] = dict(keep=keep, **summary("random"))
    if generate:
        res["generate"] = summary("generate")
    return res


def first_token_accuracy(model, processor, arch, records, batch_size=64, keep=None, seed=0) -> dict:
    """Accuracy of the greedy first answer token on ``records`` (with ``keep``: random pruning only)."""
    res = evaluate_records(model, processor, arch, _ListRecords(records), len(records), keep=keep, seed=seed,
                           generate=False, batch_size=batch_size)
    return res["random_keep"] if keep is not None else res["first_token"]


def generate_accuracy(model, processor, records, batch_size=64) -> dict:
    """Accuracy of :func:`vtoken.zoo.answer` (batched greedy generation) on ``records``."""
    from vtoken.zoo import answer

    visuals = [r["video"] if "video" in r else r["image"] for r in records]
    preds = answer(model, processor, visuals, [r["question"] for r in records], batch_size=batch_size)
    ok = [p == r["answer"] for p, r in zip(preds, records)]
    return {"accuracy": 100.0 * sum(ok) / max(1, len(ok)), "n": len(ok)}


def subset_accuracy(model, processor, split="test", seed=0, n=100, video=False) -> float:
    """What ``tests/test_zoo_checkpoints.py`` recomputes on the CPU: :func:`vtoken.zoo.answer` in
    batches of 25 on the first ``n`` records of ``split`` with ``seed`` (``video``: of
    :mod:`vtoken.data.synthetic_video`)."""
    if video:
        from vtoken.data import synthetic_video

        recs = synthetic_video.make_split(split, n, seed=seed)
    else:
        recs = synthetic.make_split(split, n, seed=seed)
    return generate_accuracy(model, processor, recs, batch_size=25)["accuracy"]
