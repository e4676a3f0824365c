"""The signal contract is one declaration (``vtoken.signals.SIGNALS``, issue 18): the signals'
container, the probes the runtime installs, the assisted-decoding check and the methods table all
read it, and no other module keeps its own list of signal names."""

import ast
import pathlib
from dataclasses import fields

import pytest
import torch

import vtoken
from conftest import get_inputs, get_model
from vtoken.errors import PruningConfigError
from vtoken.hooks import handle_of
from vtoken.hooks.captures import probe_rows
from vtoken.plan import Stage
from vtoken.scorers.base import Scorer
from vtoken import signals

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: the modules that may spell signal names: the declaration, the collector that fills each one,
#: and the scorers (which declare what they read)
ALLOWED = {"vtoken/signals.py", "hooks/stage_signals.py", "scorers/testing.py"}


def test_every_declared_signal_is_a_field_of_the_container():
    names = {f.name for f in fields(signals.SegmentSignals)}
    assert signals.SIGNAL_NAMES <= names
    assert signals.SIGNAL_NAMES == frozenset(signals.SIGNALS)


def _string_constants(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


@pytest.mark.parametrize("folder", ["hooks", "vtoken", "vtoken/engine", "scorers/catalog.py"])
def test_no_other_list_of_signal_names(folder):
    """Outside the declaration and its collector, no runtime / engine / catalogue module spells out
    signal names (a second list would drift from the declaration). One name alone may be a word
    of another vocabulary (a capture called "keys", an engine's "hidden" buffer); two or more is a
    list."""
    target = ROOT / folder
    paths = [target] if target.is_file() else sorted(target.glob("*.py"))
    found = []
    for path in paths:
        rel = str(path.relative_to(ROOT))
        if rel in ALLOWED:
            continue
        names = _string_constants(path) & signals.SIGNAL_NAMES
        if len(names) > 1:
            found.append(f"{rel}: {sorted(names)}")
    assert not found, "\n".join(found)


class _Toy(Scorer):
    name = "toy"

    def __init__(self, needs):
        self.needs = frozenset(needs)

    def score(self, sig):
        return torch.zeros(sig.mask.shape)


def test_probes_follow_the_declaration(monkeypatch):
    """A signal added to the declaration is probed where it says, with no other change."""
    monkeypatch.setitem(signals.SIGNALS, "toy_rows", signals.Signal("toy_rows", "(S, n)", "toy", probe=("text",)))
    monkeypatch.setitem(signals.SIGNALS, "toy_all", signals.Signal("toy_all", "(S, n)", "toy", probe=("last",),
                                                                   every_layer=True))
    assert probe_rows([Stage(3, _Toy({"toy_rows"}), 4)]) == {2: {"text"}}
    assert probe_rows([Stage(3, _Toy({"toy_all", "hidden"}), 4)]) == {0: {"last"}, 1: {"last"}, 2: {"last"}}
    assert probe_rows([Stage(2, _Toy({"hidden", "normed_hidden"}), 4)]) == {}
    with pytest.raises(PruningConfigError, match="layer 0"):
        probe_rows([Stage(0, _Toy({"toy_rows"}), 4)])


def test_an_undeclared_signal_is_refused_when_applied():
    model = get_model("llava")
    with pytest.raises(PruningConfigError, match="not signals vtoken provides"):
        vtoken.apply_pruning(model, plan=[Stage(1, _Toy({"hidden", "no_such_signal"}), 4)])
    assert handle_of(model) is None


def test_assisted_decoding_check_reads_causality_from_the_declaration():
    """Hidden states and keys of the visual tokens are causal (an assistant's appended candidates
    cannot change them); the last token's attention is not."""
    causal = {n for n, s in signals.SIGNALS.items() if s.causal}
    assert {"hidden", "keys", "vision_attn"} <= causal
    assert not causal & {"attn_last", "attn_text", "text_hidden", "layer_attn_last"}
    model = get_model("llava")
    inputs = get_inputs("llava", model, variant="single")
    with vtoken.apply_pruning(model, plan=[Stage(1, _Toy({"hidden"}), 2)]):  # causal only: runs
        model.generate(**inputs, max_new_tokens=2, prompt_lookup_num_tokens=2)
