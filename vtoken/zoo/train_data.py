"""Training data of :mod:`vtoken.zoo.train`: the endless stream of packed training sequences.

Renders synthetic scenes (and, optionally, easy-vqa train images) at the processor's final size
in DataLoader workers, encodes one image and its question/answer turns per sequence
(:class:`_Stream`), pads them into batches (:func:`_collate`) and builds the packed-turn
attention mask (:func:`packed_attention_mask`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vtoken.data import synthetic, synthetic_video
from vtoken.zoo import build


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


DEFAULT_VIDEO_QTYPE_MIX = "order=2,motion=1,count_video=1,flash=1,when=1"


def parse_qtype_mix(spec: str, video: bool = False) -> tuple[str, ...]:
    """``"shape=1,left=2,..."`` -> the round of question types (a type listed w times), for
    :func:`vtoken.data.synthetic.make_questions` (``video``: of :mod:`vtoken.data.synthetic_video`)."""
    mod = synthetic_video if video else synthetic
    known = mod.QTYPES + mod.AUX_QTYPES
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
                 packed: bool = True, video: bool = False):
        self.arch, self.seed, self.k, self.easy_frac = arch, seed, qa_per_image, easy_frac
        self.qtypes = tuple(qtypes)
        self.packed = packed
        #: video=True: synthetic_video clips, (T, H, W, 3) uint8 frames (Qwen2-VL only)
        self.video = video

    def _setup(self):
        self.tok = build.build_tokenizer()
        self._ids_cache: dict[str, list[int]] = {}
        if self.video:  # the stream's "image token" is then the video token
            self.n_image_tokens = synthetic_video.visual_tokens(patch=build.QWEN_PATCH)
            image_token, placeholder = build.QWEN_VIDEO_PAD, build.video_placeholder(self.arch)
        else:
            self.n_image_tokens = 576  # both: 336 px images, 14 px per visual token
            image_token = build.LLAVA_IMAGE if self.arch == "llava" else build.QWEN_IMAGE_PAD
            placeholder = build.image_placeholder(self.arch)
        self.image_token_id = self.tok.convert_tokens_to_ids(image_token)
        pre = [self.tok.bos_token_id] + self._ids(f"USER: {placeholder}")
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
        rng = np.random.default_rng([7 + 10 * self.video, self.seed, wid])
        while True:
            if self.video:
                clip = synthetic_video.make_clip(rng, "train")
                qas = synthetic_video.make_questions(clip, rng, self.k, self.qtypes)
                frames = np.stack([np.asarray(f, dtype=np.uint8) for f in synthetic_video.render_clip(clip)])
                yield (frames,) + tuple(np.asarray(x, np.int64) for x in self.encode(qas))
                continue
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


class _MixedStream(torch.utils.data.IterableDataset):
    """Whole collated batches, each all images (``image_stream``) or, with probability
    ``video_frac``, all videos (``video_stream``): a batch's pixels must share one shape.
    Yields what :func:`_collate` returns; the videos' ``imgs`` are (B, T, H, W, 3)."""

    def __init__(self, image_stream: _Stream, video_stream: _Stream, batch_size: int, video_frac: float,
                 pad_id: int, seed: int = 0):
        self.image_stream, self.video_stream = image_stream, video_stream
        self.bs, self.video_frac, self.pad_id, self.seed = batch_size, video_frac, pad_id, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([11, self.seed, info.id if info is not None else 0])
        streams = (iter(self.image_stream), iter(self.video_stream))
        while True:
            it = streams[int(rng.random() < self.video_frac)]
            yield _collate([next(it) for _ in range(self.bs)], self.pad_id)
