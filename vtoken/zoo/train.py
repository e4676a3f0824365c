"""Train a reference checkpoint from scratch.

    python -m vtoken.zoo.train --arch llava   --out ckpt/tiny-llava
    python -m vtoken.zoo.train --arch qwen2vl --out ckpt/tiny-qwen2vl
    OUT=dir bash vtoken/zoo/train_both.sh          # both at once on one GPU, as shipped
    python -m vtoken.zoo.train --record-cpu-subset vtoken/zoo/checkpoints/tiny-llava   # on the CPU

Data: an endless stream of synthetic scenes (:mod:`vtoken.data.synthetic`, train split) and, with
``--easy-vqa-frac``, images of the ``easy-vqa`` train split, rendered by DataLoader workers. Each
training sequence holds one image and ``--qa-per-image`` independent question/answer turns packed
behind it::

    <s>USER: <image> | {q1} ASSISTANT: {a1}</s> | {q2} ASSISTANT: {a2}</s> | ...

Every turn attends only to the image prefix and to itself (a 4-D attention mask) and its
positions restart after the image, so each turn is exactly the single-question inference prompt
(:func:`vtoken.zoo.build.prompt`) and no answer can be inferred from another turn;
:func:`check_packed_turns` verifies this against one-by-one forwards before training starts (and
falls back to a causal multi-turn conversation if the installed ``transformers`` disagrees). The
loss is on the answer word and its EOS only. Pixels are normalised (and, for Qwen2-VL,
patchified) on the device in exactly the processor's arithmetic, which :func:`check_pipeline`
verifies against the saved processor.

Question mix (``--qtype-mix``): the relation types ``left`` / ``above`` are drawn twice as often as
the others, and the training-only ``column`` / ``row`` questions (:data:`synthetic.AUX_QTYPES`:
"what column is the red object in?") supervise directly what a relation needs twice, the position
of a named object. Without them the first checkpoints learned every single-object question but
stayed at chance on relations: a yes/no answer that depends on two looked-up positions gives no
useful gradient until both lookups exist. Each fact is asked once per image (a relation pair in
one order only), which keeps an image's questions diverse.

The learning-rate schedule (linear warm-up, cosine decay to 5 %) runs on
``max(step / steps, elapsed / time_budget)``, so a run ends on time with a fully decayed learning
rate whatever the device's speed; ``--deadline`` (a Unix time) also ends training early enough to
leave ``--eval-reserve`` seconds for the evaluation. Every ``--log-every`` steps the model is scored
on a held-out validation set (``--val-n`` questions of the test split with seed 1, other records
than the seed-0 ones the metrics use, plus position questions as a diagnostic), and the weights with the
best validation accuracy are the ones saved (float16, with the processor). The saved folder is then
reloaded in float32 and evaluated (``metrics.json``, ``TRAINING.md``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch
from PIL import Image

from vtoken.data import synthetic
from vtoken.zoo import build

# ------------------------------------------------------------------------------------ data stream


def _resize_like_processor(img: Image.Image, arch: str) -> Image.Image:
    """The processor's resize (PIL bicubic), so workers hand over final-size uint8 images."""
    if arch == "llava":
        target = (336, 336)  # shortest edge 336 then centre crop 336: square inputs only here
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(img.height, img.width, build.QWEN_PATCH * 2, build.QWEN_MIN_PIXELS, build.QWEN_MAX_PIXELS)
        target = (w, h)
    if img.size == target:
        return img
    return img.resize(target, Image.BICUBIC)


DEFAULT_QTYPE_MIX = "shape=1,size=1,color=1,exist=1,count_shape=1,count_all=1,left=2,above=2,column=1,row=1"


def parse_qtype_mix(spec: str) -> tuple[str, ...]:
    """``"shape=1,left=2,..."`` -> the round of question types (a type listed w times), for
    :func:`vtoken.data.synthetic.make_questions`."""
    known = synthetic.QTYPES + synthetic.AUX_QTYPES
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition("=")
        name = name.strip()
        if name not in known:
            raise ValueError(f"--qtype-mix: unknown question type {name!r} (expected one of {known})")
        weight = int(w) if w.strip() else 1
        if weight < 0:
            raise ValueError(f"--qtype-mix: weight of {name!r} must be >= 0, got {weight}")
        out += [name] * weight
    if not out:
        raise ValueError(f"--qtype-mix selects no question type: {spec!r}")
    return tuple(out)


class _Stream(torch.utils.data.IterableDataset):
    """Endless training sequences: (uint8 image, ids, labels, segment ids, position indices).

    packed=True (the default): the turns of one image are independent. Every turn is the
    inference prompt's text after the image (``{q} ASSISTANT: {a}</s>``), sees only the shared
    image prefix and itself (see :func:`packed_attention_mask`), and its positions restart where
    the first turn's do, so each turn is exactly a single-question inference sequence. No answer
    can be read off an earlier turn (a relation from its reverse or from two positions, a count
    from another count), and every supervised token sits where it sits at inference.
    packed=False: one causal multi-turn conversation (``USER: {q} ASSISTANT: {a}</s>`` turns).
    """

    def __init__(self, arch: str, seed: int, qa_per_image: int, easy_frac: float, qtypes=synthetic.QTYPES,
                 packed: bool = True):
        self.arch, self.seed, self.k, self.easy_frac = arch, seed, qa_per_image, easy_frac
        self.qtypes = tuple(qtypes)
        self.packed = packed

    def _setup(self):
        self.tok = build.build_tokenizer()
        self._ids_cache: dict[str, list[int]] = {}
        self.n_image_tokens = 576  # both: 336 px images, 14 px per visual token
        image_token = build.LLAVA_IMAGE if self.arch == "llava" else build.QWEN_IMAGE_PAD
        self.image_token_id = self.tok.convert_tokens_to_ids(image_token)
        pre = [self.tok.bos_token_id] + self._ids(f"USER: {build.image_placeholder(self.arch)}")
        j = pre.index(self.image_token_id)
        self.prefix = pre[:j] + [self.image_token_id] * self.n_image_tokens + pre[j + 1 :]
        self.easy = None
        if self.easy_frac > 0:
            from vtoken.data import easy_vqa

            by_image: dict[int, list] = {}
            for q, a, i in easy_vqa.questions("train"):
                by_image.setdefault(i, []).append((q, a, "easy"))
            self.easy = (easy_vqa, sorted(by_image.items()))

    def encode(self, qas: list[tuple[str, str, str]]):
        """``ids, labels, seg, pos`` of one image and its question/answer turns.

        ids: the image placeholder expanded to one token per visual token, as the processor does;
        labels: -100 except on answers and their EOS; seg: 0 for the image prefix, t + 1 for the
        tokens of turn t; pos: each token's position (index into the single-turn layout).
        """
        tok = self.tok
        ids = list(self.prefix)
        P = len(ids)
        labels, seg, pos = [-100] * P, [0] * P, list(range(P))
        for t, (q, a, _) in enumerate(qas):
            text = self._ids(f"{q} ASSISTANT:" if (self.packed or t == 0) else f"USER: {q} ASSISTANT:")
            ans = self._ids(a) + [tok.eos_token_id]
            n = len(text) + len(ans)
            start = P if self.packed else len(ids)
            ids += text + ans
            labels += [-100] * len(text) + ans
            seg += [t + 1 if self.packed else 1] * n
            pos += list(range(start, start + n))
        return ids, labels, seg, pos

    def _ids(self, text: str) -> list[int]:
        """Token ids of ``text`` (cached: the closed vocabulary repeats the same few thousand texts)."""
        ids = self._ids_cache.get(text)
        if ids is None:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            self._ids_cache[text] = ids
        return ids

    def __iter__(self):
        self._setup()
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        rng = np.random.default_rng([7, self.seed, wid])
        while True:
            if self.easy is not None and rng.random() < self.easy_frac:
                mod, items = self.easy
                image_id, qas = items[int(rng.integers(len(items)))]
                pick = rng.choice(len(qas), size=min(self.k, len(qas)), replace=False)
                qas = [qas[int(i)] for i in pick]
                with Image.open(mod.image_path("train", image_id)) as im:
                    img = im.convert("RGB")
            else:
                scene = synthetic.make_scene(rng, "train")
                qas = synthetic.make_questions(scene, rng, self.k, self.qtypes)
                img = synthetic.render(scene, 336)
            img = _resize_like_processor(img, self.arch)
            yield (np.asarray(img, dtype=np.uint8),) + tuple(np.asarray(x, np.int64) for x in self.encode(qas))


def _collate(batch, pad_id: int):
    """Right-padded batch: imgs, ids, labels, seg (-1 on padding), pos."""
    imgs = torch.from_numpy(np.stack([b[0] for b in batch]))
    n = max(len(b[1]) for b in batch)
    n = (n + 7) // 8 * 8
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    seg = torch.full((len(batch), n), -1, dtype=torch.long)
    pos = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (_, x, y, s, p) in enumerate(batch):
        ids[i, : len(x)] = torch.from_numpy(x)
        labels[i, : len(y)] = torch.from_numpy(y)
        seg[i, : len(s)] = torch.from_numpy(s)
        pos[i, : len(p)] = torch.from_numpy(p)
    return imgs, ids, labels, seg, pos


def packed_attention_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean mask (True = may attend) of packed turns.

    A token attends causally to the image prefix (seg 0) and to the earlier tokens of its own turn;
    padding (seg -1) is never attended to (padding rows see the prefix only, so no row is empty).
    """
    L = seg.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
    key = seg[:, None, :]
    return (((seg[:, :, None] == key) | (key == 0)) & (key >= 0) & causal)[:, None]


# ------------------------------------------------------------------------------ device-side pixels


class PixelPipeline:
    """uint8 (B, H, W, 3) at final size -> the model's pixel inputs, in the processor's arithmetic."""

    def __init__(self, processor, arch: str):
        ip = processor.image_processor
        self.arch = arch
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32)
        self.scale = float(ip.rescale_factor)
        if arch == "qwen2vl":
            self.patch, self.tp, self.merge = ip.patch_size, ip.temporal_patch_size, ip.merge_size

    def __call__(self, imgs: torch.Tensor) -> dict:
        dev = imgs.device
        x = imgs.float() * self.scale
        x = (x - self.mean.to(dev)) / self.std.to(dev)  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
        if self.arch == "llava":
            return {"pixel_values": x}
        B, C, H, W = x.shape
        p, tp, m = self.patch, self.tp, self.merge
        gh, gw = H // p, W // p
        x = x.unsqueeze(1).expand(B, tp, C, H, W)  # one frame repeated to the temporal patch
        x = x.reshape(B, 1, tp, C, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        x = x.reshape(B * gh * gw, C * tp * p * p)
        grid = torch.tensor([[1, gh, gw]] * B, dtype=torch.long, device=dev)
        return {"pixel_values": x, "image_grid_thw": grid}


def model_inputs(arch, pixels: PixelPipeline, imgs, ids, seg, pos, image_token_id, pos_template=None, packed=True):
    """Model kwargs of a training batch.

    packed: the packed-turn 4-D mask and explicit positions (LLaVA: ``pos``; Qwen2-VL: the M-RoPE
    template at ``pos``). Otherwise (one conversation or one turn per row, right-padded): the 2-D
    padding mask, the model's own positions for LLaVA and the template's prefix for Qwen2-VL.
    """
    inp = dict(pixels(imgs), input_ids=ids)
    if packed:
        inp["attention_mask"] = packed_attention_mask(seg)
        if arch == "llava":
            inp["position_ids"] = pos
    else:
        inp["attention_mask"] = (seg >= 0).long()
    if arch == "qwen2vl":
        inp["mm_token_type_ids"] = (ids == image_token_id).long()
        if packed:
            inp["position_ids"] = pos_template[:, 0][:, pos]  # (3, B, L)
        else:
            B, L = ids.shape
            inp["position_ids"] = pos_template[:, :, :L].expand(-1, B, -1)
    return inp


def qwen_position_template(model, stream: "_Stream", length: int = 2048) -> torch.Tensor:
    """M-RoPE positions (3, 1, length) of the single-turn layout, indexed by ``pos`` of a batch.

    Every training sequence starts with the same prompt prefix and one 24 x 24-token image, and
    every turn's text continues the 1-D text positions after it, so one template computed by
    ``get_rope_index`` serves every row (no per-row Python loop or device sync at each step).
    """
    if stream.__dict__.get("tok") is None:
        stream._setup()
    ids = stream.encode([("how many objects are there?", "3", "x")])[0]
    ids = ids + [stream.tok.pad_token_id] * (length - len(ids))  # text tokens: 1-D continuation
    ids_t = torch.tensor([ids])
    mm = (ids_t == stream.image_token_id).long()
    side = int(round(math.sqrt(stream.n_image_tokens))) * 2
    grid = torch.tensor([[1, side, side]])
    pos, _ = model.model.get_rope_index(
        input_ids=ids_t, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=torch.ones_like(ids_t)
    )
    return pos


def fast_patch_embed(model) -> None:
    """Training-only: run Qwen2-VL's Conv3d patch embedding as the equivalent matrix product.

    The convolution's stride equals its kernel, so it is a linear map of each flattened patch; the
    same weight is used, so the saved checkpoint is unchanged. (cuDNN's 3-D convolution over tens of
    thousands of one-voxel outputs is far slower than one GEMM.)
    """
    pe = model.model.visual.patch_embed

    def forward(hidden_states):
        w = pe.proj.weight
        x = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)
        return torch.nn.functional.linear(x, w.reshape(w.shape[0], -1))

    pe.forward = forward


def check_pipeline(arch: str, processor, n: int = 3) -> float:
    """Max |difference| between the training pipeline and the processor on a few images.

    Also asserts that the first training turn is the processor's tokenisation of the inference
    prompt (and, for Qwen2-VL, that the fast patch embedding equals the Conv3d one).
    """
    recs = synthetic.make_split("test", n, seed=123)
    imgs = [r["image"] for r in recs]
    try:
        from vtoken.data import easy_vqa

        imgs.append(easy_vqa.load_easy_vqa("test", limit=1)[0]["image"])
    except ImportError:
        pass
    ref = processor.image_processor(images=imgs, return_tensors="pt")
    arr = torch.from_numpy(np.stack([np.asarray(_resize_like_processor(im, arch)) for im in imgs]))
    mine = PixelPipeline(processor, arch)(arr)
    err = (mine["pixel_values"] - ref["pixel_values"]).abs().max().item()
    if arch == "qwen2vl":
        assert torch.equal(mine["image_grid_thw"].cpu(), ref["image_grid_thw"]), (mine["image_grid_thw"], ref["image_grid_thw"])
    # token ids: the first turn must equal the processor's tokenisation of the inference prompt
    stream = _Stream(arch, 0, 1, 0.0)
    stream._setup()
    assert stream.encode([("what column is the red object in?", "3", "column")])[0].count(
        processor.tokenizer.unk_token_id) == 0, "auxiliary question words missing from the vocabulary"
    q, a = recs[0]["question"], recs[0]["answer"]
    ids = stream.encode([(q, a, "x")])[0]
    pin = processor(images=[recs[0]["image"]], text=[build.prompt(arch, q)], return_tensors="pt")
    ref_ids = pin["input_ids"][0].tolist()
    assert ids[: len(ref_ids)] == ref_ids, "training tokenisation differs from the processor's"
    if arch == "qwen2vl":
        tid = processor.tokenizer.convert_tokens_to_ids(build.QWEN_IMAGE_PAD)
        mm = (torch.tensor([ref_ids]) == tid).long()
        assert torch.equal(mm, pin["mm_token_type_ids"].long()), "mm_token_type_ids differ"
        model = build.build_model(arch, processor.tokenizer).eval()
        px = PixelPipeline(processor, arch)(arr[:2])["pixel_values"]
        with torch.no_grad():
            ref_emb = model.model.visual.patch_embed(px)
            fast_patch_embed(model)
            err = max(err, (model.model.visual.patch_embed(px) - ref_emb).abs().max().item())
    return err


@torch.no_grad()
def check_packed_turns(arch: str, processor, n_images: int = 2, turns: int = 2) -> float:
    """Max |logit difference| between packed training turns and the same turns run one by one.

    A random model of ``arch`` runs ``n_images`` packed sequences of ``turns`` turns through the
    training path (device-side pixels, :func:`packed_attention_mask`, explicit positions /
    M-RoPE template) and every turn as its own right-padded sequence through the model's default
    path (processor pixels, 2-D attention mask, positions computed by the model). Exercises the
    installed ``transformers``' handling of custom 4-D masks and explicit positions.
    """
    recs = synthetic.make_split("test", n_images, seed=321)
    tok = processor.tokenizer
    model = build.build_model(arch, tok).eval()
    stream = _Stream(arch, 0, turns, 0.0)
    stream._setup()
    pixels = PixelPipeline(processor, arch)
    image_token_id = model.config.image_token_id
    tpl = qwen_position_template(model, stream) if arch == "qwen2vl" else None
    rng = np.random.default_rng(0)
    packed_items, singles = [], []
    for r in recs:
        img = np.asarray(_resize_like_processor(r["image"], arch), dtype=np.uint8)
        qas = synthetic.make_questions(r["scene"], rng, turns)
        packed_items.append((img,) + tuple(np.asarray(x, np.int64) for x in stream.encode(qas)))
        singles += [(r["image"], stream.encode([qa])[0]) for qa in qas]
    imgs, ids, _, seg, pos = _collate(packed_items, pad_id=tok.pad_token_id)
    out = model(**model_inputs(arch, pixels, imgs, ids, seg, pos, image_token_id, tpl, packed=True), use_cache=False).logits
    L = max(len(x) for _, x in singles)
    s_ids = torch.full((len(singles), L), tok.pad_token_id, dtype=torch.long)
    s_mask = torch.zeros((len(singles), L), dtype=torch.long)
    for i, (_, x) in enumerate(singles):
        s_ids[i, : len(x)] = torch.tensor(x)
        s_mask[i, : len(x)] = 1
    ref_in = dict(processor.image_processor(images=[im for im, _ in singles], return_tensors="pt"))
    ref_in.update(input_ids=s_ids, attention_mask=s_mask)
    if arch == "qwen2vl":
        ref_in["mm_token_type_ids"] = (s_ids == image_token_id).long()
    ref = model(**ref_in, use_cache=False).logits
    P = len(stream.prefix)
    err, k = 0.0, 0
    for b in range(len(recs)):
        for t in range(turns):
            cols = (seg[b] == t + 1).nonzero().flatten()
            n_tok = len(singles[k][1]) - P
            assert len(cols) == n_tok, (len(cols), n_tok)
            err = max(err, (out[b, cols] - ref[k, P : P + n_tok]).abs().max().item())
            err = max(err, (out[b, :P] - ref[k, :P]).abs().max().item())
            k += 1
    return err


# ----------------------------------------------------------------------------------- evaluation


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


def _synthetic_records(split: str, seed: int, start: int, stop: int) -> list[dict]:
    return [synthetic.make_record(split, seed, i) for i in range(start, stop)]


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
        inp = self.processor(
            images=[r["image"] for r in recs],
            text=[build.prompt(self.arch, r["question"]) for r in recs],
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
    image_token_id = model.config.image_token_id
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
        inp["pixel_values"] = inp["pixel_values"].to(dtype)
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

    preds = answer(model, processor, [r["image"] for r in records], [r["question"] for r in records], batch_size=batch_size)
    ok = [p == r["answer"] for p, r in zip(preds, records)]
    return {"accuracy": 100.0 * sum(ok) / max(1, len(ok)), "n": len(ok)}


def subset_accuracy(model, processor, split="test", seed=0, n=100) -> float:
    """What ``tests/test_zoo_checkpoints.py`` recomputes on the CPU: :func:`vtoken.zoo.answer` in
    batches of 25 on the first ``n`` records of ``split`` with ``seed``."""
    recs = synthetic.make_split(split, n, seed=seed)
    return generate_accuracy(model, processor, recs, batch_size=25)["accuracy"]


# --------------------------------------------------------------------------------------- training


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def train(args) -> dict:
    arch = args.arch
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # training only; the evaluation turns TF32 off
        torch.backends.cudnn.allow_tf32 = True
    tok = build.build_tokenizer()
    processor = build.build_processor(arch, tok)
    err = check_pipeline(arch, processor)
    print(f"[{arch}] pixel pipeline max|diff| vs processor = {err:.2e}", flush=True)
    if err > 1e-4:
        raise RuntimeError(f"training pixel pipeline differs from the processor by {err}")
    packed = args.packed
    if packed:
        try:
            perr = check_packed_turns(arch, processor)
        except Exception as e:  # pragma: no cover - a transformers version without custom 4-D masks
            perr = float("inf")
            print(f"[{arch}] packed-turn check failed: {type(e).__name__}: {e}", flush=True)
        print(f"[{arch}] packed turns vs one-by-one: max|logit diff| = {perr:.2e}", flush=True)
        if not perr <= 1e-4:
            print(f"[{arch}] WARNING: packed turns differ from single turns: training causal multi-turn", flush=True)
            packed = False
    if args.init:  # continue training a saved checkpoint (float32 master weights)
        from transformers.models.auto.modeling_auto import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(args.init, dtype=torch.float32, attn_implementation="sdpa")
        print(f"[{arch}] initialised from {args.init}", flush=True)
        model = model.to(dev)
    else:
        model = build.build_model(arch, tok, seed=args.seed).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{arch}] params {n_params / 1e6:.2f} M on {dev}", flush=True)
    pixels = PixelPipeline(processor, arch)
    image_token_id = model.config.image_token_id

    qtypes = parse_qtype_mix(args.qtype_mix)
    stream = _Stream(arch, args.seed, args.qa_per_image, args.easy_vqa_frac, qtypes, packed=packed)
    pos_template = None
    if arch == "qwen2vl":
        fast_patch_embed(model)
        pos_template = qwen_position_template(model, _Stream(arch, 0, 1, 0.0)).to(dev)
    val_stream = _Stream(arch, 0, 1, 0.0)
    val = TrainingVal(val_stream, arch, synthetic.make_split("test", args.val_n, seed=1), dev) if args.val_n else None
    aux_types = tuple(t for t in synthetic.AUX_QTYPES if t in qtypes)
    val_aux = (
        TrainingVal(val_stream, arch, synthetic.make_split("test", args.val_aux_n, seed=1, qtypes=aux_types), dev)
        if aux_types and args.val_aux_n else None
    )
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=functools.partial(_collate, pad_id=tok.pad_token_id),
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if args.workers > 0 else None,
        persistent_workers=False,
    )
    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in n_ or "embed" in n_ else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
        fused=dev.type == "cuda",
    )
    amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    best = {"val_acc": -1.0, "step": 0, "state": None}

    def validate(step, lr, loss):
        model.eval()
        rec = dict(step=step, t=round(time.time() - t0, 1), lr=round(lr, 6), loss=round(loss, 4) if loss is not None else None)
        if val is not None:
            v = val.score(model, arch, pixels, image_token_id, pos_template, amp)
            rec.update(val_acc=round(v["accuracy"], 2), val_per_qtype=v["per_qtype"])
            if v["accuracy"] >= best["val_acc"]:  # ties: the later (lower learning rate) weights
                best.update(val_acc=v["accuracy"], step=step,
                            state={k: t.detach().clone() for k, t in model.state_dict().items()})
        if val_aux is not None:
            rec["val_aux_per_qtype"] = val_aux.score(model, arch, pixels, image_token_id, pos_template, amp)["per_qtype"]
        model.train()
        print(f"[{arch}] {json.dumps(rec)}", flush=True)
        return rec

    t0 = time.time()
    t_end = t0 + args.time_budget if args.time_budget else float("inf")
    if args.deadline:
        t_end = min(t_end, args.deadline - args.eval_reserve)
    step, ema, log, lr = 0, None, [], 0.0
    model.train()
    it = iter(loader)
    while True:
        now = time.time()
        horizon = (now - t0) / (t_end - t0) if math.isfinite(t_end) and t_end > t0 else 0.0
        progress = max(step / args.steps, horizon)
        if progress >= 1.0:
            break
        imgs, ids, labels, seg, pos = next(it)
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        imgs, ids, labels, seg, pos = (t.to(dev, non_blocking=True) for t in (imgs, ids, labels, seg, pos))
        inp = model_inputs(arch, pixels, imgs, ids, seg, pos, image_token_id, pos_template, packed=packed)
        with amp:
            logits = model(**inp, use_cache=False).logits
        # next-token loss on answer tokens only (labels already -100 elsewhere)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0 or step % args.log_every == 0:
            lv = loss.item()
            ema = lv if ema is None else 0.8 * ema + 0.2 * lv
        if step % args.log_every == 0:
            log.append(validate(step, lr, ema))
    del it  # stops the DataLoader workers: the evaluation gets the CPU cores
    train_time = time.time() - t0
    print(f"[{arch}] trained {step} steps in {train_time:.0f} s", flush=True)
    if step % args.log_every:
        log.append(validate(step, lr, ema))
    if best["state"] is not None:
        model.load_state_dict(best["state"])
        print(f"[{arch}] keeping the weights of step {best['step']} (val_acc {best['val_acc']:.2f})", flush=True)
    return dict(model=model, processor=processor, steps=step, train_time_s=train_time, log=log, n_params=n_params,
                device=dev, best_step=best["step"], best_val_acc=best["val_acc"], qtypes=qtypes, packed=packed)


def _device_name(dev) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine() or "cpu"


def _command(argv) -> str:
    return "python3 -m vtoken.zoo.train " + " ".join(shlex.quote(a) for a in argv)


def save_and_evaluate(args, res, argv=None) -> dict:
    from vtoken import zoo
    from vtoken.zoo.processing import save_processor

    arch, model, processor = args.arch, res["model"], res["processor"]
    os.makedirs(args.out, exist_ok=True)
    model.eval()
    model.to(torch.float16).save_pretrained(args.out)
    save_processor(processor, args.out)
    dev = res["device"]
    metrics = {
        "arch": arch,
        "model_class": type(model).__name__,
        "params": res["n_params"],
        "checkpoint_bytes": os.path.getsize(os.path.join(args.out, "model.safetensors")),
        "steps": res["steps"],
        "best_step": res["best_step"],
        "best_val_acc": round(res["best_val_acc"], 2),
        "train_time_s": round(res["train_time_s"], 1),
        "trained_at": _now_iso(),
        "device": _device_name(dev),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "command": os.environ.get("VTOKEN_TRAIN_COMMAND", ""),
        "train_command": _command(sys.argv[1:] if argv is None else argv),
        "recipe": {
            "batch_size": args.batch_size, "qa_per_image": args.qa_per_image, "lr": args.lr,
            "warmup": args.warmup, "weight_decay": args.weight_decay, "easy_vqa_frac": args.easy_vqa_frac,
            "qtype_mix": args.qtype_mix, "time_budget_s": args.time_budget, "seed": args.seed,
            "packed_turns": res["packed"],
        },
        "eval_dtype": "float32",
        "visual_tokens_per_image": 576,
        "synthetic_test": {"split": "test", "seed": 0, "n": args.test_n},
        "log": res["log"],
    }
    _write_metrics(args.out, metrics)
    _tar(args)  # the checkpoint is safe even if evaluation runs out of time
    # reload exactly what was saved, in float32 without TF32, and evaluate it
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    m, p = zoo.load(args.out, device=dev, dtype=torch.float32)
    t = time.time()

    def time_left():
        return (args.deadline - time.time()) if args.deadline else float("inf")

    keep = 64 if arch == "llava" else 0.111
    ev = evaluate_records(m, p, arch, functools.partial(_synthetic_records, "test", 0), args.test_n, keep=keep,
                          seed=0, generate=True, workers=args.eval_workers)
    metrics["synthetic_unpruned_first_token"] = ev["first_token"]
    metrics["synthetic_unpruned_generate"] = ev["generate"]
    metrics["synthetic_random_keep"] = ev["random_keep"]
    drop = ev["first_token"]["accuracy"] - ev["random_keep"]["accuracy"]
    metrics["synthetic_random_keep"]["drop_points"] = round(drop, 2)
    metrics["targets"] = {
        "unpruned_accuracy_ge_90": ev["first_token"]["accuracy"] >= 90.0,
        "random_keep_drop_ge_15_points": drop >= 15.0,
        "checkpoint_le_15MB": metrics["checkpoint_bytes"] <= 15e6,
    }
    _write_metrics(args.out, metrics)
    subset_n = args.subset_n if args.subset_n is not None else (100 if arch == "llava" else 50)
    metrics["cpu_test_subset"] = {
        "split": "test", "seed": 0, "n": subset_n,
        "accuracy_device": subset_accuracy(m, p, "test", 0, subset_n),
        "device": metrics["device"] + " (float32, TF32 off)",
        "note": "tests/test_zoo_checkpoints.py recomputes this on the CPU (+-2 points); "
                "`python -m vtoken.zoo.train --record-cpu-subset DIR` adds accuracy_cpu",
    }
    if time_left() > 40:
        try:
            from vtoken.data import easy_vqa

            recs = easy_vqa.load_easy_vqa("test", limit=args.easy_test_n, seed=0)
            e = evaluate_records(m, p, arch, _ListRecords(recs), len(recs), generate=True, workers=min(2, args.eval_workers))
            metrics["easy_vqa_test"] = dict(seed=0, **e["first_token"])
            metrics["easy_vqa_test"]["accuracy_generate"] = e["generate"]["accuracy"]
        except ImportError as err:
            metrics["easy_vqa_test"] = {"error": str(err)}
    else:
        metrics["easy_vqa_test"] = {"error": f"skipped: {time_left():.0f} s left before the deadline"}
    metrics["eval_time_s"] = round(time.time() - t, 1)
    _write_metrics(args.out, metrics)
    _write_training_md(args.out, metrics)
    _tar(args)
    print(json.dumps({k: v for k, v in metrics.items() if k != "log"}, indent=1), flush=True)
    return metrics


def _write_metrics(out: str, metrics: dict) -> None:
    # the log goes last, so the file reads top-down
    ordered = {k: v for k, v in metrics.items() if k != "log"}
    ordered["log"] = metrics.get("log", [])
    tmp = os.path.join(out, "metrics.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(ordered, fh, indent=2)
    os.replace(tmp, os.path.join(out, "metrics.json"))


def _write_training_md(out: str, m: dict) -> None:
    name = os.path.basename(os.path.normpath(out))
    ft, rk, gen = m["synthetic_unpruned_first_token"], m["synthetic_random_keep"], m["synthetic_unpruned_generate"]
    qt = sorted(ft["per_qtype"])
    rows = [
        "| | all | " + " | ".join(qt) + " |",
        "|---|---|" + "---|" * len(qt),
        f"| unpruned (576 tokens) | {ft['accuracy']:.2f} | " + " | ".join(f"{ft['per_qtype'][q]:.1f}" for q in qt) + " |",
        f"| random, keep {rk['keep']} | {rk['accuracy']:.2f} | "
        + " | ".join(f"{rk['per_qtype'].get(q, float('nan')):.1f}" for q in qt) + " |",
    ]
    ev = m.get("easy_vqa_test", {})
    easy = f"{ev['accuracy']:.2f} % (first token), {ev['accuracy_generate']:.2f} % (generate), n = {ev['n']}" if "accuracy" in ev else ev.get("error", "n/a")
    r = m["recipe"]
    text = f"""# {name}: training record

Trained from scratch by `vtoken.zoo.train` (written by the training run itself).

- command: `{m['command'] or m['train_command']}`
- training process: `{m['train_command']}`
- trained: {m['trained_at']}, {m['train_time_s']} s of training, {m['steps']} steps; saved weights: step {m['best_step']} (best validation accuracy, {m['best_val_acc']:.2f} %)
- device: {m['device']}; torch {m['torch']}, transformers {m['transformers']}
- model: `{m['model_class']}`, {m['params'] / 1e6:.2f} M parameters, {m['checkpoint_bytes'] / 1e6:.1f} MB (float16), {m['visual_tokens_per_image']} visual tokens per 336 px image
- data: `vtoken.data.synthetic` train split (+ easy-vqa train images, share {r['easy_vqa_frac']}), {r['batch_size']} images x {r['qa_per_image']} questions per step, question mix `{r['qtype_mix']}`
- optimiser: AdamW, peak learning rate {r['lr']}, {r['warmup']} warm-up steps, cosine to 5 % over the time budget, weight decay {r['weight_decay']}, bf16 autocast
- validation: {m['log'][-1].get('val_acc', 'n/a') if m['log'] else 'n/a'} % at the last step (test split, seed 1; the metrics below use seed 0)

Synthetic test split (seed 0, n = {ft['n']}), greedy first answer token, float32 on the device
(generation: {gen['accuracy']:.2f} %):

{chr(10).join(rows)}

Random pruning loses {rk['drop_points']:.1f} points. easy-VQA test: {easy}.
Fixed CPU-test subset ({m['cpu_test_subset']['n']} questions): {m['cpu_test_subset']['accuracy_device']:.1f} % on the device.
Everything measured is in `metrics.json` (per-step validation log included).
"""
    with open(os.path.join(out, "TRAINING.md"), "w") as fh:
        fh.write(text)


def _tar(args):
    if not args.tar:
        return
    import tarfile

    tmp = args.tar + ".tmp"
    with tarfile.open(tmp, "w") as tf:
        tf.add(args.out, arcname=os.path.basename(os.path.normpath(args.out)),
               filter=lambda ti: None if ti.name.endswith(".tmp") else ti)
    os.replace(tmp, args.tar)


def record_cpu_subset(path: str) -> dict:
    """Recompute the fixed-subset accuracy of the checkpoint at ``path`` on the CPU (float32) and
    store it as ``metrics["cpu_test_subset"]["accuracy_cpu"]``."""
    from vtoken import zoo

    torch.manual_seed(0)
    with open(os.path.join(path, "metrics.json")) as fh:
        metrics = json.load(fh)
    rec = metrics["cpu_test_subset"]
    m, p = zoo.load(path, device="cpu", dtype=torch.float32)
    rec["accuracy_cpu"] = subset_accuracy(m, p, rec["split"], rec["seed"], rec["n"])
    rec["cpu"] = f"{_device_name(torch.device('cpu'))}, torch {torch.__version__}, transformers {__import__('transformers').__version__}"
    _write_metrics(path, metrics)
    print(json.dumps({os.path.basename(os.path.normpath(path)): rec}), flush=True)
    return rec


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=build.ARCHS)
    ap.add_argument("--out", help="checkpoint folder to write")
    ap.add_argument("--record-cpu-subset", metavar="DIR", nargs="+", default=None,
                    help="only recompute metrics['cpu_test_subset']['accuracy_cpu'] of these checkpoint folders")
    ap.add_argument("--steps", type=int, default=100000, help="upper bound on optimizer steps")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds of training (0 = steps only)")
    ap.add_argument("--deadline", type=float, default=0, help="Unix time by which the whole run must be done")
    ap.add_argument("--eval-reserve", type=float, default=90, help="seconds kept for evaluation before --deadline")
    ap.add_argument("--batch-size", type=int, default=64, help="images per step")
    ap.add_argument("--qa-per-image", type=int, default=24)
    ap.add_argument("--qtype-mix", default=DEFAULT_QTYPE_MIX, help="training question types and their weights")
    ap.add_argument("--no-packed", dest="packed", action="store_false",
                    help="causal multi-turn sequences instead of independent packed turns")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--easy-vqa-frac", type=float, default=0.1, help="share of easy-vqa train images")
    ap.add_argument("--workers", type=int, default=max(1, min(7, (os.cpu_count() or 2) - 1)))
    ap.add_argument("--eval-workers", type=int, default=max(0, min(6, (os.cpu_count() or 2) // 2 - 1)))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--init", default="", help="start from this checkpoint folder instead of random weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-n", type=int, default=512, help="held-out questions scored at each log step")
    ap.add_argument("--val-aux-n", type=int, default=128, help="held-out position questions (diagnostic)")
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--test-n", type=int, default=2000, help="synthetic test questions in the final evaluation")
    ap.add_argument("--subset-n", type=int, default=None,
                    help="fixed test subset the CPU tests re-check (default 100 for llava, 50 for qwen2vl)")
    ap.add_argument("--easy-test-n", type=int, default=1000)
    ap.add_argument("--tar", default="", help="also pack the checkpoint folder into this tar file")
    args = ap.parse_args(argv)
    if args.record_cpu_subset is None and (not args.arch or not args.out):
        ap.error("--arch and --out are required (unless --record-cpu-subset)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.record_cpu_subset:
        for path in args.record_cpu_subset:
            record_cpu_subset(path)
        return
    if args.easy_vqa_frac > 0:
        try:
            from vtoken.data import easy_vqa

            easy_vqa.easy_vqa_dir()
        except ImportError:
            print("easy-vqa not installed: training on synthetic data only", file=sys.stderr)
            args.easy_vqa_frac = 0.0
    res = train(args)
    save_and_evaluate(args, res, argv)


if __name__ == "__main__":
    main()
