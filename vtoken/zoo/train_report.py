"""Saving and reporting of :mod:`vtoken.zoo.train`.

:func:`save_and_evaluate` saves the trained weights (float16, with the processor), reloads them in
float32, evaluates them and writes ``metrics.json``, ``TRAINING.md`` and the optional tar file;
:func:`record_cpu_subset` adds the CPU's fixed-subset accuracy to a saved checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import sys
import time

import torch

from vtoken.data import synthetic
from vtoken.zoo.train_eval import (
    _ListRecords, _synthetic_records, _synthetic_video_records, evaluate_records, subset_accuracy,
)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _device_name(dev) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine() or "cpu"


def _command(argv) -> str:
    return "python3 -m vtoken.zoo.train " + " ".join(shlex.quote(a) for a in argv)


def save_and_evaluate(args, res, argv=None) -> dict:
    from vtoken import zoo
    from vtoken.zoo.layout import portable_llava_layout
    from vtoken.zoo.processing import save_processor

    arch, model, processor = args.arch, res["model"], res["processor"]
    os.makedirs(args.out, exist_ok=True)
    model.eval()
    model.to(torch.float16).save_pretrained(args.out)
    portable_llava_layout(args.out)  # a LLaVA's CLIP tower under vision_model: vLLM loads it too
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
            "packed_turns": res["packed"], "canvas": getattr(args, "canvas", None) or "gradient",
            "init": args.init or None, "mrope_section": getattr(args, "mrope_section", None),
        },
        "data": getattr(args, "data", "image"),
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
    detail_n = getattr(args, "detail_test_n", 0)
    if detail_n:
        get_detail = functools.partial(_synthetic_records, "test", 0, qtypes=synthetic.DETAIL_QTYPES)
        dv = evaluate_records(m, p, arch, get_detail, detail_n, keep=keep, seed=0, generate=False,
                              workers=args.eval_workers)
        metrics["synthetic_detail_test"] = {"split": "test", "seed": 0, "n": detail_n, **dv["first_token"],
                                            "random_keep": dv["random_keep"]}
    per_qtype = ev["first_token"]["per_qtype"]
    metrics["targets"] = {
        "unpruned_accuracy_ge_97": ev["first_token"]["accuracy"] >= 97.0,
        "every_qtype_ge_90": min(per_qtype.values()) >= 90.0,
        "detail_accuracy_ge_97": detail_n > 0 and metrics["synthetic_detail_test"]["accuracy"] >= 97.0,
        "random_keep_drop_ge_15_points": drop >= 15.0,
        "checkpoint_le_16MiB": metrics["checkpoint_bytes"] <= 16 * 2**20,
    }
    _write_metrics(args.out, metrics)
    if getattr(args, "data", "image") == "video":
        _evaluate_video(args, m, p, metrics)
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


VIDEO_KEEP = 0.111  # the random-pruning budget of the video metrics (28 of a clip's 256 tokens)


def _evaluate_video(args, model, processor, metrics: dict) -> None:
    """The held-out video test split (seed 0): per-question-type accuracy, unpruned (first token and
    generation) and with random pre-LLM pruning at :data:`VIDEO_KEEP`, into ``metrics``."""
    from vtoken.data import synthetic_video

    from vtoken.zoo.train_data import parse_qtype_mix

    ev = evaluate_records(model, processor, args.arch, functools.partial(_synthetic_video_records, "test", 0),
                          args.video_test_n, keep=VIDEO_KEEP, seed=0, generate=True, workers=args.eval_workers)
    drop = ev["first_token"]["accuracy"] - ev["random_keep"]["accuracy"]
    metrics["recipe"].update(video_frac=args.video_frac, video_qtype_mix=args.video_qtype_mix,
                             video_qtypes=sorted(set(parse_qtype_mix(args.video_qtype_mix, video=True))))
    metrics["visual_tokens_per_video"] = synthetic_video.visual_tokens()
    metrics["video_pipeline_max_diff"] = getattr(args, "video_pipeline_max_diff", None)
    metrics["synthetic_video_test"] = {"split": "test", "seed": 0, "n": args.video_test_n,
                                       "frames": synthetic_video.FRAMES, "frame_size": synthetic_video.FRAME_SIZE}
    metrics["synthetic_video_unpruned_first_token"] = ev["first_token"]
    metrics["synthetic_video_unpruned_generate"] = ev["generate"]
    metrics["synthetic_video_random_keep"] = dict(ev["random_keep"], drop_points=round(drop, 2))
    metrics.setdefault("targets", {})["video_random_keep_drop_ge_15_points"] = drop >= 15.0
    metrics["cpu_video_subset"] = {
        "split": "test", "seed": 0, "n": 40,
        "accuracy_device": subset_accuracy(model, processor, "test", 0, 40, video=True),
        "note": "tests/test_zoo_checkpoints.py recomputes this on the CPU (+-2.5 points, one question)",
    }


def _video_section(m: dict) -> str:
    if "synthetic_video_unpruned_first_token" not in m:
        return ""
    ft, rk = m["synthetic_video_unpruned_first_token"], m["synthetic_video_random_keep"]
    gen = m["synthetic_video_unpruned_generate"]
    rows = _accuracy_rows(ft, rk, m["visual_tokens_per_video"])
    v = m["synthetic_video_test"]
    return f"""
Video: `vtoken.data.synthetic_video` test split (seed 0, n = {v['n']}; {v['frames']} frames of {v['frame_size']} px,
video batches {m['recipe']['video_frac']} of the steps, video question mix `{m['recipe']['video_qtype_mix']}`),
greedy first answer token (generation: {gen['accuracy']:.2f} %):

{chr(10).join(rows)}

Random pruning loses {rk['drop_points']:.1f} points on the video questions.
"""


def _write_metrics(out: str, metrics: dict) -> None:
    # the log goes last, so the file reads top-down
    ordered = {k: v for k, v in metrics.items() if k != "log"}
    ordered["log"] = metrics.get("log", [])
    tmp = os.path.join(out, "metrics.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(ordered, fh, indent=2)
    os.replace(tmp, os.path.join(out, "metrics.json"))


def _accuracy_rows(ft: dict, rk: dict, tokens: int) -> list[str]:
    """Markdown rows: overall and per-question-type accuracy, unpruned and randomly pruned."""
    qt = sorted(ft["per_qtype"])
    return [
        "| | all | " + " | ".join(qt) + " |",
        "|---|---|" + "---|" * len(qt),
        f"| unpruned ({tokens} tokens) | {ft['accuracy']:.2f} | " + " | ".join(f"{ft['per_qtype'][q]:.1f}" for q in qt) + " |",
        f"| random, keep {rk['keep']} | {rk['accuracy']:.2f} | "
        + " | ".join(f"{rk['per_qtype'].get(q, float('nan')):.1f}" for q in qt) + " |",
    ]


def _write_training_md(out: str, m: dict) -> None:
    name = os.path.basename(os.path.normpath(out))
    ft, rk, gen = m["synthetic_unpruned_first_token"], m["synthetic_random_keep"], m["synthetic_unpruned_generate"]
    rows = _accuracy_rows(ft, rk, 576)
    ev = m.get("easy_vqa_test", {})
    easy = f"{ev['accuracy']:.2f} % (first token), {ev['accuracy_generate']:.2f} % (generate), n = {ev['n']}" if "accuracy" in ev else ev.get("error", "n/a")
    r = m["recipe"]
    dt = m.get("synthetic_detail_test")
    detail = (f"Detail questions (one small off-centre object decides the answer; test split, seed 0, n = {dt['n']}): "
              f"{dt['accuracy']:.2f} % unpruned, {dt['random_keep']['accuracy']:.2f} % random keep {dt['random_keep']['keep']}."
              if dt else "Detail questions: not evaluated.")
    start = f"continuing from `{r['init']}`," if r.get("init") else "from scratch"
    text = f"""# {name}: training record

Trained {start} by `vtoken.zoo.train` (written by the training run itself).

- command: `{m['command'] or m['train_command']}`
- training process: `{m['train_command']}`
- trained: {m['trained_at']}, {m['train_time_s']} s of training, {m['steps']} steps; saved weights: step {m['best_step']} (best validation accuracy, {m['best_val_acc']:.2f} %)
- device: {m['device']}; torch {m['torch']}, transformers {m['transformers']}
- model: `{m['model_class']}`, {m['params'] / 1e6:.2f} M parameters, {m['checkpoint_bytes'] / 1e6:.1f} MB (float16), {m['visual_tokens_per_image']} visual tokens per 336 px image
- data: `vtoken.data.synthetic` train split, canvas `{r.get('canvas', 'gradient')}` (+ easy-vqa train images, share {r['easy_vqa_frac']}), {r['batch_size']} images x {r['qa_per_image']} questions per step, question mix `{r['qtype_mix']}`
- optimiser: AdamW, peak learning rate {r['lr']}, {r['warmup']} warm-up steps, cosine to 5 % over the time budget, weight decay {r['weight_decay']}, bf16 autocast
- validation: {m['log'][-1].get('val_acc', 'n/a') if m['log'] else 'n/a'} % at the last step (test split, seed 1; the metrics below use seed 0)

Synthetic test split (seed 0, n = {ft['n']}), greedy first answer token, float32 on the device
(generation: {gen['accuracy']:.2f} %):

{chr(10).join(rows)}

Random pruning loses {rk['drop_points']:.1f} points. easy-VQA test: {easy}.
{detail}
Targets: {', '.join(f"{k} {'met' if v else 'NOT met'}" for k, v in m.get('targets', {}).items())}.
{_video_section(m)}
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
