"""Ask a running ``vllm serve`` one question about one image through the OpenAI chat API
(standard library only) and print the answer and the prompt's token count.

    python benchmarks/vllm/ask_server.py --image scene.png --question "how many objects are there?"
"""

from __future__ import annotations

import argparse
import base64
import json
import urllib.request


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="served model name (default: the server's first)")
    ap.add_argument("--image", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    model = args.model
    if model is None:
        with urllib.request.urlopen(f"{args.url}/v1/models") as r:
            model = json.load(r)["data"][0]["id"]
    with open(args.image, "rb") as fh:
        data = base64.b64encode(fh.read()).decode()
    body = {"model": model, "temperature": 0, "max_tokens": args.max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        {"type": "text", "text": args.question}]}]}
    req = urllib.request.Request(f"{args.url}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        out = json.load(r)
    result = {"answer": out["choices"][0]["message"]["content"], "prompt_tokens": out["usage"]["prompt_tokens"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
