"""Learned scorers: small networks trained on a checkpoint's own behaviour, shipped beside it.

* **GTC** (:class:`GTCScorer`, method ``gtc``): Lei et al., "Generic Token Compression in Multimodal
  Large Language Models from an Explainability Perspective" (2025, arXiv:2506.01097). A small
  convolutional *mapper* predicts each visual token's explainability relevance to the answer from
  the FIRST LLM layer's text-to-vision attention; the top tokens are kept.
* **DyVTE** (:class:`DyVTEScorer`, method ``dyvte``): Qiao et al., "Accelerating Multimodal Large
  Language Models via Dynamic Visual-Token Exit and the Empirical Findings" (arXiv:2411.19628;
  released code DoubtedSteam/DyVTE). A per-layer hyper-network reads the text tokens' hidden states
  after each layer and decides whether ALL visual tokens exit there.

The networks are trained by :mod:`vtoken.zoo.train_learned` and stored as one safetensors file per
method, ``<checkpoint folder>/learned/<method>.safetensors`` (tensors + a JSON ``config`` entry in
the file's metadata). At :func:`vtoken.apply_pruning` time the folder is the model's
``name_or_path`` (what ``from_pretrained`` / :func:`vtoken.zoo.load` set; the adapter's
``checkpoint_dir``), or ``weights=`` names a file or passes a ready module. A model without weights
raises :class:`vtoken.errors.MissingWeightsError` naming the training command.

The scorers stay pure: they read their signals and the (frozen, eval-mode) module they were given.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from vtoken.errors import MissingWeightsError, PruningConfigError
from vtoken.methods import register_method, register_scorer
from vtoken.plan import Stage, validate_budget
from vtoken.scorers import functional as F
from vtoken.scorers.base import Scorer, Selection, topk_selection
from vtoken.signals import SegmentSignals

#: folder (inside a checkpoint folder) holding the learned scorers' weights
LEARNED_DIR = "learned"


def train_command(method: str, checkpoint: Optional[str] = None) -> str:
    """The command that trains ``method``'s weights for ``checkpoint`` (shown by errors)."""
    model = checkpoint or "<checkpoint folder>"
    return f"python -m vtoken.zoo.train_learned --method {method} --model {model}"


# ----------------------------------------------------------------------------- networks


class GTCMapper(nn.Module):
    """The relevance mapper: (B, H, h, w) first-layer attention maps -> (B, h, w) relevance logits.

    Input channel c is head c's attention from the prompt's text rows to each visual token, averaged
    over those rows and multiplied by the token count (a uniform map is 1). Fully convolutional, so
    any grid size; three 3x3 / 3x3 / 1x1 convolutions with GELU.
    """

    def __init__(self, heads: int, width: int = 16):
        super().__init__()
        self.heads, self.width = int(heads), int(width)
        self.net = nn.Sequential(
            nn.Conv2d(self.heads, self.width, 3, padding=1), nn.GELU(),
            nn.Conv2d(self.width, self.width, 3, padding=1), nn.GELU(),
            nn.Conv2d(self.width, 1, 1),
        )

    def config(self) -> dict:
        return {"heads": self.heads, "width": self.width}

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net(maps).squeeze(1)


class DyVTERouter(nn.Module):
    """DyVTE's per-layer gates: layer l's gate maps [mean text state, last prompt state] (B, 2D) to
    two logits (continue, exit); exit when logit 1 > logit 0. Each gate: Linear(2D, hidden, no bias),
    GELU, Linear(hidden, 2, no bias), as the released ``Router`` (hidden 2048 there)."""

    def __init__(self, hidden_size: int, num_layers: int, hidden: int = 64):
        super().__init__()
        self.hidden_size, self.num_layers, self.hidden = int(hidden_size), int(num_layers), int(hidden)
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * self.hidden_size, self.hidden, bias=False), nn.GELU(),
                          nn.Linear(self.hidden, 2, bias=False))
            for _ in range(self.num_layers))

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "hidden": self.hidden}

    def forward(self, feat: torch.Tensor, layer: int) -> torch.Tensor:
        return self.gates[layer](feat)


_NETWORKS = {"gtc": GTCMapper, "dyvte": DyVTERouter}


def save_learned(module: nn.Module, path: str, extra: Optional[dict] = None) -> None:
    """Write ``module`` (a :data:`_NETWORKS` class) to ``path`` as safetensors, its constructor
    config (and ``extra``, e.g. training metrics) in the metadata."""
    from safetensors.torch import save_file

    method = next(k for k, v in _NETWORKS.items() if isinstance(module, v))
    meta = {"method": method, "config": json.dumps(module.config()), "extra": json.dumps(extra or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.detach().contiguous().float() for k, v in module.state_dict().items()}, path, metadata=meta)


def weights_path(method: str, checkpoint: Optional[str]) -> Optional[str]:
    """Where ``method``'s weights live for a checkpoint folder (None without a folder)."""
    if not checkpoint:
        return None
    return os.path.join(checkpoint, LEARNED_DIR, f"{method}.safetensors")


def load_learned(method: str, weights=None, checkpoint: Optional[str] = None) -> nn.Module:
    """The eval-mode network of ``method``: ``weights`` as given (an ``nn.Module`` of the right
    class, or a file path), else the checkpoint's shipped file; raises MissingWeightsError else."""
    cls = _NETWORKS[method]
    if isinstance(weights, nn.Module):
        if not isinstance(weights, cls):
            raise PruningConfigError(f"{method} weights= must be a {cls.__name__}; got {type(weights).__name__}")
        return weights.eval()
    path = weights if weights is not None else weights_path(method, checkpoint)
    if path is None or not os.path.isfile(path):
        where = f"no file {path}" if path else "the model has no checkpoint folder (name_or_path is empty)"
        raise MissingWeightsError(
            f"method {method!r} needs weights trained on this checkpoint, and {where}. Train them with "
            f"`{train_command(method, checkpoint)}` (writes {weights_path(method, checkpoint or '<checkpoint>')}), "
            f"or pass weights=<file or {cls.__name__}>")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("method") != method:
        raise PruningConfigError(f"{path} holds weights of {meta.get('method')!r}, not {method!r}")
    module = cls(**json.loads(meta["config"])).float()  # float32 whatever the default dtype
    module.load_state_dict(load_file(path))
    return module.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- GTC


def _on_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with its weights on ``device`` (moved in place the first time: the weights load
    on the CPU, the signals live where the model runs)."""
    if next(module.parameters()).device != device:
        module.to(device)
    return module


def gtc_input_maps(attn_text: torch.Tensor, text_rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mapper's input per candidate: (S, H, T, n) attention, (S, T) bool rows to average (the
    prompt after the image), (S, n) mask -> (S, H, n), mean over the rows times the segment's
    candidate count (uniform attention = 1), zero on padding slots."""
    w = text_rows.to(attn_text.dtype)
    mean = torch.einsum("shtn,st->shn", attn_text.float(), w.float()) / w.float().sum(1).clamp(min=1)[:, None, None]
    count = mask.sum(1).clamp(min=1).to(mean.dtype)
    return mean * count[:, None, None] * mask[:, None, :]


def gtc_scores(maps: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, grid, mapper: GTCMapper) -> torch.Tensor:
    """Predicted relevance (S, n): each segment's (H, n) maps scattered onto its token grid (by the
    candidates' ORIGINAL ``index``; a segment without a grid is one row of ``max(index) + 1``
    tokens; each frame of a video is its own map), run through ``mapper``, read back at the
    candidates. -inf on padding. Segments on the same grid go through the mapper together (one
    call per distinct grid; the mapper is convolutional, each map on its own); one host sync in
    all for the row widths of the segments without a grid, none otherwise."""
    S, H, n = maps.shape
    dev = maps.device
    out = torch.full((S, n), float("-inf"), dtype=torch.float32, device=dev)
    dtype = next(_on_device(mapper, dev).parameters()).dtype
    has = [grid is not None and grid[s] is not None for s in range(S)]
    rowless = [s for s in range(S) if not has[s]]
    width = dict(zip(rowless, (index[rowless].amax(dim=1) + 1).tolist())) if rowless else {}  # the one sync
    by_grid = {}
    for s in range(S):
        by_grid.setdefault(tuple(int(v) for v in grid[s]) if has[s] else (1, 1, int(width[s])), []).append(s)
    for (t, h, w), segs in by_grid.items():
        rows = torch.tensor(segs, device=dev)
        real = mask[rows]  # (G, n)
        idx = torch.where(real, index[rows], 0).long()  # padding reads and writes slot 0, with zeros
        vals = torch.where(real.unsqueeze(1), maps[rows], 0)  # (G, H, n)
        G = len(segs)
        canvas = maps.new_zeros(G, H, t * h * w).scatter_add_(2, idx.unsqueeze(1).expand(G, H, n), vals)
        frames = canvas.view(G, H, t, h, w).transpose(1, 2).reshape(G * t, H, h, w)
        pred = mapper(frames.to(dtype)).reshape(G, t * h * w)
        out[rows] = torch.where(real, pred.gather(1, idx).float(), float("-inf"))
    return out


@register_scorer
class GTCScorer(Scorer):
    """GTC relevance mapper (Lei et al., "Generic Token Compression in Multimodal Large Language Models
    from an Explainability Perspective", 2025, arXiv:2506.01097).

    Offline, each training question's visual-token relevance to the model's answer is computed by
    gradient-weighted attention relevance propagation (Chefer et al., ICCV 2021; see
    :func:`vtoken.zoo.train_learned.chefer_relevance`); a small conv net (:class:`GTCMapper`) learns
    to predict that map from the first LLM layer's text-to-vision attention. At inference the
    mapper's output ranks the visual tokens and the top ``budget`` are kept.

    Signals: ``attn_text`` (S, H, T, n) at layer 0 (the stage runs at layer 1), ``text_after`` (S, T)
    -> scores (S, n) = mapper(grid of (H, n) maps).

    Deviations: (1) the mapper input is the per-head attention of the prompt rows after the image,
    averaged over those rows (the paper feeds first-layer attention maps; its exact pooling and conv
    sizes were not available here: no released code was found); (2) pruning happens entering layer 1
    (after the first layer, where its attention exists) rather than at the LLM input, so layer 0 sees
    every token; (3) relevance targets are the first answer token's relevance row only (the answers of
    the shipped checkpoints are one token); (4) the mapper is 3 conv layers of width 16 (trained on
    CPU in minutes), the loss a KL divergence between softmaxed prediction and the normalised
    relevance.
    """

    name = "gtc"
    needs = frozenset({"attn_text", "text_after"})

    def __init__(self, mapper: GTCMapper):
        self.mapper = mapper

    def score(self, sig: SegmentSignals) -> torch.Tensor:
        rows = sig.text_after & sig.text_mask
        # a prompt with no text after the image: every text row
        rows = torch.where(rows.any(1, keepdim=True), rows, sig.text_mask)
        maps = gtc_input_maps(sig.attn_text, rows, sig.mask)
        with torch.no_grad():
            return gtc_scores(maps, sig.mask, sig.index, sig.grid, self.mapper)


@register_method(name="gtc", family="learned",
                 paper="Lei et al. 2025 (arXiv:2506.01097); mapper trained here (vtoken.zoo.train_learned)",
                 stages="layer 1 (first-layer attention)", needs_attention=True, text_guided=True,
                 options=("weights", "checkpoint", "mode"))
def gtc_plan(keep, weights=None, checkpoint=None, mode: str = "select"):
    """GTC preset: one stage entering layer 1 keeping the ``keep`` tokens of highest predicted
    relevance. ``weights``: a file or a :class:`GTCMapper`; default the checkpoint's
    ``learned/gtc.safetensors`` (``checkpoint`` is filled in by :func:`vtoken.apply_pruning`)."""
    keep = validate_budget(keep)
    return [Stage(layer=1, scorer=GTCScorer(load_learned("gtc", weights, checkpoint)), keep=keep, mode=mode)]


# ----------------------------------------------------------------------------- DyVTE


def dyvte_features(text_hidden: torch.Tensor, text_mask: torch.Tensor, text_after: torch.Tensor) -> torch.Tensor:
    """DyVTE's gate input (S, 2D): [mean hidden state of the prompt rows after the image except the
    last, hidden state of the last prompt row], from text_hidden (S, T, D), text_mask / text_after
    (S, T) bool (text rows in sequence order). Falls back to every text row but the last where no
    row follows the image."""
    T = text_mask.shape[1]
    order = torch.arange(T, device=text_mask.device).expand_as(text_mask)
    last = torch.where(text_mask, order, -1).max(1).values.clamp(min=0)  # (S,)
    rows = text_after & text_mask & (order != last[:, None])
    rows = torch.where(rows.any(1, keepdim=True), rows, text_mask & (order != last[:, None]))
    w = rows.float()
    h = text_hidden.float()
    mean = torch.einsum("std,st->sd", h, w) / w.sum(1, keepdim=True).clamp(min=1)
    return torch.cat([mean, h[torch.arange(h.shape[0], device=h.device), last]], dim=-1)


@register_scorer
class DyVTEScorer(Scorer):
    """DyVTE visual-token exit (Qiao et al., "Accelerating Multimodal Large Language Models via Dynamic
    Visual-Token Exit and the Empirical Findings", arXiv:2411.19628; code DoubtedSteam/DyVTE).

    The stage entering layer L reads the text tokens' hidden states there (the output of layer L-1)
    and the gate of layer L-1 (:class:`DyVTERouter`) decides: exit (logit 1 > logit 0) drops EVERY
    visual token of the segment from layer L on; continue keeps them (at most ``budget``, ranked by
    the last prompt token's attention, FastV's rule, when the budget is below the count).

    Signals: ``text_hidden`` (S, T, D), ``text_after`` (S, T), ``attn_last`` (S, H, n) at L-1 ->
    Selection with 0 or min(budget, n) tokens per segment (adaptive).
    The decision per segment goes to ``sig.diagnostics["dyvte_exit"]`` (S,) bool.

    Deviations: gate hidden width 64 (2048 in the released code, for a 4096-wide LLM); labels from
    per-layer drop-all ablations of greedy answers on the shipped checkpoint's synthetic questions
    (the released code compares teacher-forced answer tokens: accuracy > 0.99 and loss < 1.03x);
    ``keep`` below the count adds FastV ranking (the paper's pure DyVTE is ``keep=1.0``, default);
    the gate decides per segment (per image) where the released code handles batch 1.
    """

    name = "dyvte"
    needs = frozenset({"text_hidden", "text_after", "attn_last"})
    adaptive = True

    def __init__(self, router: DyVTERouter, layer: int):
        if not 0 <= layer < router.num_layers:
            raise PruningConfigError(f"dyvte gate layer {layer} outside the router's {router.num_layers} gates")
        self.router, self.layer = router, int(layer)

    def exits(self, sig: SegmentSignals) -> torch.Tensor:
        feat = dyvte_features(sig.text_hidden, sig.text_mask, sig.text_after)
        with torch.no_grad():
            router = _on_device(self.router, feat.device)
            logits = router(feat.to(next(router.parameters()).dtype), self.layer).float()
        return logits[:, 1] > logits[:, 0]

    def select(self, sig: SegmentSignals) -> Selection:
        exit_ = self.exits(sig)
        sig.diagnostics["dyvte_exit"] = exit_.clone()
        count = torch.where(exit_, torch.zeros_like(sig.budget), torch.minimum(sig.budget, sig.counts))
        return topk_selection(F.head_mean(sig.attn_last), sig.mask, count)


@register_method(name="dyvte", family="learned",
                 paper="Qiao et al. (arXiv:2411.19628); gates trained here (vtoken.zoo.train_learned)",
                 stages="every layer 1..N-1 (exit gate), adaptive", needs_attention=True, text_guided=True,
                 options=("weights", "checkpoint", "num_layers", "mode"),
                 released_code="DoubtedSteam/DyVTE@b4a3396 (gate rule; weights trained here)")
def dyvte_plan(keep=1.0, weights=None, checkpoint=None, num_layers=None, mode: str = "select"):
    """DyVTE preset: an exit gate entering every layer 1 .. num_layers-1 (``num_layers`` and
    ``checkpoint`` are filled in by :func:`vtoken.apply_pruning`); ``keep`` caps the tokens kept
    before the exit (1.0, default: all, the paper's DyVTE)."""
    keep = validate_budget(keep)
    router = load_learned("dyvte", weights, checkpoint)
    depth = router.num_layers if num_layers is None else int(num_layers)
    if depth != router.num_layers:
        raise PruningConfigError(f"dyvte weights have {router.num_layers} gates; the model has {depth} layers")
    return [Stage(layer=L, scorer=DyVTEScorer(router, L - 1), keep=keep, mode=mode) for L in range(1, depth)]


__all__ = ["GTCMapper", "DyVTERouter", "GTCScorer", "DyVTEScorer", "gtc_plan", "dyvte_plan", "gtc_input_maps",
           "gtc_scores", "dyvte_features", "load_learned", "save_learned", "weights_path", "train_command"]
