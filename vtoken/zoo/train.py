"""Train a reference checkpoint from scratch.

    python -m vtoken.zoo.train --arch llava   --out ckpt/tiny-llava
    python -m vtoken.zoo.train --arch qwen2vl --out ckpt/tiny-qwen2vl
    python -m vtoken.zoo.train --arch qwen2vl --data video --out ckpt/tiny-qwen2vl-video
    OUT=dir bash vtoken/zoo/train_video.sh         # the video checkpoint on one GPU, as shipped
    OUT=dir bash vtoken/zoo/train_both.sh          # both at once on one GPU, as shipped
    python -m vtoken.zoo.train --record-cpu-subset vtoken/zoo/checkpoints/tiny-llava   # on the CPU

Data: an endless stream of synthetic scenes (:mod:`vtoken.data.synthetic`, train split) and, with
``--easy-vqa-frac``, images of the ``easy-vqa`` train split, rendered by DataLoader workers. Each
training sequence holds one image and ``--qa-per-image`` independent question/answer turns packed
behind it::

    <s>USER: <image> | {q1} ASSISTANT: {a1}</s> | {q2} ASSISTANT: {a2}</s> | ...

Every turn attends only to the image prefix and to itself (a 4-D attention mask) and its
positions restart after the image, so each turn is exactly the single-question inference prompt
(:func:`vtoken.zoo.build.prompt`) and no answer can be inferred from another turn;
:func:`check_packed_turns` verifies this against one-by-one forwards before training starts (and
falls back to a causal multi-turn conversation if the installed ``transformers`` disagrees). The
loss is on the answer word and its EOS only. Pixels are normalised (and, for Qwen2-VL,
patchified) on the device in exactly the processor's arithmetic, which :func:`check_pipeline`
verifies against the saved processor.

``--data video`` (Qwen2-VL only) makes the video checkpoint ``vtoken/tiny-qwen2vl-video``: each
batch is, with probability ``--video-frac``, a batch of :mod:`vtoken.data.synthetic_video` clips
(8 frames of 112 px, 256 visual tokens, fed as ``pixel_values_videos``; question mix
``--video-qtype-mix``, with the training-only "when does the red object appear?"), otherwise a
batch of the image recipe below. Validation and the saved weights use the mean of the image and
video validation accuracies, and ``metrics.json`` adds the held-out video test split's accuracy per
video question type, unpruned and with random pruning (``synthetic_video_*``).

Question mix (``--qtype-mix``): the relation types ``left`` / ``above`` are drawn twice as often as
the others, and the training-only ``column`` / ``row`` questions (:data:`synthetic.AUX_QTYPES`:
"what column is the red object in?") supervise directly what a relation needs twice, the position
of a named object. Without them the first checkpoints learned every single-object question but
stayed at chance on relations: a yes/no answer that depends on two looked-up positions gives no
useful gradient until both lookups exist. Each fact is asked once per image (a relation pair in
one order only), which keeps an image's questions diverse.

The learning-rate schedule (linear warm-up, cosine decay to 5 %) runs on
``max(step / steps, elapsed / time_budget)``, so a run ends on time with a fully decayed learning
rate whatever the device's speed; ``--deadline`` (a Unix time) also ends training early enough to
leave ``--eval-reserve`` seconds for the evaluation. Every ``--log-every`` steps the model is scored
on a held-out validation set (``--val-n`` questions of the test split with seed 1, other records
than the seed-0 ones the metrics use, plus position questions as a diagnostic), and the weights with the
best validation accuracy are the ones saved (float16, with the processor). The saved folder is then
reloaded in float32 and evaluated (``metrics.json``, ``TRAINING.md``).
"""

# This module is the command line (parse_args, main); the work is done in, and re-exported from:
#   train_data    the training stream (scenes/easy-vqa images -> packed sequences, batches, mask)
#   train_inputs  device-side pixels and model inputs (M-RoPE template, fast patch embedding)
#   train_checks  pre-training self-checks (pixel pipeline, packed turns vs one by one)
#   train_loop    the training loop (train)
#   train_eval    validation during training and the final evaluation
#   train_report  saving, evaluating the saved folder, metrics.json, TRAINING.md, tar

from __future__ import annotations

import argparse
import os
import sys

from vtoken.data import synthetic
from vtoken.zoo import build
from vtoken.zoo.train_checks import check_packed_turns, check_pipeline
from vtoken.zoo.train_data import DEFAULT_QTYPE_MIX, DEFAULT_VIDEO_QTYPE_MIX, packed_attention_mask, parse_qtype_mix
from vtoken.zoo.train_eval import (
    TrainingVal,
    evaluate_records,
    first_token_accuracy,
    generate_accuracy,
    subset_accuracy,
)
from vtoken.zoo.train_inputs import PixelPipeline, fast_patch_embed, model_inputs, qwen_position_template
from vtoken.zoo.train_loop import train
from vtoken.zoo.train_report import record_cpu_subset, save_and_evaluate

__all__ = [
    "DEFAULT_QTYPE_MIX", "DEFAULT_VIDEO_QTYPE_MIX", "PixelPipeline", "TrainingVal", "check_packed_turns", "check_pipeline",
    "evaluate_records", "fast_patch_embed", "first_token_accuracy", "generate_accuracy", "main",
    "model_inputs", "packed_attention_mask", "parse_args", "parse_qtype_mix", "qwen_position_template",
    "record_cpu_subset", "save_and_evaluate", "subset_accuracy", "train",
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=build.ARCHS)
    ap.add_argument("--out", help="checkpoint folder to write")
    ap.add_argument("--record-cpu-subset", metavar="DIR", nargs="+", default=None,
                    help="only recompute metrics['cpu_test_subset']['accuracy_cpu'] of these checkpoint folders")
    ap.add_argument("--steps", type=int, default=100000, help="upper bound on optimizer steps")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds of training (0 = steps only)")
    ap.add_argument("--deadline", type=float, default=0, help="Unix time by which the whole run must be done")
    ap.add_argument("--eval-reserve", type=float, default=90, help="seconds kept for evaluation before --deadline")
    ap.add_argument("--batch-size", type=int, default=64, help="images per step")
    ap.add_argument("--qa-per-image", type=int, default=24)
    ap.add_argument("--qtype-mix", default=DEFAULT_QTYPE_MIX, help="training question types and their weights")
    ap.add_argument("--no-packed", dest="packed", action="store_false",
                    help="causal multi-turn sequences instead of independent packed turns")
    ap.add_argument("--canvas", choices=synthetic.CANVASES, default=None,
                    help="synthetic canvas style for training and evaluation (default: vtoken.data.synthetic's)")
    ap.add_argument("--detail-test-n", type=int, default=1000,
                    help="held-out small-object, off-centre questions in the final evaluation")
    ap.add_argument("--mrope-section", default=None, metavar="T,H,W",
                    help="qwen2vl: another M-RoPE split of the rotary frequencies (see build.set_mrope_section)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--easy-vqa-frac", type=float, default=0.1, help="share of easy-vqa train images")
    ap.add_argument("--workers", type=int, default=max(1, min(7, (os.cpu_count() or 2) - 1)))
    ap.add_argument("--eval-workers", type=int, default=max(0, min(6, (os.cpu_count() or 2) // 2 - 1)))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--init", default="", help="start from this checkpoint folder instead of random weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-n", type=int, default=512, help="held-out questions scored at each log step")
    ap.add_argument("--val-aux-n", type=int, default=128, help="held-out position questions (diagnostic)")
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--test-n", type=int, default=2000, help="synthetic test questions in the final evaluation")
    ap.add_argument("--subset-n", type=int, default=None,
                    help="fixed test subset the CPU tests re-check (default 100 for llava, 50 for qwen2vl)")
    ap.add_argument("--easy-test-n", type=int, default=1000)
    ap.add_argument("--tar", default="", help="also pack the checkpoint folder into this tar file")
    ap.add_argument("--data", choices=("image", "video"), default="image",
                    help="video: also train on vtoken.data.synthetic_video clips (qwen2vl only; see train_video.sh)")
    ap.add_argument("--video-frac", type=float, default=0.5, help="share of video batches (--data video)")
    ap.add_argument("--video-qtype-mix", default=DEFAULT_VIDEO_QTYPE_MIX, help="video question types and weights")
    ap.add_argument("--video-test-n", type=int, default=1000, help="video test questions in the final evaluation")
    args = ap.parse_args(argv)
    if args.record_cpu_subset is None and (not args.arch or not args.out):
        ap.error("--arch and --out are required (unless --record-cpu-subset)")
    if args.data == "video" and args.arch != "qwen2vl":
        ap.error("--data video needs --arch qwen2vl (the LLaVA checkpoint takes no video)")
    if args.data == "video":
        try:
            parse_qtype_mix(args.video_qtype_mix, video=True)
        except ValueError as e:
            ap.error(f"--video-qtype-mix: {e}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.record_cpu_subset:
        for path in args.record_cpu_subset:
            record_cpu_subset(path)
        return
    if args.easy_vqa_frac > 0:
        try:
            from vtoken.data import easy_vqa

            easy_vqa.easy_vqa_dir()
        except ImportError:
            print("easy-vqa not installed: training on synthetic data only", file=sys.stderr)
            args.easy_vqa_frac = 0.0
    if args.canvas:  # through the environment, so data and evaluation workers render alike
        os.environ["VTOKEN_SYNTH_CANVAS"] = args.canvas
    args.canvas = synthetic.canvas_style()
    res = train(args)
    save_and_evaluate(args, res, argv)


if __name__ == "__main__":
    main()
