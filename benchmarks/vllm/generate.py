"""Greedy answers from vLLM's offline engine, for one image per prompt; with vtoken's plugin
when ``VTOKEN_METHOD`` / ``VTOKEN_KEEP`` are set in the environment (vLLM loads the plugin itself).

    VTOKEN_METHOD=divprune VTOKEN_KEEP=0.25 python benchmarks/vllm/generate.py \
        --model vtoken/tiny-qwen2vl --image scene.png --question "how many objects are there?"

Prints (or writes with ``--out``) JSON: per prompt the prompt's token count, the generated token
ids and text. ``--model`` takes a built-in vtoken checkpoint name or a folder. The
``if __name__ == "__main__"`` guard is required: vLLM's engine core starts in a spawned process
that re-imports this module.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vtoken/tiny-qwen2vl")
    ap.add_argument("--image", action="append", required=True, help="one per --question")
    ap.add_argument("--question", action="append", required=True)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--memory", type=float, default=0.1,
                    help="fraction of memory vLLM reserves (on the CPU: of RAM, weights and KV cache)")
    ap.add_argument("--logprobs", type=int, default=0, help="also report the top-N log-probabilities of each generated token")
    ap.add_argument("--hf-overrides", default=None, help="JSON, as vllm serve's --hf-overrides (LLaVA with the plugin)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if len(args.image) != len(args.question):
        ap.error("give one --image per --question")

    from PIL import Image
    from vllm import LLM, SamplingParams

    from vtoken import zoo

    path = zoo.resolve(args.model)
    with open(f"{path}/config.json") as fh:  # the checkpoint's prompt format: llava or qwen2vl
        arch = "llava" if json.load(fh).get("model_type") == "llava" else "qwen2vl"
    t0 = time.perf_counter()
    llm = LLM(model=path, dtype=args.dtype, enforce_eager=True, max_model_len=2048, seed=0, gpu_memory_utilization=args.memory,
              limit_mm_per_prompt={"image": 1} if arch == "llava" else {"image": 1, "video": 0},
              **({"hf_overrides": json.loads(args.hf_overrides)} if args.hf_overrides else {}))
    load_s = time.perf_counter() - t0
    requests = [{"prompt": zoo.build_prompt(arch, q), "multi_modal_data": {"image": Image.open(im).convert("RGB")}}
                for im, q in zip(args.image, args.question)]
    t0 = time.perf_counter()
    outs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                                        logprobs=args.logprobs or None), use_tqdm=False)
    result = {
        "load_s": round(load_s, 1),
        "generate_s": round(time.perf_counter() - t0, 2),
        "outputs": [{"prompt_tokens": len(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids),
                     "text": o.outputs[0].text,
                     "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in (o.outputs[0].logprobs or [])]}
                    for o in outs],
    }
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
