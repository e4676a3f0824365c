"""What an eval run is: :class:`EvalConfig` (model, data sets, methods, budgets, output directory,
...), the method lists of a default and of the quick run, and the token counts a table's budget
blocks can use."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from vtoken.eval.records import keep_key
from vtoken.plan import BUDGET_COUNTS  # the token counts a table's budget blocks can use (EvalConfig.budget_count)

__all__ = ["EvalConfig", "config_dict", "DEFAULT_METHODS", "QUICK_METHODS", "VIDEO_METHODS", "VIDEO_MODEL",
           "BUDGET_COUNTS"]


#: methods when --methods is not given, in table order (those registered are used)
DEFAULT_METHODS = ("fastv", "sparsevlm", "pyramiddrop", "visionzip", "divprune", "dart", "random")
#: methods of the no-argument quick run: one per family that runs on any adapter, plus the baseline
QUICK_METHODS = ("fastv", "visionzip", "divprune", "random")
#: methods when a data set is a video one (synthetic-video) and --methods is not given: the video
#: methods (DyCoke, FastVID, HoliTom) and the LLM-side / vision-side-free ones that also run on a
#: Qwen2-VL video (methods reading the vision tower's attention refuse video)
VIDEO_METHODS = ("fastv", "dycoke", "fastvid", "holitom", "divprune", "uniform", "random")
#: the model when --model is not given and a data set is a video one
VIDEO_MODEL = "vtoken/tiny-qwen2vl-video"


@dataclass
class EvalConfig:
    model: str = "vtoken/tiny-llava"
    data: list = field(default_factory=lambda: ["synthetic", "synthetic-detail", "easy-vqa"])
    methods: list = field(default_factory=list)
    keeps: list = field(default_factory=lambda: [0.333, 0.222, 0.111])
    limit: Optional[int] = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    device_map: Optional[str] = None
    out: str = "eval_out"
    max_new_tokens: int = 16
    seed: int = 0
    progress: bool = True
    #: one untimed generate per (method, budget) on a GPU before its timed batches (CUDA context,
    #: cuBLAS / Triton autotuning); off for runs whose timings are not a measurement (sharded
    #: GPU tables), where it would add a batch's work to every configuration
    warmup: bool = True
    #: a batch's vision features computed once for the methods that leave the vision tower alone
    #: (vtoken.eval.vision_memo): None = on the CPU only (on a GPU a pruned row's prefill time
    #: would then not include the tower; the table says so where it is on there)
    reuse_vision: Optional[bool] = None
    #: which visual-token count the "Retain N" blocks of the table mean: "final" = tokens kept
    #: after the last stage, "equivalent" = layer-averaged tokens (docs/DESIGN.md §4). A preset that
    #: can count its budget either way (SparseVLM) runs at N by this count, so it is part of the run's
    #: identity; a row that still does not keep N by it is flagged
    budget_count: str = "final"

    def run_identity(self) -> dict:
        """What predictions depend on; a resumed run must match it."""
        return {"model": self.model, "dtype": self.dtype, "max_new_tokens": self.max_new_tokens,
                "budget_count": self.budget_count}


def config_dict(config: EvalConfig) -> dict:
    d = asdict(config)
    d["keeps"] = [keep_key(k) for k in config.keeps]
    return d
