"""``vtoken eval`` / ``python -m vtoken.eval``: the field's retained-accuracy table for a model.

Examples::

    vtoken eval                                    # short default run: tiny LLaVA, synthetic + easy-VQA
    vtoken eval --model /ckpt/llava-1.5-7b-hf --data vqav2:/data/vqav2 gqa:/data/gqa pope:/data/pope \\
        --methods fastv,sparsevlm,visionzip --keep 192,128,64 --batch-size 16 --out runs/llava7b
    accelerate launch --num_processes 2 -m vtoken.eval --model ... --out runs/llava7b   # data-parallel

Re-running with the same ``--out`` resumes: only missing (data set, question, method, budget)
entries are computed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vtoken.eval.config import VIDEO_METHODS, VIDEO_MODEL
from vtoken.eval.runner import DEFAULT_METHODS, QUICK_METHODS, EvalConfig, ShardFailed, parse_keep, run_eval

#: data sets of the no-argument run: the synthetic scenes, their small off-centre details (where
#: which tokens a method keeps matters most) and easy-VQA
DEFAULT_DATA = ["synthetic", "synthetic-detail", "easy-vqa"]
#: questions per data set of the no-argument run: enough that the best methods separate from random at
#: 64 tokens on Synthetic (McNemar p <= 0.004), 78 s on an idle 2-core CPU (README, "Retained accuracy")
DEFAULT_LIMIT = 64
LLAVA_KEEPS = [192, 128, 64]  # the field's budgets for 576-token models
RATIO_KEEPS = [0.333, 0.222, 0.111]  # the field's ratios for dynamic-resolution models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vtoken eval",
        description="Evaluate visual-token pruning methods on VQA sets and write the field's retained-accuracy "
                    "table (table.md / table.csv), results.json, predictions.jsonl and plot.png.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Data sets: synthetic, synthetic-video, easy-vqa, vqav2:PATH, gqa:PATH, textvqa:PATH, pope:PATH, scienceqa:PATH, "
               "mme:PATH, hf:PATH (or a bare `datasets` directory saved with save_to_disk); options after '?', "
               "e.g. 'pope:/data/pope?images=/data/coco/val2014', 'vqav2:/data/vqa?split=val2014'. "
               "See vtoken/eval/loaders.py for the layouts.",
    )
    p.add_argument("--model", default=None,
                   help="built-in name (vtoken/tiny-llava, vtoken/tiny-qwen2vl, vtoken/tiny-qwen2vl-video) or a local "
                        f"Hugging Face model directory (default: vtoken/tiny-llava; {VIDEO_MODEL} when a data set is "
                        "synthetic-video)")
    p.add_argument("--data", nargs="+", action="extend", default=None, metavar="SPEC",
                   help="data sets (space- or comma-separated; default: synthetic synthetic-detail easy-vqa)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method names (default: fastv,sparsevlm,pyramiddrop,visionzip,divprune,dart,"
                        "random; fastv,visionzip,divprune,random in the no-argument quick run; "
                        f"{','.join(VIDEO_METHODS)} when a data set is synthetic-video); the unpruned upper bound "
                        "always runs")
    p.add_argument("--keep", default=None,
                   help="budgets: ints = visual tokens kept per image (e.g. 192,128,64), fractions in (0,1] "
                        "(e.g. 0.333,0.222,0.111); default 192,128,64 for LLaVA-1.5-style models, else the fractions")
    p.add_argument("--limit", type=int, default=None,
                   help=f"first N questions of each data set (default: all; {DEFAULT_LIMIT} in the no-argument run)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    p.add_argument("--device-map", default=None, help="e.g. 'auto' to spread a model over the GPUs of one process")
    p.add_argument("--out", default="vtoken_eval", help="output directory; re-using it resumes (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data set (default: 0)")
    p.add_argument("--budget-count", choices=("final", "equivalent"), default="final",
                   help="which visual-token count the table's 'Retain N' blocks mean: 'final' = tokens kept after "
                        "the last pruning stage (exactly N), 'equivalent' = layer-averaged tokens (within 5%%); a method "
                        "that can count its budget either way (sparsevlm) runs at N by this count; rows that still "
                        "do not keep N by it are marked in the table (default: %(default)s)")
    p.add_argument("--strict-budget", action="store_true",
                   help="exit with an error (after writing the report) if a row does not keep its block's budget")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-warmup", action="store_true",
                   help="no untimed warm-up pass per method and budget on a GPU (the timing columns then "
                        "include first-call costs; for sharded accuracy runs)")
    p.add_argument("--reuse-vision", choices=("auto", "on", "off"), default="auto",
                   help="compute each batch's vision features once for every method that leaves the vision "
                        "tower alone (the answers are the same; on a GPU the timing columns of those rows then "
                        "leave the tower out); auto: on the CPU only (default: %(default)s)")
    p.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")
    p.add_argument("--shard", default=None, metavar="RANK/WORLD",
                   help="run shard RANK of WORLD without a launcher: start WORLD such processes with the same "
                        "--out (e.g. several on one GPU, where tiny models leave it idle) from one shell, or with "
                        "one $VTOKEN_EVAL_RUN_ID; they meet through marker files there and shard 0 writes the report")
    return p


def parse_shard(text: str) -> tuple:
    """``"R/W"`` -> (R, W) with 0 <= R < W; a clear error otherwise."""
    try:
        rank, world = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard expects RANK/WORLD (e.g. 0/4), got {text!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise SystemExit(f"--shard {text}: RANK must be in [0, WORLD) and WORLD >= 1")
    return rank, world


def _available_methods():
    try:
        import vtoken

        return list(vtoken.available_methods())
    except Exception:  # noqa: BLE001 - core not importable: no validation
        return None


def _default_keeps(model: str) -> list:
    """192/128/64 for LLaVA-1.5-style models (576 visual tokens), else ratios."""
    model_type = None
    path = Path(model)
    try:
        from vtoken import zoo

        resolved = zoo.resolve(model)
        if resolved is not None:
            path = Path(str(resolved))
    except Exception:  # noqa: BLE001
        pass
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except Exception:  # noqa: BLE001
        name = model.lower()
        if "llava" in name and "next" not in name and "onevision" not in name:
            model_type = "llava"
    return list(LLAVA_KEEPS) if model_type == "llava" else list(RATIO_KEEPS)


def _check_builtin(model: str) -> None:
    """Stop with the zoo's how-to-train message when ``model`` is a built-in name not installed."""
    try:
        from vtoken import zoo
    except ImportError:  # pragma: no cover
        return
    name = zoo._ALIASES.get(model, model)
    if name in zoo.BUILTIN and name not in zoo.available():
        try:
            zoo.resolve(name)
        except FileNotFoundError as exc:
            raise SystemExit(f"--model: {exc}")


def parse_keeps(text: str) -> list:
    from vtoken.plan import validate_budget

    out = []
    for piece in str(text).replace(" ", ",").split(","):
        if not piece:
            continue
        try:
            k = parse_keep(piece)
        except ValueError:
            raise SystemExit(f"--keep: {piece!r} is neither an int (tokens) nor a fraction in (0, 1]")
        try:
            k = validate_budget(k, what="--keep")
        except Exception as exc:  # noqa: BLE001
            raise SystemExit(str(exc))
        if k not in out:
            out.append(k)
    if not out:
        raise SystemExit("--keep: give at least one budget")
    return out


def config_from_args(args) -> EvalConfig:
    from vtoken.eval.loaders import VIDEO_KINDS, DataError, parse_data_spec, split_data_args

    default_run = args.data is None
    data = DEFAULT_DATA if default_run else split_data_args(args.data)
    video = False
    for d in data:
        try:
            video |= parse_data_spec(d).kind in VIDEO_KINDS
        except DataError as exc:
            raise SystemExit(f"--data: {exc}")
    if args.model is None:
        args.model = VIDEO_MODEL if video else "vtoken/tiny-llava"
    _check_builtin(args.model)
    available = _available_methods()
    if args.methods:
        methods = [m.strip().lower() for m in args.methods.replace(" ", ",").split(",") if m.strip()]
        if available is not None:
            unknown = [m for m in methods if m not in available]
            if unknown:
                raise SystemExit(f"--methods: unknown {', '.join(unknown)}; registered: {', '.join(available)}")
    else:
        preset = QUICK_METHODS if default_run else (VIDEO_METHODS if video else DEFAULT_METHODS)
        methods = [m for m in preset if available is None or m in available]
    methods = [m for m in dict.fromkeys(methods)]
    keeps = parse_keeps(args.keep) if args.keep else _default_keeps(args.model)
    limit = args.limit if args.limit is not None else (DEFAULT_LIMIT if default_run else None)
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    return EvalConfig(model=args.model, data=list(data), methods=methods, keeps=keeps, limit=limit,
                      batch_size=args.batch_size, device=args.device, dtype=args.dtype, device_map=args.device_map,
                      out=args.out, max_new_tokens=args.max_new_tokens, seed=args.seed,
                      progress=not args.no_progress, budget_count=args.budget_count,
                      warmup=not args.no_warmup,
                      reuse_vision={"auto": None, "on": True, "off": False}[args.reuse_vision])


def distributed_context():
    """(rank, world, device) of this process.

    Under ``accelerate launch`` (or ``torchrun``) on GPUs, accelerate's ``PartialState`` gives
    ``process_index`` / ``num_processes`` / ``device``; where it sees a single process although the
    launcher started several (CPU processes under ``torchrun``), the launcher's ``RANK`` /
    ``WORLD_SIZE`` are used. Ranks meet through marker files in ``--out`` (see
    :func:`vtoken.eval.runner.run_eval`), not through a collective with a timeout.
    """
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if world_env <= 1:
        return 0, 1, None
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes == world_env:
        return state.process_index, state.num_processes, state.device
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    return rank, world_env, None


def _close_process_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def main(argv=None) -> int:
    """Entry point of ``vtoken eval`` (``argv`` without the word 'eval'); returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.list_methods:
        print("\n".join(_available_methods() or []))
        return 0
    config = config_from_args(args)
    rank, world, device = distributed_context() if args.shard is None else (*parse_shard(args.shard), None)
    if world > 1:
        if config.device_map:
            raise SystemExit("--device-map shards one model over GPUs; it cannot be combined with data-parallel "
                             "`accelerate launch` (use one process, or drop --device-map)")
        if device is not None:
            config.device = str(device)
    from vtoken.errors import DataError

    try:
        results = run_eval(config, rank=rank, world=world)
    except DataError as exc:  # DataFormatError included: a file (and line) it cannot use; nothing was changed
        print(f"vtoken eval: {exc}", file=sys.stderr)
        return 2
    except ShardFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nvtoken eval: interrupted; every finished batch is kept in {config.out} "
              f"(predictions.part-{rank}.jsonl); run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        _close_process_group()
    if rank == 0 and results is not None:
        out = Path(config.out)
        print((out / "table.md").read_text(encoding="utf-8"))
        for d in results["datasets"]:
            if d["malformed_records"] or d["failed_questions"]:
                print(f"warning: {d['name']}: {d['malformed_records']} malformed record(s) and "
                      f"{d['failed_questions']} unreadable/failed question(s) skipped; see results.json",
                      file=sys.stderr)
        by_type = ", by_type.md" if (out / "by_type.md").exists() else ""
        print(f"wrote {out}/table.md, table.csv, results.json, predictions.jsonl, plot.png{by_type}", file=sys.stderr)
        for m in results.get("budget_mismatches") or []:
            print(f"{'error' if args.strict_budget else 'warning'}: {m}", file=sys.stderr)
        if results.get("failed_configs"):
            for f in results["failed_configs"]:
                print(f"error: {f['method']} keep={f['keep']} could not run: {f['error']}", file=sys.stderr)
            return 1
        if args.strict_budget and results.get("budget_mismatches"):
            return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
