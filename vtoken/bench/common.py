"""Shared machinery of ``vtoken bench``: the run context, synchronised timing, memory and KV-cache
accounting, the vision-encoder timer and the oracle.

Timing protocol (docs/DESIGN.md section 7): every measured call is bracketed by device
synchronisation; one untimed warm-up call first (compiles, autotuning, allocator growth), then
the median of ``repeats`` timed calls; a call whose first timed run exceeds ``long_ms`` is timed
twice only (the median of two is their mean). Each row records how many runs its median is of.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from vtoken.hooks import held_bytes


@dataclass
class Bench:
    """Run context shared by the suites: device, dtype, repeats, time budget and the result rows."""

    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    tiny: bool = False
    repeats: int = 3
    new_tokens: int = 16
    backend: str = "auto"
    long_ms: float = 1000.0
    deadline: Optional[float] = None  # time.monotonic() after which optional work is skipped
    env: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # failures that did not stop the run (one method, one row)
    notes: dict = field(default_factory=dict)
    on_row: Optional[Callable] = None
    quiet: bool = False

    # ------------------------------------------------------------ device
    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def empty_cache(self, collect: bool = False) -> None:
        """Return cached device blocks; ``collect`` also runs the cycle collector first (slow,
        ~0.4 s with transformers loaded: after failures and model releases only)."""
        if collect:
            gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> Optional[float]:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def event(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    @staticmethod
    def elapsed_ms(start, end) -> float:
        if isinstance(start, float):
            return (end - start) * 1000.0
        return float(start.elapsed_time(end))

    # ------------------------------------------------------------ budget
    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def over_budget(self, need_s: float = 0.0) -> bool:
        return self.time_left() < need_s

    def skip(self, suite: str, what: str) -> None:
        self.skipped.append(f"{suite}: {what} (time budget)")
        self.log(f"SKIPPED {suite}: {what} (time budget)")

    # ------------------------------------------------------------ output
    def log(self, *a) -> None:
        if not self.quiet:
            print(*a, flush=True)

    def add(self, **row) -> dict:
        row = {k: v for k, v in row.items() if v is not None}
        for k in ("device", "torch", "transformers", "triton"):
            if k in self.env:
                row.setdefault(k, self.env[k])
        self.rows.append(row)
        self.log({k: v for k, v in row.items() if k not in ("device", "torch", "transformers", "triton")})
        if self.on_row is not None:
            self.on_row()
        return row


def timed(bench: Bench, fn: Callable, repeats: Optional[int] = None, warmup: int = 1, timers=()):
    """(median ms, runs, output of the last run) of ``fn()``, synchronised.

    ``timers``: :class:`ModuleTimer` objects whose recorded spans are reset after the warm-up,
    so they hold exactly the timed runs' spans.
    """
    n = repeats or bench.repeats
    with torch.no_grad():
        for _ in range(warmup):
            out = fn()
            unlink(out)
            del out
        bench.sync()
        for t in timers:
            t.reset()
        times, out = [], None
        for i in range(n):
            unlink(out)
            out = None
            bench.sync()
            t0 = time.perf_counter()
            out = fn()
            bench.sync()
            times.append((time.perf_counter() - t0) * 1000.0)
            if len(times) >= 2 and times[0] > bench.long_ms:
                break
        unlink(out)
    return statistics.median(times), len(times), out


def timed_interleaved(bench: Bench, variants: list, rounds: int) -> list:
    """Per-round ms of each of ``variants`` [(context factory, fn)], timed in ``rounds`` rounds
    that run every variant once in turn (after one warm-up round), synchronised.

    A ratio between two variants of one round shares that moment's machine state (clocks, host
    load), so it is far steadier than the ratio of two medians taken one after the other: on a
    launch-bound prefill (7B, batch 1) back-to-back medians drift by up to 2x on a shared host.
    Summarise with :func:`statistics.median` per variant and :func:`paired_ratio` between two.
    """
    times = [[] for _ in variants]
    with torch.no_grad():
        for r in range(rounds + 1):
            for i, (enter, fn) in enumerate(variants):
                with enter():
                    bench.sync()
                    t0 = time.perf_counter()
                    out = fn()
                    bench.sync()
                    dt = (time.perf_counter() - t0) * 1000.0
                    unlink(out)
                    del out
                if r:
                    times[i].append(dt)
    return times


def paired_ratio(a: list, b: list) -> float:
    """Median over rounds of a[r] / b[r] (two variants' times from :func:`timed_interleaved`)."""
    return statistics.median(x / y for x, y in zip(a, b))


def rounds_for(ms: float, repeats: int, seconds: float = 1.5, most: int = 41) -> int:
    """Interleaved rounds for a measurement of about ``ms``: at least ``max(5, repeats)``, more
    for short ones (about ``seconds`` of timed work per variant, at most ``most``), since a short
    launch-bound prefill is the noisiest."""
    return max(5, repeats, min(most, int(seconds * 1000.0 / max(ms, 1e-3))))


_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize")
_COPIES = ("cudaMemcpyAsync", "cudaMemcpy")


def runtime_call_counts(events) -> dict:
    """Kernel launches, device syncs and memcpy calls among a ``torch.profiler`` run's events
    (``prof.events()``): ``{"launch": n, "sync": n, "memcpy": n}`` (only the kinds seen)."""
    counts = {}
    for e in events:
        kind = "launch" if e.name in _LAUNCHES else "sync" if e.name in _SYNCS else "memcpy" if e.name in _COPIES else None
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def unlink(out) -> None:
    """Let an output's KV cache be freed by reference counting.

    vtoken patches ``get_seq_length`` onto a cache that carries a pruned prefix (generate's
    cache) as an instance attribute closing over the cache itself: a reference cycle, so without
    this the cache's memory (GBs at large batch) waits for Python's cycle collector.
    """
    cache = cache_of(out) if out is not None and not torch.is_tensor(out) else None
    if cache is not None:
        cache.__dict__.pop("get_seq_length", None)


def kv_bytes(cache) -> Optional[int]:
    """Bytes of the KV a ``transformers`` cache attends over: keys + values of every layer, plus a
    decode stage's low-bit entries (a readmit plan's stash is apart: :func:`vtoken.hooks.held_bytes`)."""
    if cache is None:
        return None
    held = held_bytes(cache)
    return held["kv"] + held["low_bits"]


def cache_of(out):
    """The KV cache of a model output: ``past_key_values`` (5.17) / ``cache`` (5.24, where the
    old name is a deprecated alias)."""
    for name in ("cache", "past_key_values"):
        try:
            c = getattr(out, name, None)
        except Exception:  # pragma: no cover - a deprecated alias that raises
            c = None
        if c is not None:
            return c
    return None


def mb(nbytes) -> Optional[float]:
    return None if nbytes is None else round(nbytes / 2**20, 1)


def kv_fields(nbytes) -> dict:
    """Row fields of a KV-cache size: MiB (rounded, for tables) and exact bytes."""
    return dict(kv_cache_mb=mb(nbytes), kv_cache_bytes=nbytes)


class ModuleTimer:
    """Times every forward of ``module`` (CUDA events on the stream, or wall clock on the CPU)."""

    def __init__(self, bench: Bench, module):
        self.bench = bench
        self.spans = []
        self._start = None
        self._h = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, m, a):
        self._start = self.bench.event()

    def _post(self, m, a, o):
        self.spans.append((self._start, self.bench.event()))

    def reset(self):
        self.spans = []

    def median_ms(self) -> Optional[float]:
        if not self.spans:
            return None
        self.bench.sync()
        return statistics.median(Bench.elapsed_ms(s, e) for s, e in self.spans)

    def remove(self):
        for h in self._h:
            h.remove()
        self._h = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


class HookOwner:
    """Holds one hook handle in ``self._h``; ``remove()`` and use as a context manager."""

    def remove(self):
        self._h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


class OracleFeed(HookOwner):
    """The ORACLE of docs/DESIGN.md section 7: the same model (vision tower, projector, merging of the
    image features into the prompt: its own code), then the language model fed ONLY the tokens at
    ``index`` (B, M) original positions, with their original position ids. No scoring, no
    vtoken hooks: one gather at the language model's entrance.

    Works as a forward pre-hook on the language model; only the call that carries the full prompt
    (``n_full`` tokens) is touched.

    Ragged kept counts (adaptive methods, e.g. ``mustdrop``, in a batch): ``index`` slots of -1 are
    padding, as in the handle's stats; they are fed as masked slots (attention mask 0), so the
    oracle runs the same padded (B, M) layout the pruned run does and each sample attends only to
    its own kept tokens.
    """

    def __init__(self, language_model, index: torch.Tensor, n_full: int):
        self.pad = index < 0
        self.index = index.clamp_min(0)
        self.n_full = n_full
        self.fed = []  # tokens the language model received, per call
        self._h = language_model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if args or emb is None or emb.shape[1] != self.n_full:
            return None
        if self.index.device != emb.device:
            self.index, self.pad = self.index.to(emb.device), self.pad.to(emb.device)
        idx = self.index
        B, M = idx.shape
        if emb.shape[0] != B:
            raise ValueError(f"oracle index is for batch {B}, the model got batch {emb.shape[0]}")
        out = dict(kwargs)
        out["inputs_embeds"] = emb.gather(1, idx.unsqueeze(-1).expand(B, M, emb.shape[-1]))
        for key, value in kwargs.items():
            if key == "inputs_embeds" or not torch.is_tensor(value) or value.shape[-1] != self.n_full:
                continue
            if key == "attention_mask" and value.dim() == 2:
                out[key] = value.gather(1, idx)
            elif key == "position_ids":
                v = value.expand(*value.shape[:-2], B, self.n_full)
                out[key] = v.gather(-1, idx.expand(*v.shape[:-2], B, M))
            elif key == "cache_position" and value.dim() == 1:
                out[key] = torch.arange(M, device=value.device, dtype=value.dtype)
            else:
                raise ValueError(f"the oracle does not know how to shorten the language-model input {key!r} "
                                 f"of shape {tuple(value.shape)}")
        if out.get("position_ids") is None:  # 1-D RoPE models: the kept tokens' ORIGINAL positions
            out["position_ids"] = idx
        if bool(self.pad.any()):
            mask = out.get("attention_mask")
            if mask is None:
                mask = torch.ones(B, M, dtype=torch.long, device=emb.device)
            elif mask.dim() != 2:
                raise ValueError("the oracle feeds ragged kept counts through a 2-D attention mask; "
                                 f"the model got one of shape {tuple(mask.shape)}")
            out["attention_mask"] = mask.masked_fill(self.pad, 0)
        self.fed.append(M)
        return (), out


def kept_positions(handle) -> torch.Tensor:
    """(B, M) original positions of the tokens alive after the last stage of the last pruned
    prefill (what the oracle feeds)."""
    st = handle.stats
    if st is None or st.positions is None:
        raise RuntimeError("no pruned prefill recorded on this handle")
    return st.positions


def token_counts(handle) -> dict:
    """Token accounting of the last pruned prefill, sample 0 (all samples of a bench batch have the
    same counts): visual tokens, kept prunable visual tokens (after the last stage, and after each
    stage: ``kept_per_stage``), context before / after."""
    st = handle.stats
    per_stage = [sum(s.counts[0]) for s in st.stages]
    before, after = st.context_tokens[0]
    return dict(visual_tokens=st.visual_tokens[0], kept_visual=per_stage[-1] if per_stage else None,
                kept_per_stage=per_stage, context=before, context_after=after,
                equivalent_tokens=round(st.equivalent_tokens[0], 1))
