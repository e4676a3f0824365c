"""``VTokenLMMS``: the lmms-eval model ``vtoken`` (registered by :mod:`vtoken.lmms.registration`).

    python -m lmms_eval --model vtoken \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,keep=64 --tasks pope ...

model_args:

* ``pretrained`` — a built-in checkpoint (``vtoken/tiny-llava``, ``vtoken/tiny-qwen2vl``) or a local
  ``transformers`` VLM folder / hub id (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
  Qwen3-VL), loaded by :func:`vtoken.eval.backend.load_backend` as ``vtoken eval`` loads it;
* ``method`` (default ``none``: the unpruned model, no hooks), ``keep`` (tokens per image, or a
  fraction in (0, 1]), ``budget_count`` (``final`` or ``equivalent``, as ``vtoken eval``): the
  pruning plan, attached once with :meth:`ModelBackend.configure` (the papers' 32-layer stage
  positions scaled to the model's depth, as ``vtoken eval`` does);
* ``device`` (``auto``), ``dtype`` (``auto``), ``device_map``, ``batch_size`` (lmms-eval's
  ``--batch_size``), ``max_frames`` (frames sampled per video, default 8), ``max_new_tokens`` (used
  when a task sets none);
* ``stats_path`` — where the token accounting JSON goes (a ``.json`` file or a directory); default:
  lmms-eval's ``--output_path`` when run from its command line (read from ``sys.argv``: lmms-eval
  does not hand it to models), else nowhere (it is still logged). With several processes each rank
  writes its own file under ``rank<r>/``.

Only ``generate_until`` is implemented: loglikelihood and multi-round tasks are refused with the
reason. After every ``generate_until`` call the kept-token accounting is logged per task and
written to ``vtoken_token_accounting_<method>_<keep>_<date>.json``; its batch means go to
lmms-eval's metrics log, so the results file carries ``avg_vtoken_kept_tokens`` /
``avg_vtoken_equivalent_tokens`` / ``avg_vtoken_visual_tokens`` under ``throughput``, beside the
scores.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

from lmms_eval.api.model import lmms
from loguru import logger

from vtoken.errors import UnsupportedCallError
from vtoken.eval.backend import load_backend
from vtoken.eval.records import parse_keep
from vtoken.lmms.accounting import TokenAccounting
from vtoken.lmms.answer import DEFAULT_MAX_NEW_TOKENS, answer_function, doc_visuals, generation_settings, truncate_at
from vtoken.lmms.batching import make_batches

__all__ = ["VTokenLMMS", "cli_output_path"]


def cli_output_path(argv=None) -> Optional[str]:
    """The ``--output_path`` of an lmms-eval command line (``sys.argv``), if any."""
    argv = list(sys.argv if argv is None else argv)
    for i, a in enumerate(argv):
        if a == "--output_path" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--output_path="):
            return a.split("=", 1)[1]
    return None


def _batch_size(value) -> int:
    if value is None:
        return 1
    text = str(value).strip()
    if text.startswith("auto"):
        raise ValueError("vtoken's lmms-eval model needs a fixed --batch_size N (got 'auto')")
    return int(text)


class VTokenLMMS(lmms):
    """A ``transformers`` VLM with a vtoken pruning plan, as an lmms-eval "simple" model."""

    is_simple = True

    def __init__(self, pretrained: str = "vtoken/tiny-llava", method: str = "none", keep=None,
                 budget_count: str = "final", device: Optional[str] = None, dtype: str = "auto",
                 device_map: Optional[str] = None, batch_size=1, max_batch_size=None, max_frames: int = 8,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stats_path: Optional[str] = None, **kwargs):
        super().__init__()
        if kwargs:
            logger.warning(f"vtoken: model_args not used: {sorted(kwargs)}")
        method = str(method or "none").strip().lower()
        if method != "none" and keep in (None, ""):
            raise ValueError(f"method={method} needs a budget: keep=N (tokens per image) or keep=F "
                             "(fraction in (0, 1])")
        self.method = method
        self.keep = parse_keep(keep) if isinstance(keep, str) else keep
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.max_frames = int(max_frames)
        self.default_max_new_tokens = int(max_new_tokens)
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device in (None, "", "auto") and self._world_size > 1:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.backend = load_backend(str(pretrained), device or "auto", dtype, device_map, self.default_max_new_tokens)
        self._config = self.backend.configure(self.method, self.keep, budget_count=budget_count)
        self.handle = self._config.__enter__()
        self.stats_path = stats_path if stats_path not in (None, "") else cli_output_path()
        if self.stats_path and self._world_size > 1:
            self.stats_path = os.path.join(str(self.stats_path), f"rank{self._rank}")
        self.accounting = TokenAccounting({
            "model": str(pretrained), "method": self.method, "keep": self.keep, "budget_count": budget_count,
            "batch_size": self.batch_size_per_gpu, "rank": self._rank, "world_size": self._world_size,
            "backend": dict(self.backend.info)})
        logger.info(f"vtoken: {pretrained} with method={self.method} keep={self.keep} "
                    f"({self.backend.info.get('source')}, {self.backend.info.get('device')})")

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def model(self):
        return self.backend.model

    def generate_until(self, requests) -> list:
        results: list = [None] * len(requests)
        source = self.backend.info.get("source")
        for batch in make_batches([r.args for r in requests], self.batch_size_per_gpu):
            docs = [self.task_dict[batch.task][batch.split][d] for d in batch.doc_ids]
            visuals = [doc_visuals(batch.doc_to_visual, doc) for doc in docs]
            settings = generation_settings(batch.gen_kwargs, self.default_max_new_tokens)
            self.backend.answer_fn = answer_function(source, settings, self.max_frames)
            self.backend.max_new_tokens = settings.max_new_tokens
            t0 = time.perf_counter()
            out = self.backend.generate(visuals, list(batch.contexts))
            elapsed = time.perf_counter() - t0
            fresh = self.handle is not None and out.kept_per_stage is not None
            summary = self.handle.stats.summary() if fresh else None
            means = self.accounting.add(batch.task, batch.doc_ids, out, summary)
            self._log_metrics(elapsed, out, means)
            for i, context, text in zip(batch.indices, batch.contexts, out.predictions):
                text = truncate_at(text, settings.until)
                results[i] = text
                self.cache_hook.add_partial("generate_until", (context, batch.gen_kwargs), text)
        self._report()
        return results

    def _log_metrics(self, elapsed: float, out, means: dict) -> None:
        try:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics
        except ImportError:  # pragma: no cover - an lmms-eval without the metrics log
            return
        tokens = sum(len(p.split()) for p in out.predictions)
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=tokens,
                    avg_speed=tokens / elapsed if elapsed > 0 else 0.0,
                    additional_metrics={k: v for k, v in means.items() if v is not None})

    def _report(self) -> None:
        for line in self.accounting.lines():
            logger.info(line)
        if self.stats_path:
            path = self.accounting.write(self.stats_path)
            logger.info(f"vtoken: token accounting written to {path}")

    def loglikelihood(self, requests) -> list:
        raise UnsupportedCallError(
            "vtoken's lmms-eval model implements generate_until only: loglikelihood (multiple-choice by "
            "continuation likelihood) is not supported; use the task's generate_until variant")

    def generate_until_multi_round(self, requests) -> list:
        raise UnsupportedCallError("vtoken's lmms-eval model does not implement multi-round generation "
                                   "(generate_until_multi_round); use single-round tasks")

    def clean(self):
        if self._config is not None:
            self._config.__exit__(None, None, None)
            self._config, self.handle = None, None
        self.backend.close()
        super().clean()
