"""The engine that answers one question twice, unpruned and pruned, on one model.

:class:`DemoEngine` holds the model, its processor, the model's vtoken adapter (asked what the
demo needs to know about the architecture: fixed token grid or not, the image token, the prompt
placeholder, the base view of anyres models) and the lock that serialises every use of the model:
``apply_pruning`` -> ``generate`` -> ``handle.remove()`` happens entirely under it, so no request
ever sees another request's hooks. :meth:`DemoEngine.compare` returns both :class:`Answer` panels
and the heatmap (:mod:`.heatmap`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image

from vtoken.adapters import Adapter, get_adapter
from vtoken.errors import UnsupportedModelError

from .heatmap import kept_masks, model_view, render_heatmap
from .loading import DEFAULT_MODEL, _pick_device, _pick_dtype, build_prompt, load_model
from .uploads import DemoInputError, check_image_size, load_image

DEFAULT_METHOD = "fastv"


def adapter_of(model) -> Adapter:
    """vtoken's adapter for ``model``. For a model vtoken does not support: the base
    :class:`~vtoken.adapters.Adapter` (generic answers: the config's image token, no fixed token
    grid, no base view), so the demo still answers unpruned and every method is refused with
    vtoken's own message."""
    try:
        return get_adapter(model)
    except UnsupportedModelError:
        return Adapter(model)


class _Clock:
    """A ``generate`` streamer that only records when the first new token arrives."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self._puts = 0

    def put(self, value):
        self._puts += 1
        if self._puts == 2 and self.first is None:  # put #1 is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


@dataclass
class Answer:
    """One panel: the answer and its measurements."""

    text: str
    ttft_s: float  # time to first token (prefill, vision tower included)
    total_s: float  # whole generate call
    new_tokens: int
    context_tokens: int  # tokens of the prompt (visual tokens included) entering the LLM
    visual_tokens: int  # visual tokens entering the LLM
    context_after: Optional[int] = None  # pruned: tokens left after the last stage
    visual_after: Optional[int] = None  # pruned: visual tokens left after the last stage
    stages: list = field(default_factory=list)  # pruned: [(layer, scorer, kept, of)]
    equivalent_tokens: Optional[float] = None
    method: Optional[str] = None
    keep: object = None


@dataclass
class Comparison:
    baseline: Answer
    pruned: Answer
    heatmap: np.ndarray  # HxWx3 uint8: one tile per stage
    masks: np.ndarray  # [stages, h, w] bool: kept patches per stage
    view: np.ndarray  # HxWx3 uint8: the image as the vision tower saw it (all patches)


class DemoEngine:
    """The model, its processor, its vtoken adapter and the lock that serialises every use of the
    model."""

    def __init__(self, model, processor, device: str = "cpu", max_new_tokens: int = 16, note: str = "",
                 model_name: str = ""):
        self.model = model
        self.processor = processor
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.note = note
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.lock = threading.Lock()
        self.adapter = adapter_of(model)  # what the demo asks about the architecture
        self.visual_tokens_per_image = self._probe_visual_tokens()
        self.unavailable: dict = {}  # method -> why it cannot run on this model (see warm_up)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, device: Optional[str] = None, dtype=None, **kw):
        device = _pick_device(device)
        torch_dtype = dtype if not isinstance(dtype, (str, type(None))) else _pick_dtype(dtype, device)
        model, processor, note = load_model(name_or_path, device, torch_dtype)
        return cls(model, processor, device=device, note=note, model_name=name_or_path, **kw)

    # -- properties of the model
    @property
    def methods(self) -> list:
        import vtoken

        return [m for m in vtoken.available_methods() if m != "none" and m not in self.unavailable]

    @property
    def base_side(self) -> Optional[int]:
        """Side of the base-resolution token grid of anyres models (LLaVA-NeXT / OneVision), whose
        base-view tokens precede the high-resolution ones; None for other models
        (``Adapter.base_view_side``)."""
        return self.adapter.base_view_side

    @property
    def fixed_grid(self) -> bool:
        """True when every image gives the same number of visual tokens (LLaVA-1.5): budgets are
        then token counts; otherwise (dynamic resolution) fractions (``Adapter.fixed_token_count``)."""
        return bool(self.adapter.fixed_token_count)

    def _probe_visual_tokens(self) -> Optional[int]:
        try:
            inputs = self._inputs(Image.new("RGB", (336, 336), (255, 255, 255)), "what is this?")
            return int((inputs["input_ids"][0] == self._image_token_id()).sum())
        except Exception:
            return None

    def _image_token_id(self) -> int:
        token = self.adapter.image_token_id
        if token is None:
            raise AttributeError("model config has no image token id")
        return token

    def _inputs(self, image: Image.Image, question: str):
        # every processor call passes here: refuse sizes the processor would blow up (a tiny but very
        # long image, a processor configured with huge sizes) before it resizes anything
        check_image_size(image.width, image.height, self.processor)
        prompt = build_prompt(self.processor, question, self.adapter.image_placeholder(self.processor))
        inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        out = {}
        for k, v in inputs.items():
            if hasattr(v, "to"):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(dtype)
            out[k] = v
        return out

    def _generate(self, inputs, max_new_tokens: int):
        import torch

        tok = getattr(self.processor, "tokenizer", self.processor)
        clock = _Clock()
        with torch.inference_mode():
            clock.start = time.perf_counter()
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id, streamer=clock)
            if str(self.device).startswith("cuda"):
                torch.cuda.synchronize()
        end = time.perf_counter()
        new = out[0, inputs["input_ids"].shape[1]:]
        text = tok.decode(new, skip_special_tokens=True).strip()
        first = clock.first if clock.first is not None else end
        return text, first - clock.start, end - clock.start, int(new.numel())

    # -- the two panels
    def answer(self, image, question: str, method: Optional[str] = None, keep=None,
               max_new_tokens: Optional[int] = None):
        """One answer, unpruned (``method=None``) or pruned; returns ``(Answer, stats | None,
        inputs)``. Takes the lock: pruning state never outlives this call."""
        with self.lock:
            return self._answer_locked(image, question, method, keep, max_new_tokens)

    def _answer_locked(self, image, question, method, keep, max_new_tokens):
        import vtoken

        max_new_tokens = int(max_new_tokens or self.max_new_tokens)
        inputs = self._inputs(image, question)
        ids = inputs["input_ids"][0]
        context = int(inputs["attention_mask"][0].sum()) if "attention_mask" in inputs else int(ids.numel())
        try:
            visual = int((ids == self._image_token_id()).sum())
        except AttributeError:
            visual = 0
        if method is None:
            text, ttft, total, n = self._generate(inputs, max_new_tokens)
            return Answer(text, ttft, total, n, context, visual), None, inputs
        handle = vtoken.apply_pruning(self.model, method=method, keep=keep)
        try:
            text, ttft, total, n = self._generate(inputs, max_new_tokens)
            stats = handle.stats
        finally:
            handle.remove()
        ans = Answer(text, ttft, total, n, context, visual, method=method, keep=keep)
        if stats is not None and stats.stages:
            ans.visual_tokens = int(stats.visual_tokens[0])
            ans.stages = [(st.layer, st.scorer, int(st.kept[0].numel()), ans.visual_tokens) for st in stats.stages]
            ans.visual_after = ans.stages[-1][2]
            after = stats.context_tokens[0]
            ans.context_after = int(after[-1] if isinstance(after, (tuple, list)) else after)
            if getattr(stats, "equivalent_tokens", None):
                ans.equivalent_tokens = float(stats.equivalent_tokens[0])
        else:
            ans.visual_after, ans.context_after = visual, context
        return ans, stats, inputs

    def compare(self, image, question: str, method: str = DEFAULT_METHOD, keep=64,
                max_new_tokens: Optional[int] = None) -> Comparison:
        """Both panels for one request (unpruned, then pruned), under one hold of the lock."""
        image = load_image(image, processor=self.processor)
        question = (question or "").strip()
        if not question:
            raise DemoInputError("Please type a question about the image.")
        if len(question) > 1000:
            raise DemoInputError(f"The question is too long ({len(question)} characters; the limit is 1000).")
        if method not in self.methods:
            raise DemoInputError(f"Unknown method {method!r}; choose one of: {', '.join(self.methods)}.")
        keep = self._budget(keep)
        with self.lock:
            base, _, _ = self._answer_locked(image, question, None, None, max_new_tokens)
            pruned, stats, inputs = self._answer_locked(image, question, method, keep, max_new_tokens)
        view = model_view(inputs, self.processor, image)
        masks, scores, labels = kept_masks(stats, aspect=view.shape[1] / max(view.shape[0], 1),
                                           base_side=self.base_side)
        return Comparison(base, pruned, render_heatmap(view, masks, scores, labels), masks, view)

    def _budget(self, keep):
        try:
            value = float(keep)
        except (TypeError, ValueError):
            raise DemoInputError(f"The budget must be a number, got {keep!r}.") from None
        if self.fixed_grid:
            n = self.visual_tokens_per_image or 576
            if not 1 <= value <= n:
                raise DemoInputError(f"The budget must be between 1 and {n} visual tokens, got {keep}.")
            return int(round(value))
        if not 0 < value <= 100:
            raise DemoInputError(f"The budget must be a percentage in (0, 100], got {keep}.")
        return value / 100.0

    def warm_up(self, check_methods: bool = True, methods: Optional[list] = None) -> dict:
        """Answer once unpruned and once per method on a blank image (two new tokens each: prefill
        and a decode step), so the first real request's timings exclude one-off costs, and methods
        that cannot run on this model (a preset deeper than the model, a signal its vision tower
        cannot give) leave the dropdown. ``methods`` limits the check to those names. Returns
        :attr:`unavailable` (method -> reason)."""
        import vtoken

        blank = Image.new("RGB", (336, 336), (255, 255, 255))
        keep = 16 if self.fixed_grid else 0.25
        with self.lock:
            self._answer_locked(blank, "what is this?", None, None, 2)
            names = list(methods) if methods is not None else self.methods
            if not check_methods:
                names = [DEFAULT_METHOD if DEFAULT_METHOD in self.methods else self.methods[0]]
            for name in names:
                try:
                    self._answer_locked(blank, "what is this?", name, keep, 2)
                except vtoken.VTokenError as exc:
                    self.unavailable[name] = str(exc)
                except Exception as exc:  # a method bug must not take the demo down
                    self.unavailable[name] = f"{type(exc).__name__}: {exc}"
        return dict(self.unavailable)

