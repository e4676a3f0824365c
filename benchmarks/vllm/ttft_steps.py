"""Why pruned TTFT can rise under concurrency on vLLM: which engine step gives each request its first token.

Submits N requests at once (one 448 x 448 image = 1024 visual tokens each, as serve_bench.sh) to
the offline engine and steps it by hand, recording per step its wall time and how many requests
got their first token. Run once unpruned and once with the plugin (VTOKEN_METHOD / VTOKEN_KEEP):

    DIR/bin/python benchmarks/vllm/ttft_steps.py --requests 8
    VTOKEN_METHOD=divprune VTOKEN_KEEP=0.25 DIR/bin/python benchmarks/vllm/ttft_steps.py --requests 8

Prints JSON: the scheduler's token and encoder budgets, per step (seconds, first tokens), and
each request's TTFT (from submission). Also times vtoken's scorer alone on one image's embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="vLLM's per-step token budget (also its encoder budget); default: vLLM's")
    args = ap.parse_args(argv)

    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    from vtoken import zoo

    llm = LLM(model=zoo.resolve("vtoken/tiny-qwen2vl"), dtype="float32", enforce_eager=True, max_model_len=2048,
              seed=0, gpu_memory_utilization=0.1, limit_mm_per_prompt={"image": 1, "video": 0},
              **({"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}))
    engine = llm.llm_engine
    sched = engine.vllm_config.scheduler_config
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    t0 = time.perf_counter()
    for i in range(args.requests):  # distinct random images: no encoder-cache or prefix-cache hits
        img = Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8))
        engine.add_request(str(i), {"prompt": zoo.build_prompt("qwen2vl", f"question {i}?"),
                                    "multi_modal_data": {"image": img}}, params)
    steps, ttft, prompt_tokens = [], {}, None
    while engine.has_unfinished_requests():
        s = time.perf_counter()
        outs = engine.step()
        firsts = 0
        for o in outs:
            prompt_tokens = len(o.prompt_token_ids)
            if o.request_id not in ttft and len(o.outputs[0].token_ids) >= 1:
                ttft[o.request_id] = time.perf_counter() - t0
                firsts += 1
        steps.append({"s": round(time.perf_counter() - s, 3), "first_tokens": firsts})
    result = {
        "method": os.environ.get("VTOKEN_METHOD") or "unpruned", "keep": os.environ.get("VTOKEN_KEEP"),
        "prompt_tokens": prompt_tokens,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "max_num_encoder_input_tokens": getattr(sched, "max_num_encoder_input_tokens", None),
        "steps": [st for st in steps if st["first_tokens"] or st["s"] > 0.05],
        "ttft_s": sorted(round(v, 2) for v in ttft.values()),
        "ttft_p50_s": round(float(np.median(list(ttft.values()))), 2),
    }
    if os.environ.get("VTOKEN_METHOD"):
        import torch

        from vtoken.vllm.config import from_env
        from vtoken.vllm.selection import select_image

        cfg = from_env()
        emb = torch.randn(1024, engine.vllm_config.model_config.hf_config.text_config.hidden_size)
        s = time.perf_counter()
        for _ in range(5):
            select_image(cfg.stage, emb, (1, 32, 32), cfg.tokens_kept(1024))
        result["scorer_ms_per_image"] = round((time.perf_counter() - s) / 5 * 1e3, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
