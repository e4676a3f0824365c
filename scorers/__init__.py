"""vtoken.scorers (installed from the repository folder ``scorers/``): the scorer library (attention,
diversity / erank, information flow, sinks). May import torch, vtoken.signals, vtoken.plan,
vtoken.methods, vtoken.errors; never vtoken.hooks. ``import scorers`` never runs this folder
(``vtoken/_folder_guard.py``).

Scorers are pure functions of :class:`vtoken.signals.SegmentSignals`; methods are preset plans,
each registered beside its scorer (a builder decorated with :func:`vtoken.methods.register_method`
in the scorer's module); :mod:`vtoken.scorers.catalog` renders the methods table.
"""

if "." not in __name__:  # imported under its bare folder name: the name goes to its real owner
    import pathlib, runpy
    runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "vtoken" / "_folder_guard.py"))["hand_over"](__name__, __file__)
else:
    from vtoken.scorers.adaptinfer import AdaptInferScorer
    from vtoken.scorers.attention import FasterVLMScorer, FastVScorer, PyramidDropScorer, ZipVLScorer
    from vtoken.scorers.attention_base import AttentionScorer
    from vtoken.scorers.base import Scorer, Selection, demote, masked_scores, promote, topk_mask, topk_selection
    from vtoken.scorers.baselines import KeepAllScorer, RandomScorer, UniformScorer
    from vtoken.scorers.cdpruner import CDPrunerScorer
    from vtoken.scorers.dycoke import DyCokeScorer
    from vtoken.scorers.diversity import AgileScorer, DARTScorer, DivPruneScorer
    from vtoken.scorers.fastvid import FastVIDScorer
    from vtoken.scorers.flow import AttentionFlowScorer, FlowCutScorer, RolloutScorer, rollout_row
    from vtoken.scorers.mustdrop import MustDropMergeScorer, MustDropScorer
    from vtoken.scorers.prunesid import PruneSIDScorer
    from vtoken.scorers.functional import attention_entropy, attention_flow, attention_rollout, erank
    from vtoken.scorers.scope import SCOPEScorer
    from vtoken.scorers.sink import VARScorer
    from vtoken.scorers.sparsevlm import SparseVLMScorer
    from vtoken.scorers.visionzip import VisionZipScorer
    from vtoken.scorers.vispruner import VisPrunerScorer
    from vtoken.scorers.vscan import VScanScorer
    from vtoken.scorers.holitom import HoliTomScorer
    from vtoken.scorers.flashvid import FlashVIDScorer
    from vtoken.scorers.decode import A2SFScorer, DecodeScorer, LookMScorer, ZipVLKVScorer

    __all__ = [
        "Scorer", "Selection", "topk_mask", "topk_selection", "masked_scores", "demote", "promote",
        "AttentionScorer", "FastVScorer", "SparseVLMScorer", "PyramidDropScorer", "FasterVLMScorer",
        "VisionZipScorer", "ZipVLScorer", "DivPruneScorer", "DARTScorer", "AgileScorer",
        "FlowCutScorer", "RolloutScorer", "AttentionFlowScorer", "VARScorer", "RandomScorer", "UniformScorer",
        "KeepAllScorer", "SCOPEScorer", "CDPrunerScorer", "VisPrunerScorer", "DyCokeScorer", "FastVIDScorer",
        "AdaptInferScorer", "MustDropMergeScorer", "MustDropScorer", "VScanScorer", "HoliTomScorer", "PruneSIDScorer", "FlashVIDScorer",
        "DecodeScorer", "A2SFScorer", "LookMScorer", "ZipVLKVScorer",
        "erank", "attention_rollout", "attention_flow", "rollout_row", "attention_entropy", "methods_table_markdown",
    ]


    def methods_table_markdown() -> str:
        """See :func:`vtoken.scorers.catalog.methods_table_markdown`."""
        from vtoken.scorers.catalog import methods_table_markdown as render

        return render()
