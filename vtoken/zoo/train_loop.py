"""The training loop of :mod:`vtoken.zoo.train`.

:func:`train` checks the pipeline, builds (or loads) the model, the data loader and the optimiser,
runs the time-budgeted schedule with periodic validation and returns the best weights' model.
"""

from __future__ import annotations

import functools
import json
import math
import time

import torch

from vtoken.data import synthetic, synthetic_video
from vtoken.zoo import build
from vtoken.zoo.train_checks import check_packed_turns, check_pipeline, check_video_pipeline
from vtoken.zoo.train_data import _collate, _MixedStream, _Stream, parse_qtype_mix
from vtoken.zoo.train_eval import TrainingVal
from vtoken.zoo.train_inputs import PixelPipeline, fast_patch_embed, model_inputs, qwen_position_template


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
    if getattr(args, "data", "image") == "video":
        verr = check_video_pipeline(processor)
        print(f"[{arch}] video pixel pipeline max|diff| vs processor = {verr:.2e}", flush=True)
        if verr > 1e-4:  # recorded in metrics.json; the clips are at the processor's size, so this is not expected
            print(f"[{arch}] WARNING: training video pixels differ from the processor's by {verr}", flush=True)
        args.video_pipeline_max_diff = verr
    packed = args.packed
    if packed:
        try:
            perr = check_packed_turns(arch, processor)
            if getattr(args, "data", "image") == "video":
                perr = max(perr, check_packed_turns(arch, processor, video=True))
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
        if model.get_input_embeddings().num_embeddings < len(tok):  # e.g. an image checkpoint -> the video words
            grown = (model.get_input_embeddings().num_embeddings, len(tok))
            model.resize_token_embeddings(len(tok), mean_resizing=False)
            print(f"[{arch}] vocabulary {grown[0]} -> {grown[1]} (new words' embeddings initialised at random)", flush=True)
        model = model.to(dev)
    else:
        model = build.build_model(arch, tok, seed=args.seed).to(dev)
    if getattr(args, "mrope_section", None):
        build.set_mrope_section(model, args.mrope_section.split(","))
        print(f"[{arch}] mrope_section {args.mrope_section}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{arch}] params {n_params / 1e6:.2f} M on {dev}", flush=True)
    pixels = PixelPipeline(processor, arch)
    image_token_id = model.config.image_token_id

    qtypes = parse_qtype_mix(args.qtype_mix)
    stream = _Stream(arch, args.seed, args.qa_per_image, args.easy_vqa_frac, qtypes, packed=packed)
    video = getattr(args, "data", "image") == "video"
    pos_template = video_template = None
    if arch == "qwen2vl":
        fast_patch_embed(model)
        pos_template = qwen_position_template(model, _Stream(arch, 0, 1, 0.0)).to(dev)
        if video:
            video_template = qwen_position_template(model, _Stream(arch, 0, 1, 0.0, video=True)).to(dev)
    video_token_id = getattr(model.config, "video_token_id", None)
    val_stream = _Stream(arch, 0, 1, 0.0)
    val = TrainingVal(val_stream, arch, synthetic.make_split("test", args.val_n, seed=1), dev) if args.val_n else None
    aux_types = tuple(t for t in synthetic.AUX_QTYPES if t in qtypes)
    val_aux = (
        TrainingVal(val_stream, arch, synthetic.make_split("test", args.val_aux_n, seed=1, qtypes=aux_types), dev)
        if aux_types and args.val_aux_n else None
    )
    val_video = None
    if video:
        vq = parse_qtype_mix(args.video_qtype_mix, video=True)
        vstream = _Stream(arch, args.seed, args.qa_per_image, 0.0, vq, packed=packed, video=True)
        vtypes = synthetic_video.QTYPES + tuple(t for t in synthetic_video.AUX_QTYPES if t in vq)
        if args.val_n:
            val_video = TrainingVal(_Stream(arch, 0, 1, 0.0, video=True), arch,
                                    synthetic_video.make_split("test", args.val_n, seed=1, qtypes=vtypes), dev)
        data = _MixedStream(stream, vstream, args.batch_size, args.video_frac, tok.pad_token_id, args.seed)
        batch_kw = dict(batch_size=None)
    else:
        data = stream
        batch_kw = dict(batch_size=args.batch_size, collate_fn=functools.partial(_collate, pad_id=tok.pad_token_id))
    loader = torch.utils.data.DataLoader(
        data,
        num_workers=args.workers,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if args.workers > 0 else None,
        persistent_workers=False,
        **batch_kw,
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
            score = v["accuracy"]
            if val_video is not None:  # a video checkpoint: the mean of image and video validation
                vv = val_video.score(model, arch, pixels, video_token_id, video_template, amp)
                rec.update(val_video_acc=round(vv["accuracy"], 2), val_video_per_qtype=vv["per_qtype"])
                score = (score + vv["accuracy"]) / 2
            if score >= best["val_acc"]:  # ties: the later (lower learning rate) weights
                best.update(val_acc=score, step=step,
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
        if imgs.dim() == 5:  # a batch of videos
            inp = model_inputs(arch, pixels, imgs, ids, seg, pos, video_token_id, video_template, packed=packed)
        else:
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
