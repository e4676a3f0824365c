"""``vtoken bench``: end-to-end speed of pruned generation on full-size architectures (CUDA).

Builds LLaVA-1.5-7B, LLaVA-NeXT-7B and Qwen2.5-VL-7B from their public config values with random
bf16 weights directly on the GPU (speed does not depend on weight values; nothing can be
downloaded here), SDPA attention, and measures with CUDA synchronisation, medians over repeats
(docs/DESIGN.md section 7). Suites (``--suite``, comma-separated):

- ``llava``: LLaVA-1.5-7B at batch 1/8/32 (``--batch``): unpruned, each method of ``--methods``
  at 192/128/64 tokens per image, the ORACLE (the same model fed only the kept tokens; pruned and
  oracle TTFT timed in interleaved rounds), decode ms/token, and the whole-model eager +
  ``output_attentions`` peer at batch 1.
- ``llava-next``: LLaVA-NeXT-7B (anyres, image newlines), batch 1/8 (``--next-batch``): unpruned,
  fastv at 192/128/64 per 576-token crop equivalent (fractions of each image), oracle, decode.
- ``qwen-long``: the full Qwen2.5-VL-7B at 4K/8K/16K visual tokens (1/2/4 images), batch 1:
  unpruned vs fastv keep 0.111 vs oracle, vision-tower time inside TTFT, with transformers' SDPA
  vision path and with ``patch_vision_varlen``.
- ``video``: the full Qwen2.5-VL-7B on one video per sample (``--video-frames`` 16 frames of
  ``--video-side`` 448 px = 2048 visual tokens) at batch ``--video-batch`` 1/8/32: unpruned, each
  method of ``--video-methods`` (the video methods and image methods that run on video) at
  ``--video-keep`` 0.25 of the video's tokens, the oracle, decode; refused methods are rows with a
  ``skipped`` reason (:mod:`vtoken.bench.video_suite`).
- ``qwen-lm``: the Qwen2.5-VL-7B language model alone (the earlier long-context suite).
- ``peers``: at 4K visual tokens (LLaVA-1.5, 7 images): vtoken fastv vs FastV's eager
  ``output_attentions`` path (mask and drop modes) vs LLMC's re-run of the scoring layer.
- ``maxbatch``: the largest batch within 60 GiB, LLaVA-1.5-7B, 64 new tokens, unpruned vs fastv 64.
- ``users``: what users call: ``model.generate`` with the dynamic cache and with
  ``cache_implementation="static"`` (transformers' compiled decode), unpruned and pruned (fastv,
  divprune, visionzip), LLaVA-1.5-7B and Qwen2.5-VL-7B at ``--users-batch``: TTFT, ms/token,
  end-to-end time of ``--users-new-tokens`` tokens, peak memory, and each row's floor
  (:mod:`vtoken.bench.user_path`).
- ``all`` = every suite; ``new`` = llava-next, qwen-long, peers, maxbatch.

Each architecture is built once per run and shared by the suites that need it (LLaVA-1.5 shares
LLaVA-NeXT-vicuna's modules: same language model, tower and projector shapes). Results go to
``--out``/results.json (every row carries device and library versions) and results.md, rewritten
after every row; a summary of the issue's targets is printed at the end. ``--tiny`` runs every
suite on tiny configs of the same classes (fp32, CPU unless ``--device cuda``) to test the paths.

    vtoken bench --suite new --out /tmp/bench
    vtoken bench --suite llava --batch 1,8          # the earlier default: --suite llava,qwen-lm
    vtoken bench --suite all --tiny --out /tmp/tiny # every path on the CPU, tiny models
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

ORDER = ["users", "qwen-long", "video", "qwen-lm", "llava-next", "llava", "peers", "maxbatch"]
NEW = ["llava-next", "qwen-long", "peers", "maxbatch"]
NEEDS = {"qwen-long": {"qwen2.5-vl-7b"}, "video": {"qwen2.5-vl-7b"}, "qwen-lm": {"qwen2.5-vl-7b"}, "llava-next": {"llava-next-7b"},
         "llava": {"llava-1.5-7b"}, "peers": {"llava-1.5-7b"}, "maxbatch": {"llava-1.5-7b"},
         "users": {"llava-1.5-7b", "qwen2.5-vl-7b"}}


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def _caches(s):
    """``--users-caches``: names among dynamic, static and the compile routes (a typo would
    otherwise time the dynamic cache under another name)."""
    from vtoken.bench.user_path import CACHES

    names = [x for x in s.split(",") if x]
    bad = [x for x in names if x not in CACHES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown cache(s) {', '.join(bad)}; choose from {', '.join(CACHES)}")
    return names


def _keep(s):
    """A budget: an integer is a token count, anything else a fraction."""
    try:
        return int(s)
    except ValueError:
        return float(s)


def parse_suites(text: str) -> list:
    names = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part == "all":
            names += ORDER
        elif part == "new":
            names += NEW
        elif part in ORDER:
            names.append(part)
        else:
            raise SystemExit(f"vtoken bench: unknown suite {part!r}; choose from {', '.join(ORDER + ['all', 'new'])}")
    return [s for s in ORDER if s in names]


def build_parser():
    p = argparse.ArgumentParser(prog="vtoken bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default=None, help="comma-separated: " + ", ".join(ORDER) + ", all, new "
                   "(default: llava,qwen-lm, the earlier behaviour)")
    p.add_argument("--models", default=None, help="(older flag) llava -> suite llava, qwen -> suite qwen-lm")
    p.add_argument("--batch", default="1,8", type=_ints, help="batch sizes of the llava suite")
    p.add_argument("--next-batch", default="1,8", type=_ints, help="batch sizes of the llava-next suite")
    p.add_argument("--methods", default="fastv", type=lambda s: s.split(","), help="methods of the llava suite")
    p.add_argument("--keep", default="192,128,64", type=_ints, help="budgets of the llava suite (tokens per image)")
    p.add_argument("--qwen-visual", default="4096,8192,16384", type=_ints)
    p.add_argument("--qwen-one-image", action="store_true",
                   help="qwen-long: each visual-token count as one square image (else images of 4096 tokens)")
    p.add_argument("--qwen-keep", default=0.111, type=float)
    p.add_argument("--vision-paths", default="varlen,sdpa", type=lambda s: s.split(","),
                   help="qwen-long vision attention: varlen (patch_vision_varlen), sdpa (transformers)")
    p.add_argument("--video-batch", default="1,8,32", type=_ints, help="batch sizes of the video suite")
    p.add_argument("--video-frames", type=int, default=16, help="video suite: frames per video (2 per temporal group)")
    p.add_argument("--video-side", type=int, default=448, help="video suite: frame side in px (multiple of 28)")
    p.add_argument("--video-methods", default="fastv,divprune,uniform,dycoke,fastvid,holitom,flashvid",
                   type=lambda s: s.split(","), help="video suite: methods")
    p.add_argument("--video-keep", type=_keep, default=0.25,
                   help="video suite: fraction of each video's tokens kept (an integer: tokens per video)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated for decode ms/token")
    p.add_argument("--users-batch", default="1,8,32", type=_ints, help="batch sizes of the users suite")
    p.add_argument("--users-new-tokens", type=int, default=128, help="users suite: tokens generated end to end")
    p.add_argument("--users-models", default="llava,qwen", type=lambda s: s.split(","), help="users suite: llava, qwen")
    p.add_argument("--users-qwen-visual", type=int, default=1024, help="users suite: Qwen visual tokens per image")
    p.add_argument("--users-methods", default="unpruned,fastv,divprune,visionzip", type=lambda s: s.split(","),
                   help="users suite: methods (unpruned = no handle; Qwen rows skip visionzip)")
    p.add_argument("--users-caches", default="dynamic,static", type=_caches,
                   help="users suite: dynamic, static (transformers), compile, compile-fused (apply_pruning(compile=...))")
    p.add_argument("--maxbatch-new-tokens", type=int, default=64)
    p.add_argument("--maxbatch-cap-gib", type=float, default=60.0)
    p.add_argument("--maxbatch-probes", type=int, default=7, help="probes per method (calibration included)")
    p.add_argument("--maxbatch-tol", type=float, default=0.05, help="stop when (first OOM - largest fit) <= tol * fit")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--long-ms", type=float, default=1000.0, help="calls slower than this are timed twice only")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds from start after which remaining optional measurements are skipped (noted)")
    p.add_argument("--out", default="benchmarks/e2e")
    p.add_argument("--tiny", action="store_true", help="tiny configs of the same classes, fp32 (CPU unless --device)")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (--tiny only)")
    p.add_argument("--profile", action="store_true", help="print a profile of the longest pruned qwen-lm prefill")
    p.add_argument("--summary-from", default=None, metavar="RESULTS_JSON",
                   help="only print the summary (and rewrite the Markdown beside it) of an existing results.json")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="scoring-layer attention: auto = fused Triton attend_and_score on CUDA")
    p.add_argument("--no-plan-cache", action="store_true",
                   help="plan every pruned prefill from scratch (default: a repeated prompt reuses its host plan)")
    return p


def environment(device: str) -> dict:
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton is optional
        triton_version = "n/a"
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()})"
    return dict(device=name, torch=torch.__version__, transformers=transformers.__version__, triton=triton_version,
                python=platform.python_version(), cuda=torch.version.cuda)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    t_start = time.monotonic()
    if args.summary_from:
        return print_summary(args.summary_from)
    import torch

    if args.suite is None:
        legacy = {"llava": "llava", "qwen": "qwen-lm"}
        args.suite = ",".join(legacy.get(m, m) for m in (args.models or "llava,qwen").split(","))
    suites = parse_suites(args.suite)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and not device.startswith("cuda"):
        print("vtoken bench needs a CUDA device (use --tiny to run the tiny configs on the CPU)")
        return 2
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("vtoken bench: --device cuda but no CUDA device is available")
        return 2
    threads = torch.get_num_threads()
    if args.tiny and not device.startswith("cuda"):
        # tiny models are dominated by per-op overhead: one intra-op thread is several times faster
        # on a small shared CPU than contending threads
        torch.set_num_threads(1)
    try:
        return _run(args, argv, suites, device, t_start)
    finally:
        torch.set_num_threads(threads)


def print_summary(path: str) -> int:
    from vtoken.bench import report

    with open(path) as f:
        data = json.load(f)
    with open(os.path.join(os.path.dirname(path) or ".", "results.md"), "w") as f:
        f.write(report.render_markdown(data.get("meta", {}), data.get("results", [])))
    print(report.summary_text(data.get("results", [])))
    meta = data.get("meta", {})
    for key in ("skipped", "errors"):
        if meta.get(key):
            print(f"{key}: " + "; ".join(meta[key]))
    print(f"suite wall times (s): {meta.get('suite_s')}; builds (s): {meta.get('build_s')}; total {meta.get('total_s')} s")
    return 0


def _run(args, argv, suites, device, t_start) -> int:
    import torch

    from vtoken.bench import report
    from vtoken.bench.common import Bench
    from vtoken.bench.models import ModelPool

    from vtoken.hooks.runtime import Runtime

    if args.no_plan_cache:
        Runtime.plan_cache_size = 0
    env = environment(device)
    bench = Bench(device=device, dtype=torch.float32 if args.tiny else torch.bfloat16, tiny=args.tiny,
                  repeats=args.repeats, new_tokens=args.new_tokens, backend=args.backend, long_ms=args.long_ms,
                  deadline=None if args.time_budget is None else t_start + args.time_budget, env=env)
    meta = dict(env, attn="sdpa", dtype="float32" if args.tiny else "bfloat16", weights="random",
                tiny=args.tiny, command="vtoken bench " + " ".join(argv), repeats=args.repeats, long_ms=args.long_ms,
                new_tokens=args.new_tokens, plan_cache=Runtime.plan_cache_size > 0,
                suites=suites, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                time_budget_s=args.time_budget, build_s={}, suite_s={}, skipped=bench.skipped, errors=bench.errors)
    os.makedirs(args.out, exist_ok=True)
    pool = ModelPool(bench, set().union(*(NEEDS[s] for s in suites)) if suites else set())

    def write():
        meta["build_s"] = dict(pool.build_s)
        meta["total_s"] = round(time.monotonic() - t_start, 1)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(dict(meta=meta, results=bench.rows), f, indent=1, default=str)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(report.render_markdown(meta, bench.rows))

    bench.on_row = write
    bench.log(f"vtoken bench: suites {suites} on {env['device']} (torch {env['torch']}, transformers "
              f"{env['transformers']}, triton {env['triton']})")
    for i, suite in enumerate(suites):
        later = set().union(*(NEEDS[s] for s in suites[i:]))
        pool.release(*[m for m in list(pool.models) if m not in later and not (m == "llava-next-7b" and "llava-1.5-7b" in later)])
        t0 = time.monotonic()
        try:
            run_suite(suite, bench, pool, args)
        except Exception as exc:  # keep the other suites' results of a one-shot GPU run
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            meta["errors"].append(f"{suite}: {type(exc).__name__}: {exc}".replace("\n", " ")[:800])
            del exc, tb
        bench.empty_cache(collect=bool(meta["errors"]))  # outside the except block: the failed frames (and their tensors) are gone
        meta["suite_s"][suite] = round(time.monotonic() - t0, 1)
        bench.log(f"suite {suite} done in {meta['suite_s'][suite]} s")
        write()
    pool.release_all_but()
    write()
    bench.log("\n== summary ==\n" + report.summary_text(bench.rows))
    if meta["skipped"]:
        bench.log("skipped: " + "; ".join(meta["skipped"]))
    if meta["errors"]:
        bench.log("ERRORS: " + "; ".join(meta["errors"]))
    bench.log(f"total {meta['total_s']} s; results in {args.out}/results.json and results.md")
    return 1 if meta["errors"] else 0


def run_suite(suite, bench, pool, args):
    from vtoken.bench import image_suites, maxbatch, peers, qwen_suites, user_path, video_suite

    if suite == "users":
        user_path.run_users(bench, pool, batches=args.users_batch, qwen_visual=args.users_qwen_visual,
                            qwen_keep=args.qwen_keep, new_tokens=args.users_new_tokens, models=args.users_models,
                            methods=args.users_methods, caches=args.users_caches)
    elif suite == "llava":
        image_suites.run_llava(bench, pool, batches=args.batch, keeps=args.keep, methods=args.methods)
    elif suite == "llava-next":
        image_suites.run_llava_next(bench, pool, batches=args.next_batch)
    elif suite == "qwen-long":
        qwen_suites.run_qwen_long(bench, pool, visual=args.qwen_visual, keep=args.qwen_keep, paths=args.vision_paths,
                                  one_image=args.qwen_one_image)
    elif suite == "video":
        video_suite.run_video(bench, pool, batches=args.video_batch, frames=args.video_frames, side=args.video_side,
                              methods=args.video_methods, keep=args.video_keep)
    elif suite == "qwen-lm":
        qwen_suites.run_qwen_lm(bench, pool, visual=args.qwen_visual, methods=args.methods, profile=args.profile)
    elif suite == "peers":
        peers.run_peers(bench, pool)
    elif suite == "maxbatch":
        maxbatch.run_maxbatch(bench, pool, new_tokens=args.maxbatch_new_tokens, cap_gib=args.maxbatch_cap_gib,
                              tol=args.maxbatch_tol, max_probes=args.maxbatch_probes)
    else:  # pragma: no cover - parse_suites filters names
        raise ValueError(suite)


if __name__ == "__main__":
    raise SystemExit(main())
