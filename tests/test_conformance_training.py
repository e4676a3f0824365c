"""Conformance of training paths (issue 19): the model's own loss from ``labels``, ``backward``,
and gradient checkpointing, on every adapter and pruning family (see
``tests/conformance_cases.py``).

keep-all: the plain model's loss, logits and gradients. Pruning: the loss is computed on the kept
positions (each label follows its token: the label of a kept token is its own, and the model's
shift-by-one predicts each kept token from the kept slot before it), gradients flow, and
gradient checkpointing gives the gradients of the same handle without it — or a VTokenError that
says what to do.
"""

import pytest
import torch
import torch.nn.functional as F

from conformance_cases import TIGHT, apply, cases, fresh_model, one_thread, run_case, short_known_failures
from conftest import get_inputs, get_model
from tiny_models import IMAGE_ID, VIDEO_ID

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def text_labels(inputs):
    """Labels as a VLM fine-tuning collator makes them: every real text token is its own label;
    visual placeholders and padding are -100."""
    ids = inputs["input_ids"]
    visual = (ids == IMAGE_ID) | (ids == VIDEO_ID)
    return torch.where(inputs["attention_mask"].bool() & ~visual, ids, torch.full_like(ids, -100))


def loss_on_kept(logits, labels, positions):
    """The causal-LM loss of pruned ``logits`` (B, M, V) whose slot j holds original position
    ``positions[b, j]`` (-1: padding): labels follow their tokens, then the usual shift by one."""
    kept = torch.where(positions >= 0, labels.gather(1, positions.clamp(min=0)), torch.full_like(positions, -100))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), kept[:, 1:].reshape(-1),
                           ignore_index=-100)


@pytest.mark.parametrize("arch,family,keep", cases("test_labels_loss"))
@short_known_failures
def test_labels_loss(arch, family, keep):
    """``model(**inputs, labels=labels)``. keep-all: the plain model's loss and logits. Pruned:
    the loss of the kept positions (labels follow their tokens), logits as without labels; or a
    VTokenError."""
    model = get_model(arch)
    inputs = get_inputs(arch, model)
    labels = text_labels(inputs)
    with torch.no_grad():
        if keep == "keepall":
            ref = model(**inputs, labels=labels)
        with apply(model, family, keep) as handle:
            unlabelled = model(**inputs)
            positions = handle.stats.positions.clone()
            out = run_case(keep, lambda: model(**inputs, labels=labels))
    if keep == "keepall":
        torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
        valid = inputs["attention_mask"].bool()
        torch.testing.assert_close(out.logits[valid], ref.logits[valid], **TIGHT)
        return
    if out is None:
        return
    torch.testing.assert_close(out.logits, unlabelled.logits, **TIGHT)
    torch.testing.assert_close(out.loss, loss_on_kept(unlabelled.logits, labels, positions), rtol=1e-5, atol=1e-5)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _backward(model, inputs, family=None, keep=None):
    """Train-mode forward + backward of the mean squared logit over the real (kept) slots;
    returns (gradients by parameter name, loss), or None when a handle refused."""
    model.zero_grad(set_to_none=True)

    def run():
        out = model(**inputs)
        if handle is None:
            valid = inputs["attention_mask"].bool()
        else:
            valid = handle.stats.positions >= 0 if keep == "pruned" else inputs["attention_mask"].bool()
        loss = out.logits[valid].float().pow(2).mean()
        loss.backward()
        return _grads(model), loss.detach()

    if family is None:
        handle = None
        return run()
    with apply(model, family, keep) as handle:
        return run_case(keep, run)


def _assert_same_grads(got, want, **tol):
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m: f"{name}: {m}", **(tol or TIGHT))


def _assert_flow(grads, model):
    """Gradients reach every decoder layer and the vision tower, and are finite."""
    assert grads, "no gradients"
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
    n_layers = model.config.text_config.num_hidden_layers
    for i in range(n_layers):
        assert any(f"layers.{i}." in n and g.abs().sum() > 0 for n, g in grads.items()
                   if "language_model" in n), f"no gradient in decoder layer {i}"
    assert any(("vision_tower" in n or "visual" in n) and g.abs().sum() > 0 for n, g in grads.items()), "vision tower"


@pytest.mark.parametrize("arch,family,keep", cases("test_backward"))
@short_known_failures
def test_backward(arch, family, keep):
    """Train mode, forward + backward. keep-all: the plain model's gradients. Pruned: gradients
    reach every decoder layer and the vision tower (through the kept tokens), or a VTokenError."""
    model = fresh_model(arch).train()
    inputs = get_inputs(arch, model)
    result = _backward(model, inputs, family, keep)
    if keep == "keepall":
        ref, ref_loss = _backward(model, inputs)
        torch.testing.assert_close(result[1], ref_loss, **TIGHT)
        _assert_same_grads(result[0], ref)
    elif result is not None:
        _assert_flow(result[0], model)


@pytest.mark.parametrize("arch,family,keep", cases("test_gradient_checkpointing"))
@short_known_failures
def test_gradient_checkpointing(arch, family, keep):
    """``gradient_checkpointing_enable(use_reentrant=False)``, train mode, forward + backward:
    the gradients of the same handle without checkpointing (keep-all: the plain model's), or a
    VTokenError."""
    model = fresh_model(arch).train()
    inputs = get_inputs(arch, model)
    want = _backward(model, inputs, family, keep) if keep == "pruned" else _backward(model, inputs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = _backward(model, inputs, family, keep)
    if got is None or want is None:
        return
    torch.testing.assert_close(got[1], want[1], **TIGHT)
    _assert_same_grads(got[0], want[0])
