"""vtoken.hooks.host_checks: transformers' placeholder and all-ones-mask checks answered from the
pruned call's host copies. The masks must equal transformers' own (every adapter), a mismatch must
raise as transformers does, ``remove()`` must leave nothing behind, and a batch-1 LLaVA-family
prefill must reach no wait inside transformers' forward (counted on the CPU as in
tests/test_host_syncs.py)."""

import inspect
import types

import pytest
import torch

import vtoken
from conftest import get_inputs, get_model
from vtoken.bench.host_waits import SyncCounter, TransferCounter, call_site


def _short_by_one_row(features: torch.Tensor) -> torch.Tensor:
    return features[:, :-1] if features.dim() == 3 else features[:-1]


@pytest.mark.parametrize("variant", ["single", "batch"])
def test_placeholder_masks_equal_transformers(arch, variant):
    model = get_model(arch)
    inputs = get_inputs(arch, model, variant=variant)
    with vtoken.apply_pruning(model, method="fastv", keep=0.5) as handle, torch.no_grad():
        mm = handle.runtime.adapter.multimodal_model
        installed, calls = vars(mm)["get_placeholder_mask"], []
        mm.get_placeholder_mask = lambda *a, **k: calls.append((a, k, installed(*a, **k))) or calls[-1][2]
        try:
            model(**inputs)
        finally:
            mm.get_placeholder_mask = installed
        assert calls, "the pruned forward did not call get_placeholder_mask"
        for args, kwargs, got in calls:
            want = type(mm).get_placeholder_mask(mm, *args, **kwargs)
            got, want = (got,) if torch.is_tensor(got) else got, (want,) if torch.is_tensor(want) else want
            assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
        # one feature row short: transformers raises ValueError, and so does the host count
        args, kwargs, _ = calls[0]
        bound = inspect.signature(type(mm).get_placeholder_mask).bind(mm, *args, **kwargs).arguments
        name = next(n for n, v in bound.items() if n.endswith("_features") and v is not None)
        bound[name] = _short_by_one_row(bound[name])
        del bound["self"]
        with pytest.raises(ValueError):
            type(mm).get_placeholder_mask(mm, **bound)
        handle.runtime.tls.ctx = types.SimpleNamespace(ids_host=bound["input_ids"].cpu())
        try:
            with pytest.raises(ValueError, match="features and .* tokens do not match"):
                mm.get_placeholder_mask(**bound)
            with pytest.MonkeyPatch.context() as env:  # transformers' switch turns both checks off
                env.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
                type(mm).get_placeholder_mask(mm, **bound)
                mm.get_placeholder_mask(**bound)
        finally:
            handle.runtime.tls.ctx = None
    assert "get_placeholder_mask" not in vars(mm)


@pytest.mark.parametrize("name", ["llava", "llava_next", "llava_onevision"])
def test_batch1_pruned_prefill_waits_nowhere_in_transformers(name):
    """A batch-1 pruned prefill with pixels into an empty cache object (the static engine's; transformers
    5.17's ``generate``). Before: the placeholder count (its check and its error message) and SDPA's
    all-ones test of the mask each read the device after the vision tower was queued."""
    from transformers import DynamicCache

    model = get_model(name)
    inputs = get_inputs(name, model, variant="single")
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with vtoken.apply_pruning(model, method="fastv", keep=0.5), torch.no_grad():
        counter = SyncCounter(where=call_site)
        with counter:
            model(**inputs, use_cache=True, **{cache: DynamicCache()})
    assert not [w for (_, w) in counter.sites if w.startswith("transformers/")], counter.sites
    with vtoken.apply_pruning(model, method="fastv", keep=1.0), torch.no_grad():
        kept = model(**inputs).logits
    with torch.no_grad():
        plain = model(**inputs).logits
    torch.testing.assert_close(kept, plain, rtol=0, atol=0)  # all kept: the plain model's logits, bit for bit


def test_a_forward_without_a_cache_keeps_its_mask():
    """Without a cache object transformers reads ``position_ids`` for packed sequences when it gets no
    mask: a keep-all handle must still give the plain model's logits for such a forward (the mask is
    dropped only on an empty cache object)."""
    model = get_model("llava")
    inputs = dict(get_inputs("llava", model, variant="single"))
    n = inputs["input_ids"].shape[1]
    inputs["position_ids"] = torch.cat([torch.arange(n // 2), torch.arange(n - n // 2)])[None]
    with torch.no_grad():
        plain = model(**inputs, use_cache=False).logits
        with vtoken.apply_pruning(model, method="fastv", keep=1.0):
            kept = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(kept, plain, rtol=0, atol=0)


def test_host_inputs_stand_in_for_the_forwards_own_copies():
    """``handle.host_inputs(ids, mask)``: a pruned forward with ``input_ids`` of that shape copies
    nothing to the host (a capture of the whole prefill cannot) and gives the same logits; ids of
    another shape are copied as before."""
    model = get_model("llava")
    inputs = get_inputs("llava", model, variant="single")
    ids_host, mask_host = inputs["input_ids"].clone(), inputs["attention_mask"].bool().clone()
    with vtoken.apply_pruning(model, method="fastv", keep=0.5) as handle, torch.no_grad():
        ref = model(**inputs).logits
        for given, copies in (((ids_host, mask_host), 0), ((ids_host[:, 1:], mask_host[:, 1:]), 2)):
            counter = TransferCounter(where=call_site)
            with handle.host_inputs(*given) as plans, counter:
                got = model(**inputs).logits
            assert sum(n for (what, w), n in counter.sites.items() if w.startswith("hooks/host_plans.py")) == copies
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
            # the forward's host plan (device tensors a captured graph would read), for the caller to keep
            assert len(plans) == 1 and plans[0] is handle.runtime.last_meta.prepared
        assert getattr(handle.runtime.tls, "host_inputs", None) is None  # (the block's end restores it)
