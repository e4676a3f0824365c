"""Train a reference checkpoint from scratch.

    python -m vtoken.zoo.train --arch llava   --out ckpt/tiny-llava
    python -m vtoken.zoo.train --arch qwen2vl --out ckpt/tiny-qwen2vl

Data: an endless stream of synthetic scenes (:mod:`vtoken.data.synthetic`, train split) and, with
``--easy-vqa-frac``, images of the ``easy-vqa`` train split, rendered by DataLoader workers. Each
training sequence holds one image and ``--qa-per-image`` question/answer turns::

    <s>USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s> ...

The first turn is exactly the inference prompt (:func:`vtoken.zoo.build.prompt`); the loss is on the
answer word and its EOS only. Pixels are normalised (and, for Qwen2-VL, patchified) on the device
in exactly the processor's arithmetic, which :func:`check_pipeline` verifies against the saved
processor before training starts.

The learning-rate schedule runs on ``max(step / steps, elapsed / time_budget)``, so a run ends on
time with a fully decayed learning rate whatever the device's speed. At the end the model is saved
in float16 with its processor, reloaded from disk, and evaluated with :func:`vtoken.zoo.answer`
(``metrics.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
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


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, arch: str, seed: int, qa_per_image: int, easy_frac: float, max_len: int = 1024):
        self.arch, self.seed, self.k, self.easy_frac, self.max_len = arch, seed, qa_per_image, easy_frac, max_len

    def _setup(self):
        self.tok = build.build_tokenizer()
        self.n_image_tokens = 576  # both: 336 px images, 14 px per visual token
        image_token = build.LLAVA_IMAGE if self.arch == "llava" else build.QWEN_IMAGE_PAD
        self.image_token_id = self.tok.convert_tokens_to_ids(image_token)
        self.easy = None
        if self.easy_frac > 0:
            from vtoken.data import easy_vqa

            by_image: dict[int, list] = {}
            for q, a, i in easy_vqa.questions("train"):
                by_image.setdefault(i, []).append((q, a, "easy"))
            self.easy = (easy_vqa, sorted(by_image.items()))

    def encode(self, qas: list[tuple[str, str, str]]):
        """Token ids and labels (-100 except answers + EOS) of a multi-turn sequence.

        The image placeholder is expanded to one token per visual token, as the processor does.
        """
        tok = self.tok
        texts = [build.prompt(self.arch, qas[0][0])]
        texts += [f"USER: {q} ASSISTANT:" for q, _, _ in qas[1:]]
        texts += [a for _, a, _ in qas]
        enc = tok(texts, add_special_tokens=False)["input_ids"]
        n = len(qas)
        ids: list[int] = []
        labels: list[int] = []
        for t in range(n):
            seg = enc[t]
            if t == 0:
                j = seg.index(self.image_token_id)
                seg = [tok.bos_token_id] + seg[:j] + [self.image_token_id] * self.n_image_tokens + seg[j + 1 :]
            ans = enc[n + t] + [tok.eos_token_id]
            ids += seg + ans
            labels += [-100] * len(seg) + ans
        return ids, labels

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
                qas = synthetic.make_questions(scene, rng, self.k)
                img = synthetic.render(scene, 336)
            img = _resize_like_processor(img, self.arch)
            ids, labels = self.encode(qas)
            yield np.asarray(img, dtype=np.uint8), np.asarray(ids, np.int64), np.asarray(labels, np.int64)


def _collate(batch, pad_id: int):
    imgs = torch.from_numpy(np.stack([b[0] for b in batch]))
    n = max(len(b[1]) for b in batch)
    n = (n + 7) // 8 * 8
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (_, x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.from_numpy(x)
        labels[i, : len(y)] = torch.from_numpy(y)
        mask[i, : len(x)] = 1
    return imgs, ids, labels, mask


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


def model_inputs(arch, pixels: PixelPipeline, imgs, ids, mask, image_token_id, pos_template=None):
    inp = dict(pixels(imgs), input_ids=ids, attention_mask=mask)
    if arch == "qwen2vl":
        inp["mm_token_type_ids"] = (ids == image_token_id).long()
        if pos_template is not None:
            B, L = ids.shape
            inp["position_ids"] = pos_template[:, :, :L].expand(-1, B, -1)
    return inp


def qwen_position_template(model, stream: "_Stream", length: int = 2048) -> torch.Tensor:
    """M-RoPE positions (3, 1, length) shared by every training row.

    Every training sequence starts with the same prompt prefix and one 24 x 24-token image, so
    their 3-D positions agree wherever they are not padding; computing them once replaces
    ``get_rope_index``'s per-row Python loop (and its device syncs) at every step.
    """
    if stream.__dict__.get("tok") is None:
        stream._setup()
    ids, _ = stream.encode([("how many objects are there?", "3", "x")])
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
    """Max |difference| between the training pipeline and the processor on a few images."""
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
    q, a = recs[0]["question"], recs[0]["answer"]
    ids, labels = stream.encode([(q, a, "x")])
    pin = processor(images=[recs[0]["image"]], text=[build.prompt(arch, q)], return_tensors="pt")
    ref_ids = pin["input_ids"][0].tolist()
    assert ids[: len(ref_ids)] == ref_ids, "training tokenisation differs from the processor's"
    if arch == "qwen2vl":
        tid = processor.tokenizer.convert_tokens_to_ids(build.QWEN_IMAGE_PAD)
        mm = (torch.tensor([ref_ids]) == tid).long()
        assert torch.equal(mm, pin["mm_token_type_ids"].long()), "mm_token_type_ids differ"
    if arch == "qwen2vl":
        model = build.build_model(arch, processor.tokenizer).eval()
        px = PixelPipeline(processor, arch)(arr[:2])["pixel_values"]
        with torch.no_grad():
            ref_emb = model.model.visual.patch_embed(px)
            fast_patch_embed(model)
            err = max(err, (model.model.visual.patch_embed(px) - ref_emb).abs().max().item())
        batch = _collate(
            [(np.asarray(_resize_like_processor(im, arch)),) + tuple(np.asarray(x) for x in stream.encode(
                synthetic.make_questions(r["scene"], np.random.default_rng(0), 5 + 3 * i)))
             for i, (im, r) in enumerate(zip(imgs, recs))],
            pad_id=processor.tokenizer.pad_token_id,
        )
        _, ids_b, _, mask_b = batch
        tid = stream.image_token_id
        grid = torch.tensor([[1, 48, 48]] * ids_b.shape[0])
        ref_pos, _ = model.model.get_rope_index(
            input_ids=ids_b, mm_token_type_ids=(ids_b == tid).long(), image_grid_thw=grid, attention_mask=mask_b
        )
        tpl = qwen_position_template(model, stream)[:, :, : ids_b.shape[1]].expand(-1, ids_b.shape[0], -1)
        assert torch.equal(tpl[:, mask_b.bool()], ref_pos[:, mask_b.bool()]), "M-RoPE template differs"
    return err


# ----------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def first_token_accuracy(model, processor, arch, records, batch_size=64, keep=None, seed=0) -> dict:
    """Accuracy of the greedy first answer token (answers are one word) on ``records``.

    keep: if set, simulate pre-LLM random pruning: keep this many (int) or this fraction (float) of
    each image's visual tokens, chosen at random, and run the language model on the kept tokens
    with their original positions (what ``apply_pruning(method="random")`` at layer 0 does).
    """
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tok = processor.tokenizer
    tok.padding_side = "left"
    image_token_id = model.config.image_token_id
    gen = torch.Generator().manual_seed(seed)
    correct, per_type = 0, {}
    lm = model.model.language_model
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        inp = processor(
            images=[r["image"] for r in chunk],
            text=[build.prompt(arch, r["question"]) for r in chunk],
            return_tensors="pt",
            padding=True,
        )
        inp = {k: v.to(dev) for k, v in inp.items()}
        inp["pixel_values"] = inp["pixel_values"].to(dtype)
        handle = None
        if keep is not None:
            handle = lm.register_forward_pre_hook(
                _make_drop_hook(inp["input_ids"], image_token_id, keep, gen), with_kwargs=True
            )
        try:
            logits = model(**inp, use_cache=False).logits[:, -1]
        finally:
            if handle is not None:
                handle.remove()
        pred = tok.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for r, p in zip(chunk, pred):
            ok = p == r["answer"]
            correct += ok
            c = per_type.setdefault(r["qtype"], [0, 0])
            c[0] += ok
            c[1] += 1
    return {
        "accuracy": 100.0 * correct / max(1, len(records)),
        "n": len(records),
        "per_qtype": {k: round(100.0 * v[0] / v[1], 2) for k, v in sorted(per_type.items())},
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


def generate_accuracy(model, processor, records, batch_size=64) -> dict:
    """Accuracy of :func:`vtoken.zoo.answer` (batched greedy generation) on ``records``."""
    from vtoken.zoo import answer

    preds = answer(model, processor, [r["image"] for r in records], [r["question"] for r in records], batch_size=batch_size)
    ok = [p == r["answer"] for p, r in zip(preds, records)]
    return {"accuracy": 100.0 * sum(ok) / max(1, len(ok)), "n": len(ok)}


# --------------------------------------------------------------------------------------- training


def train(args) -> dict:
    arch = args.arch
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    tok = build.build_tokenizer()
    processor = build.build_processor(arch, tok)
    err = check_pipeline(arch, processor)
    print(f"[{arch}] pixel pipeline max|diff| vs processor = {err:.2e}", flush=True)
    if err > 1e-4:
        raise RuntimeError(f"training pixel pipeline differs from the processor by {err}")
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

    stream = _Stream(arch, args.seed, args.qa_per_image, args.easy_vqa_frac)
    pos_template = None
    if arch == "qwen2vl":
        fast_patch_embed(model)
        pos_template = qwen_position_template(model, _Stream(arch, 0, 1, 0.0)).to(dev)
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
    val = synthetic.make_split("test", args.val_n, seed=1)
    t0 = time.time()
    step, ema, log = 0, None, []
    model.train()
    for imgs, ids, labels, mask in loader:
        elapsed = time.time() - t0
        progress = max(step / args.steps, elapsed / args.time_budget if args.time_budget else 0.0)
        if progress >= 1.0:
            break
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        imgs, ids, labels, mask = (t.to(dev, non_blocking=True) for t in (imgs, ids, labels, mask))
        inp = model_inputs(arch, pixels, imgs, ids, mask, image_token_id, pos_template)
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
            model.eval()
            acc = first_token_accuracy(model, processor, arch, val, batch_size=64)["accuracy"] if args.val_n else float("nan")
            model.train()
            rec = dict(step=step, t=round(time.time() - t0, 1), lr=round(lr, 6), loss=round(ema, 4), val_acc=round(acc, 2))
            log.append(rec)
            print(f"[{arch}] {rec}", flush=True)
    train_time = time.time() - t0
    print(f"[{arch}] trained {step} steps in {train_time:.0f} s", flush=True)
    return dict(model=model, processor=processor, steps=step, train_time_s=train_time, log=log, n_params=n_params, device=dev)


def save_and_evaluate(args, res) -> dict:
    from vtoken import zoo
    from vtoken.zoo.processing import save_processor

    arch, model, processor = args.arch, res["model"], res["processor"]
    os.makedirs(args.out, exist_ok=True)
    model.eval()
    model.to(torch.float16).save_pretrained(args.out)
    save_processor(processor, args.out)
    _tar(args)  # the checkpoint is safe even if evaluation runs out of time
    # reload exactly what was saved, in float32, and evaluate it
    dev = res["device"]
    m, p = zoo.load(args.out, device=dev, dtype=torch.float32)
    test = synthetic.make_split("test", args.test_n, seed=0)
    metrics = {
        "arch": arch,
        "model_class": type(m).__name__,
        "params": res["n_params"],
        "steps": res["steps"],
        "train_time_s": round(res["train_time_s"], 1),
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "eval_dtype": "float32",
        "visual_tokens_per_image": 576,
        "synthetic_test": {"split": "test", "seed": 0, "n": args.test_n},
    }
    t = time.time()
    metrics["synthetic_unpruned_first_token"] = first_token_accuracy(m, p, arch, test)
    metrics["synthetic_unpruned_generate"] = generate_accuracy(m, p, test)
    keep = 64 if arch == "llava" else 0.111
    metrics["synthetic_random_keep"] = dict(
        keep=keep, **first_token_accuracy(m, p, arch, test, keep=keep, seed=0)
    )
    sub = synthetic.make_split("test", args.subset_n, seed=0)
    metrics["cpu_test_subset"] = {
        "split": "test", "seed": 0, "n": args.subset_n,
        "accuracy_device": generate_accuracy(m, p, sub)["accuracy"],
    }
    try:
        from vtoken.data import easy_vqa

        ev = easy_vqa.load_easy_vqa("test", limit=args.easy_test_n, seed=0)
        metrics["easy_vqa_test"] = dict(seed=0, **first_token_accuracy(m, p, arch, ev))
        metrics["easy_vqa_test"]["accuracy_generate"] = generate_accuracy(m, p, ev)["accuracy"]
    except ImportError as e:
        metrics["easy_vqa_test"] = {"error": str(e)}
    metrics["eval_time_s"] = round(time.time() - t, 1)
    metrics["log"] = res["log"]
    with open(os.path.join(args.out, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
    _tar(args)
    print(json.dumps({k: v for k, v in metrics.items() if k != "log"}, indent=1), flush=True)
    return metrics


def _tar(args):
    if not args.tar:
        return
    import tarfile

    tmp = args.tar + ".tmp"
    with tarfile.open(tmp, "w") as tf:
        tf.add(args.out, arcname=os.path.basename(os.path.normpath(args.out)))
    os.replace(tmp, args.tar)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=build.ARCHS, required=True)
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument("--steps", type=int, default=20000, help="upper bound on optimizer steps")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds of training (0 = steps only)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per step")
    ap.add_argument("--qa-per-image", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--easy-vqa-frac", type=float, default=0.15, help="share of easy-vqa train images")
    ap.add_argument("--workers", type=int, default=max(1, min(7, (os.cpu_count() or 2) - 1)))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--init", default="", help="start from this checkpoint folder instead of random weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-n", type=int, default=256, help="held-out questions scored at each log step")
    ap.add_argument("--log-every", type=int, default=1000)
    ap.add_argument("--test-n", type=int, default=2000, help="synthetic test questions in the final evaluation")
    ap.add_argument("--subset-n", type=int, default=100, help="fixed test subset the CPU tests re-check")
    ap.add_argument("--easy-test-n", type=int, default=1000)
    ap.add_argument("--tar", default="", help="also pack the checkpoint folder into this tar file")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.easy_vqa_frac > 0:
        try:
            from vtoken.data import easy_vqa

            easy_vqa.easy_vqa_dir()
        except ImportError:
            print("easy-vqa not installed: training on synthetic data only", file=sys.stderr)
            args.easy_vqa_frac = 0.0
    res = train(args)
    save_and_evaluate(args, res)


if __name__ == "__main__":
    main()
