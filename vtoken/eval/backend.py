"""The model side of an eval: load a model, attach a pruning method, answer a batch, measure it.

:class:`ModelBackend` wraps a ``transformers`` VLM and its processor. For every batch it returns
the answers, the visual-token accounting (original / kept after the last stage / layer-averaged
"equivalent" tokens, from the pruning handle's stats) and measured efficiency:

* prefill ms: from the start of the first forward of ``generate`` to the end of it (vision
  encoder + LLM prefill = time to first token of the batch, input processing excluded),
* decode ms/token: mean time between the ends of consecutive forwards (one decode step each),
* peak memory: ``torch.cuda.max_memory_allocated`` over the batch (GPU only),
* KV cache: bytes of the cache the prefill produced (per-layer pruned caches are shorter), per
  sample.

On CUDA every timestamp is taken after ``torch.cuda.synchronize`` on the model's devices, and the
first batch of every (method, budget) is run once untimed first (warm-up); on the CPU they are
plain wall times (reported as such).

Any object with ``configure(method, keep)`` (a context manager) and ``generate(images, questions)
-> BatchOutput`` can stand in for :class:`ModelBackend` (the tests use a fake).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

__all__ = ["BatchOutput", "ModelBackend", "load_backend", "hf_answer", "cache_nbytes", "resolve_dtype"]


@dataclass
class BatchOutput:
    predictions: list
    visual_tokens: list  # per sample: visual tokens before pruning (None if unknown)
    kept_tokens: list  # per sample: visual tokens after the last stage
    equivalent_tokens: list  # per sample: layer-averaged visual tokens
    timing: dict = field(default_factory=dict)
    #: per sample, from the pruning handle's stats (None where there is no pruning / no stats):
    kept_per_stage: Optional[list] = None  # [visual tokens alive after each stage]
    stage_layers: Optional[list] = None  # [decoder layer of each stage]
    segment_tokens: Optional[list] = None  # [prunable visual tokens of each image / video segment]


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"--dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


def cache_nbytes(cache) -> Optional[int]:
    """Bytes held by a ``transformers`` KV cache (``Cache`` with ``layers``, or legacy tuples)."""
    import torch

    if cache is None:
        return None
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    try:
        for item in cache:
            for t in item:
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    except TypeError:
        return None
    return total


class _Timer:
    """Forward hooks on the top-level model that time one ``generate`` call."""

    def __init__(self, model, devices: list):
        self.devices = devices
        self.reset()
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    def reset(self):
        self.t_start = None
        self.ends: list = []
        self.input_ids = None
        self.kv_bytes = None

    def sync(self):
        if self.devices:
            import torch

            for d in self.devices:
                torch.cuda.synchronize(d)

    def _pre(self, module, args, kwargs):
        if self.t_start is None:
            self.sync()
            self.t_start = time.perf_counter()
            ids = kwargs.get("input_ids")
            if ids is None and args:
                ids = args[0]
            self.input_ids = ids.detach() if hasattr(ids, "detach") else None
        return None

    def _post(self, module, args, kwargs, output):
        self.sync()
        self.ends.append(time.perf_counter())
        if len(self.ends) == 1:
            try:
                self.kv_bytes = cache_nbytes(getattr(output, "past_key_values", None))
            except Exception:  # noqa: BLE001 - accounting must never break an eval
                self.kv_bytes = None
        return None

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


class ModelBackend:
    """A loaded VLM + processor + answer function, with pruning and measurement.

    answer_fn(model, processor, images, questions, max_new_tokens=...) -> list[str]
    """

    def __init__(self, model, processor, answer_fn: Callable, max_new_tokens: int = 16, info: Optional[dict] = None,
                 reuse_vision: bool = False):
        import torch

        self.model = model
        self.processor = processor
        self.answer_fn = answer_fn
        self.max_new_tokens = int(max_new_tokens)
        self.warmup = True  # one untimed pass per (method, budget) on a GPU (EvalConfig.warmup)
        self.info = dict(info or {})
        devs = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
        self.cuda_devices = devs
        self.on_gpu = bool(devs)
        self.device_name = torch.cuda.get_device_name(devs[0]) if devs else "cpu"
        self.info.setdefault("device_name", self.device_name)
        self._timer = _Timer(model, devs)
        self._handle = None
        self._config = None
        self._warmed: set = set()
        from vtoken.adapters.base import visual_token_ids

        self._visual_ids = visual_token_ids(model.config)
        # a batch's vision features computed once for the methods that leave the tower alone
        # (vtoken.eval.vision_memo); _variant: which tower the current configuration runs
        self._vision_memo = None
        if reuse_vision:
            from vtoken.adapters import get_adapter
            from vtoken.errors import UnsupportedModelError
            from vtoken.eval.vision_memo import VisionMemo

            try:
                self._vision_memo = VisionMemo(get_adapter(model).multimodal_model)
            except UnsupportedModelError:  # no method can prune it: only the unpruned row runs
                pass
        self._variant = None

    @contextlib.contextmanager
    def configure(self, method: str, keep, budget_count: str = "final"):
        """Attach ``method`` at budget ``keep`` for the enclosed batches; ``"none"`` = the
        unmodified model (the upper bound, with no hooks at all). ``budget_count`` is the count
        the table's "Retain N" blocks use: a preset that can count its budget either way
        (SparseVLM) is run so that it keeps ``keep`` by that count."""
        self._config = (method, keep)
        if method == "none":
            self._variant = "plain"
            try:
                yield None
            finally:
                self._config = self._variant = None
            return
        import vtoken

        from vtoken.methods import budget_count_options, depth_scaled_options

        depth = int(getattr(self.model.config.get_text_config(), "num_hidden_layers", 0) or 0)
        options = depth_scaled_options(method, depth) if depth else {}
        if options:  # the papers' 32-layer stage positions, scaled to this model's depth (noted in the table)
            self.info.setdefault("scaled_layers", {})[method] = list(options["layers"])
        options.update(budget_count_options(method, budget_count))
        handle = vtoken.apply_pruning(self.model, method=method, keep=keep, **options)
        self._handle = handle
        # the handle's tower (its varlen attention where Triton runs), unless the plan reads the
        # encoder's attention: its probes capture while the tower runs, so the tower must run
        self._variant = None if handle.reads_vision_encoder else "pruned"
        try:
            yield handle
        finally:
            self._handle = None
            self._config = self._variant = None
            handle.remove()

    def _answer(self, images: list, questions: list) -> list:
        memo = self._vision_memo
        if memo is not None and self._variant is not None:
            # images by identity; a video (a list of frames, opened anew per batch) by its frames'
            memo.key = (self._variant, tuple(tuple(map(id, im)) if isinstance(im, (list, tuple)) else id(im)
                                             for im in images), tuple(questions))
            memo.refs = (list(images),)
        try:
            return self.answer_fn(self.model, self.processor, images, questions, max_new_tokens=self.max_new_tokens)
        finally:
            if memo is not None:
                memo.key, memo.refs = None, ()

    def generate(self, images: list, questions: list) -> BatchOutput:
        import torch

        if self.on_gpu and self.warmup and self._config not in self._warmed:
            # one untimed pass per (method, budget): CUDA context, cuBLAS/Triton autotuning and
            # caches are not billed to the first measured batch
            self._warmed.add(self._config)
            torch.manual_seed(0)
            self._answer(images, questions)
        torch.manual_seed(0)
        timer = self._timer
        timer.reset()
        for d in self.cuda_devices:
            torch.cuda.reset_peak_memory_stats(d)
        before = _last_prefill(self._handle)
        t0 = time.perf_counter()
        hits = self._vision_memo.hits if self._vision_memo is not None else 0
        preds = self._answer(images, questions)
        timer.sync()
        wall = (time.perf_counter() - t0) * 1e3
        n = len(questions)
        preds = [str(p).strip() for p in preds]
        if len(preds) != n:
            raise RuntimeError(f"the answer function returned {len(preds)} answers for {n} questions")

        visual = [None] * n
        if timer.input_ids is not None and self._visual_ids:
            ids = timer.input_ids
            counts = sum((ids == i).sum(-1) for i in self._visual_ids)
            visual = [int(c) for c in counts.reshape(-1).tolist()][:n]
        kept, equiv = list(visual), [float(v) if v is not None else None for v in visual]
        per_stage = layers = segments = None
        if self._handle is not None:
            # a pruned run's counts come from the handle's stats of THIS batch's prefill; without
            # them the counts are unknown (None), never the unpruned count
            kept, equiv = [None] * n, [None] * n
            after = _last_prefill(self._handle)
            fresh = after is _UNKNOWN or (after is not None and after != before)
            stats = getattr(self._handle, "stats", None) if fresh else None
            if stats is not None and len(getattr(stats, "visual_tokens", [])) == n:
                visual = [int(v) for v in stats.visual_tokens]
                per_stage = [[int(c) for c in row] for row in stats.kept_per_stage]
                kept = [row[-1] if row else v for row, v in zip(per_stage, visual)]
                equiv = [float(e) for e in stats.equivalent_tokens]
                layers = [[int(st.layer) for st in stats.stages]] * n
                segments = [[int(sg.count) for sg in segs] for segs in stats.segments]

        ends = timer.ends
        timing = {"wall_ms": wall, "batch_size": n, "decode_steps": max(len(ends) - 1, 0),
                  "vision_reused": self._vision_memo is not None and self._vision_memo.hits > hits}
        if timer.t_start is not None and ends:
            timing["prefill_ms"] = (ends[0] - timer.t_start) * 1e3
        if len(ends) >= 2:
            timing["decode_ms_per_token"] = (ends[-1] - ends[0]) * 1e3 / (len(ends) - 1)
        if timer.kv_bytes is not None:
            timing["kv_cache_mib_per_sample"] = timer.kv_bytes / 2**20 / max(n, 1)
        if self.cuda_devices:
            timing["peak_mem_mib"] = max(torch.cuda.max_memory_allocated(d) for d in self.cuda_devices) / 2**20
        return BatchOutput(preds, visual, kept, equiv, timing, per_stage, layers, segments)

    def close(self):
        self._timer.remove()
        if self._vision_memo is not None:
            self._vision_memo.remove()


_UNKNOWN = object()


def _last_prefill(handle):
    """The handle's count of pruned prefills in this thread (:attr:`PruningHandle.prefills`), to
    tell this batch's stats from a previous batch's; ``_UNKNOWN`` for a handle without one."""
    if handle is None:
        return None
    return getattr(handle, "prefills", _UNKNOWN)


# --- answering with a generic Hugging Face VLM ------------------------------------------------


def hf_answer(model, processor, images, questions, max_new_tokens: int = 16, **generate_kwargs) -> list:
    """Batched greedy answers from any ``transformers`` image-text-to-text model: prompts come
    from the processor's chat template (one image, then the question), left padding. An item of
    ``images`` that is a list of frames is a video (answered by the lmms plugin's chat path)."""
    import torch

    if any(isinstance(im, (list, tuple)) for im in images):  # a video (its frames): the lmms plugin's
        from vtoken.lmms.answer import _chat_answer  # chat-template path, one {"type": "video"} entry

        return _chat_answer(model, processor, [[im] for im in images], list(questions),
                            max_new_tokens=max_new_tokens, **generate_kwargs)
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    prompts = []
    for q in questions:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        try:
            prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        except Exception:  # noqa: BLE001 - no chat template: LLaVA-1.5's plain format
            image_token = getattr(processor, "image_token", "<image>")
            prompts.append(f"USER: {image_token}\n{q} ASSISTANT:")
    inputs = processor(images=list(images), text=prompts, padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
              if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [s.strip() for s in processor.batch_decode(new, skip_special_tokens=True)]


def _is_zoo(name: str) -> bool:
    """A built-in checkpoint name, or a folder holding one of vtoken's reference checkpoints
    (its ``TRAINING.md``); any other local model is answered through its chat template."""
    import os

    try:
        from vtoken import zoo
    except ImportError:
        return False
    builtin = set(getattr(zoo, "BUILTIN", {})) | {n.split("/")[-1] for n in getattr(zoo, "BUILTIN", {})}
    if name in builtin:
        return True
    return os.path.isdir(name) and os.path.exists(os.path.join(name, "TRAINING.md"))


def load_backend(model: str, device: str = "auto", dtype: str = "auto", device_map: Optional[str] = None,
                 max_new_tokens: int = 16, memo_inputs: bool = False,
                 reuse_vision: Optional[bool] = False) -> ModelBackend:
    """Load a built-in (``vtoken.zoo``) or local Hugging Face model into a :class:`ModelBackend`.
    ``memo_inputs``: the processor's outputs are kept and reused for a repeated batch
    (:class:`vtoken.eval.memo.MemoProcessor`; ``vtoken eval`` answers each batch once per
    method and budget). ``reuse_vision``: a batch's vision features are computed once for the
    methods that leave the vision tower alone (:class:`vtoken.eval.vision_memo.VisionMemo`);
    ``None``: only on the CPU (where the table has no timing columns: a pruned row's prefill time
    would not include the tower)."""
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = resolve_dtype(dtype, device)
    info = {"model": model, "device": device, "dtype": str(torch_dtype).replace("torch.", ""),
            "device_map": device_map}
    if _is_zoo(model):
        from vtoken import zoo

        kwargs = {}
        if device_map:
            if "device_map" in inspect.signature(zoo.load).parameters:
                kwargs["device_map"] = device_map
            else:
                print(f"vtoken eval: --device-map ignored for the built-in {model} (it fits one device)",
                      file=__import__("sys").stderr)
        m, processor = zoo.load(model, device=device, dtype=torch_dtype, **kwargs)
        info["source"] = "vtoken.zoo"
        answer = zoo.answer
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(model)
        except Exception:  # noqa: BLE001 - e.g. no torchvision for the default image backend
            processor = AutoProcessor.from_pretrained(model, backend="pil")
        m = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype, device_map=device_map or device)
        info["source"] = "transformers"
        answer = hf_answer
    m.eval()
    if memo_inputs:
        from vtoken.eval.memo import MemoProcessor

        processor = MemoProcessor(processor)
    if reuse_vision is None:
        reuse_vision = device == "cpu"
    return ModelBackend(m, processor, answer, max_new_tokens=max_new_tokens, info=info, reuse_vision=reuse_vision)
