"""Train the learned scorers of :mod:`vtoken.scorers.learned` on a shipped checkpoint (CPU, minutes).

    python -m vtoken.zoo.train_learned --method gtc   --model vtoken/tiny-llava --train 384 --heldout 128
    python -m vtoken.zoo.train_learned --method dyvte --model vtoken/tiny-llava --train 384 --heldout 128

Writes ``<checkpoint>/learned/<method>.safetensors`` (what the methods load) and prints a JSON
report (data size, time, held-out metrics) that also goes into the file's metadata.

Training data (questions of :mod:`vtoken.data.synthetic`: the ``train`` split, seed 7, for training;
the ``test`` split, seed 99, held out; ``vtoken eval`` reads the test split at seed 0):

* **gtc**: per question, one eager forward with attention maps kept in the autograd graph and one
  backward from the logit of the model's own (greedy) answer token; the relevance of each visual
  token is row "last prompt token" of the Chefer et al. (2021) relevance matrix
  (:func:`chefer_relevance`); the mapper input is layer 0's attention of the prompt rows after the
  image (:func:`vtoken.scorers.learned.gtc_input_maps`), exactly what the scorer reads at inference.
* **dyvte**: per question and layer l, the text states after layer l (:func:`dyvte_features`) and a
  label from a drop-all ablation: 1 (exit) when the greedy answer with every visual token dropped
  from layer l+1 on equals the unpruned model's answer.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from vtoken.scorers.base import Scorer, Selection
from vtoken.scorers.learned import (DyVTERouter, GTCMapper, dyvte_features, gtc_input_maps, gtc_scores, save_learned,
                                    weights_path)

TRAIN = ("train", 7)
HELDOUT = ("test", 99)


def chefer_relevance(attns, grads) -> torch.Tensor:
    """Relevance propagation of Chefer et al., "Generic Attention-model Explainability for Interpreting
    Bi-Modal and Encoder-Decoder Transformers" (ICCV 2021), self-attention rule: R = I (N, N), then for
    every layer in order ``R <- R + mean_h[(grad_A * A)^+] @ R``. attns, grads: per layer (H, N, N)
    attention probabilities and the gradient of the explained logit w.r.t. them -> R (N, N); row i
    is token i's relevance to every input token."""
    N = attns[0].shape[-1]
    R = torch.eye(N, dtype=torch.float64)
    for a, g in zip(attns, grads):
        abar = (g.double() * a.double()).clamp(min=0).mean(0)
        R = R + abar @ R
    return R


class DropAll(Scorer):
    """Keeps no visual token (the drop-all ablation of DyVTE's labels)."""

    name = "drop_all"
    adaptive = True

    def select(self, sig):
        return Selection(keep=torch.zeros_like(sig.mask))


def _records(split, seed, n):
    from vtoken.data.synthetic import DETAIL_QTYPES, QTYPES, make_split

    return make_split(split, n, seed, qtypes=QTYPES + DETAIL_QTYPES)


def _single_inputs(processor, record):
    from vtoken.zoo import build_prompt

    return processor(images=[record["image"]], text=[build_prompt(processor, record["question"])], return_tensors="pt")


def _segment(model, inputs):
    """The single image's prunable visual positions (n,) and token grid (t, h, w), from the model's
    adapter (:meth:`vtoken.adapters.base.Adapter.layout`: LLaVA's fixed side x side grid, Qwen-VL's
    ``image_grid_thw`` / merge, ...), as the runtime builds the scorers' signals. The grid is
    ``(1, 1, n)`` (one row, :func:`vtoken.scorers.learned.gtc_scores`' fallback) when the adapter
    gives none or the image is split into several segments."""
    from vtoken.adapters import get_adapter

    layout = get_adapter(model).layout(inputs["input_ids"], inputs, None)
    if layout is None:
        raise ValueError("the prompt holds no visual token")
    vis = layout.prunable[0].nonzero().squeeze(1)
    n = vis.numel()
    grid = layout.seg_grid[0] if layout.num_segments == 1 else None
    if grid is None or grid[0] * grid[1] * grid[2] != n:
        grid = (1, 1, n)
    return vis, tuple(int(x) for x in grid)


def _visual(model, inputs):
    return _segment(model, inputs)[0]


def gtc_example(model, processor, record) -> dict:
    """One GTC training example: ``maps`` (H, n) mapper input, ``relevance`` (n,), ``grid`` (1, h, w)."""
    inputs = _single_inputs(processor, record)
    vis, grid = _segment(model, inputs)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = model(**inputs, output_attentions=True, use_cache=False)
        attns = out.attentions
        for a in attns:
            a.retain_grad()
        logits = out.logits[0, -1]
        logits[logits.argmax()].backward()
    R = chefer_relevance([a[0].detach() for a in attns], [a.grad[0] for a in attns])
    N = R.shape[0]
    after = torch.zeros(1, N, dtype=torch.bool)
    after[0, int(vis[-1]) + 1:] = True
    n = vis.numel()
    att0 = attns[0][0].detach()[:, :, vis]  # (H, N, n): every row; the rows after the image are averaged
    maps = gtc_input_maps(att0.unsqueeze(0), after, torch.ones(1, n, dtype=torch.bool))[0]
    return {"maps": maps, "relevance": R[-1, vis].float(), "grid": grid}


def _answers(model, processor, records, plan=None, batch_size=32):
    from vtoken import apply_pruning
    from vtoken.zoo import answer

    images, questions = [r["image"] for r in records], [r["question"] for r in records]
    if plan is None:
        return answer(model, processor, images, questions, batch_size=batch_size)
    with apply_pruning(model, plan=plan):
        return answer(model, processor, images, questions, batch_size=batch_size)


def dyvte_examples(model, processor, records) -> dict:
    """DyVTE training examples: ``feat`` (Q, L-1, 2D) gate inputs after layers 0..L-2, ``label``
    (Q, L-1) 1 where dropping every visual token from layer l+1 on keeps the answer, ``answers``."""
    from vtoken import Stage
    from vtoken.adapters import get_adapter

    depth = len(get_adapter(model).layers)
    base = _answers(model, processor, records)
    labels = torch.stack([torch.tensor([a == b for a, b in zip(_answers(model, processor, records,
                                                                      [Stage(layer=L, scorer=DropAll(), keep=1.0)]),
                                                                      base)])
                          for L in range(1, depth)], dim=1)
    feats = []
    for r in records:
        inputs = _single_inputs(processor, r)
        vis = _visual(model, inputs)
        with torch.no_grad():
            hs = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        N = inputs["input_ids"].shape[1]
        text = torch.ones(1, N, dtype=torch.bool)
        text[0, vis] = False
        after = torch.zeros(1, N, dtype=torch.bool)
        after[0, int(vis[-1]) + 1:] = True
        rows = text[0].nonzero().squeeze(1)
        feats.append(torch.stack([dyvte_features(hs[l + 1][:, rows], text[:, rows], after[:, rows])[0]
                                  for l in range(depth - 1)]))
    return {"feat": torch.stack(feats), "label": labels.long(), "answers": base}


# ----------------------------------------------------------------------------- training


def _kl_loss(pred, target):
    """KL(target || softmax(pred)) with target = relevance normalised to a distribution."""
    t = target.clamp(min=0)
    t = t / t.sum(-1, keepdim=True).clamp(min=1e-12)
    return -(t * torch.log_softmax(pred, -1)).sum(-1).mean()


def _predict_gtc(mapper, examples):
    out = []
    for ex in examples:
        n = ex["maps"].shape[1]
        out.append(gtc_scores(ex["maps"][None], torch.ones(1, n, dtype=torch.bool), torch.arange(n)[None],
                              [ex["grid"]], mapper)[0])
    return out


def _topk_recall(pred, target, k):
    k = min(k, target.numel())
    top_t = set(target.topk(k).indices.tolist())
    return len(top_t & set(pred.topk(k).indices.tolist())) / k


def gtc_metrics(scores, examples, ks=(64, 128, 192)) -> dict:
    """Held-out agreement of ``scores`` (list of (n,)) with the relevance targets: Spearman rank
    correlation and recall of the top-k relevant tokens, averaged over examples."""
    def ranks(x):
        return x.argsort().argsort().float()

    rho = [torch.corrcoef(torch.stack([ranks(s), ranks(ex["relevance"])]))[0, 1].item() for s, ex in zip(scores, examples)]
    out = {"spearman": sum(rho) / len(rho)}
    for k in ks:
        out[f"recall@{k}"] = sum(_topk_recall(s, ex["relevance"], k) for s, ex in zip(scores, examples)) / len(examples)
    return out


def _frames(maps, grid):
    """(H, t*h*w) mapper input on grid (t, h, w) -> (t, H, h, w), the layout gtc_scores feeds."""
    t, h, w = grid
    return maps.reshape(maps.shape[0], t, h, w).transpose(0, 1)


def train_gtc(train, heldout, heads, epochs=60, lr=3e-3, width=16, seed=0):
    """Fit a :class:`GTCMapper` on ``train`` examples (full batch, Adam); returns (mapper, report)."""
    torch.manual_seed(seed)
    mapper = GTCMapper(heads, width)
    opt = torch.optim.Adam(mapper.parameters(), lr=lr)
    # examples grouped by grid (dynamic resolution gives several); each (H, t*h*w) map becomes t
    # (H, h, w) frames as gtc_scores feeds them, and the loss runs over the t*h*w tokens together
    groups = {}
    for ex in train:
        groups.setdefault(tuple(ex["grid"]), []).append(ex)
    data = [(torch.stack([_frames(ex["maps"], ex["grid"]) for ex in exs]), torch.stack([ex["relevance"] for ex in exs]))
            for exs in groups.values()]
    for _ in range(epochs):
        batches = [(g, idx) for g, (x, _) in enumerate(data) for idx in torch.randperm(len(x)).split(32)]
        for b in torch.randperm(len(batches)).tolist():
            g, idx = batches[b]
            x, y = data[g][0][idx], data[g][1][idx]
            loss = _kl_loss(mapper(x.flatten(0, 1)).reshape(len(idx), -1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    mapper.eval().requires_grad_(False)
    report = {"heldout_mapper": gtc_metrics(_predict_gtc(mapper, heldout), heldout),
              # the mapper's input itself (head mean of first-layer text->vision attention) as a ranking
              "heldout_layer0_attention": gtc_metrics([ex["maps"].mean(0) for ex in heldout], heldout),
              "train_loss": loss.item()}
    return mapper, report


def train_dyvte(train, heldout, hidden_size, num_layers, epochs=200, lr=1e-3, hidden=64, seed=0):
    """Fit a :class:`DyVTERouter` gate per layer on ``train`` (cross-entropy); returns (router, report)."""
    torch.manual_seed(seed)
    router = DyVTERouter(hidden_size, num_layers, hidden)
    opt = torch.optim.Adam(router.parameters(), lr=lr, weight_decay=1e-4)
    L = train["feat"].shape[1]
    for _ in range(epochs):
        loss = sum(torch.nn.functional.cross_entropy(router(train["feat"][:, l], l), train["label"][:, l])
                   for l in range(L))
        opt.zero_grad()
        loss.backward()
        opt.step()
    router.eval().requires_grad_(False)
    with torch.no_grad():
        pred = torch.stack([router(heldout["feat"][:, l], l).argmax(-1) for l in range(L)], dim=1)
    lab = heldout["label"]
    # the first layer whose gate says exit (L-1 + 1 = never) and whether exiting there keeps the answer
    first = torch.where(pred.bool(), torch.arange(L).expand_as(pred), L).min(1).values
    safe = torch.where(first < L, lab.gather(1, first.clamp(max=L - 1)[:, None])[:, 0].bool(), torch.ones_like(first).bool())
    report = {"heldout_gate_accuracy_per_layer": [round(float(x), 4) for x in (pred == lab).float().mean(0)],
              "heldout_exit_label_rate_per_layer": [round(float(x), 4) for x in lab.float().mean(0)],
              "heldout_mean_exit_layer": float((first + 1).float().mean()),
              "heldout_answer_kept_at_predicted_exit": float(safe.float().mean()),
              "train_loss": loss.item() / L}
    return router, report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=("gtc", "dyvte"), required=True)
    p.add_argument("--model", default="vtoken/tiny-llava")
    p.add_argument("--train", type=int, default=384, help="training questions")
    p.add_argument("--heldout", type=int, default=128, help="held-out questions")
    p.add_argument("--out", default=None, help="weights file (default: <checkpoint>/learned/<method>.safetensors)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=None, help="examples file: read if it exists (refit only), else written")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 60 gtc, 200 dyvte)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vtoken import zoo

    t0 = time.time()
    model, processor = zoo.load(args.model, attn_implementation="eager")
    path = args.out or weights_path(args.method, zoo.resolve(args.model))
    train_recs, held_recs = _records(*TRAIN, args.train), _records(*HELDOUT, args.heldout)
    cfg = model.config.get_text_config()
    if args.cache and os.path.isfile(args.cache):
        train, held = torch.load(args.cache)
    elif args.method == "gtc":
        train, held = [gtc_example(model, processor, r) for r in train_recs], [gtc_example(model, processor, r) for r in held_recs]
    else:
        train, held = dyvte_examples(model, processor, train_recs), dyvte_examples(model, processor, held_recs)
    if args.cache and not os.path.isfile(args.cache):
        torch.save((train, held), args.cache)
    t1 = time.time()
    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    if args.method == "gtc":
        module, report = train_gtc(train, held, cfg.num_attention_heads, **epochs)
    else:
        module, report = train_dyvte(train, held, cfg.hidden_size, cfg.num_hidden_layers, **epochs)
    report.update({"method": args.method, "model": args.model, "train_questions": args.train,
                   "heldout_questions": args.heldout, "data_seconds": round(t1 - t0, 1),
                   "fit_seconds": round(time.time() - t1, 1), "device": "cpu", "threads": args.threads,
                   "epochs": args.epochs or (60 if args.method == "gtc" else 200), "train_split": list(TRAIN), "heldout_split": list(HELDOUT)})
    save_learned(module, path, extra=report)
    print(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
