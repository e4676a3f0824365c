"""The ``vtoken`` command: ``vtoken eval``, ``vtoken demo``, ``vtoken bench``, ``vtoken methods``,
``vtoken example``."""

from __future__ import annotations

import sys

USAGE = """usage: vtoken <command> [options]

commands:
  eval      retained-accuracy table on VQA sets (default: built-in tiny LLaVA, synthetic + easy-VQA)
  demo      Gradio side-by-side demo (unpruned vs pruned)
  bench     GPU speed benchmark of full-size architectures (CUDA)
  methods   list the pruning methods
  example   prune a tiny random-weight model and print what was kept (no checkpoint needed)
"""


def example(argv=None) -> int:
    """Prune a tiny random-weight LLaVA built from config classes and show the token accounting."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    import vtoken

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=96, patch_size=4),
        text_config=LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2),
        image_token_id=127,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    n = (96 // 4) ** 2  # 576 visual tokens, as LLaVA-1.5
    ids = torch.tensor([[1, 5, 6] + [127] * n + [7, 8, 9], [1, 5] + [127] * n + [7] * 4])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 96, 96))
    with vtoken.apply_pruning(model, method="fastv", keep=64) as handle:
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        print(handle)
        print(handle.stats.summary())
    print("generated:", out[:, ids.shape[1]:].tolist())
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "eval":
        from vtoken.eval.cli import main as run

        return run(rest)
    if cmd == "demo":
        from vtoken.demo import main as run

        return run(rest)
    if cmd == "bench":
        from vtoken.bench.cli import main as run

        return run(rest)
    if cmd == "methods":
        import vtoken

        print("\n".join(vtoken.available_methods()))
        return 0
    if cmd == "example":
        return example(rest)
    print(f"unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
