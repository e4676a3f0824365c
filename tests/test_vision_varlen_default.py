"""Qwen's vision tower is fast by default (issue 23): ``apply_pruning`` routes the tower's
per-window attention through vtoken's varlen kernel where the kernel runs (CUDA, no gradients),
keeps transformers' own forward everywhere else, leaves a probed module alone, and ``remove()``
restores the tower. The kernel path is checked against transformers' tower of the installed
version (CI runs this on the oldest and newest supported transformers)."""

import pytest
import torch

import vtoken
from conftest import get_inputs, get_model
from vtoken.kernels import patch_vision_varlen

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _patched(model):
    return [name for name, m in model.model.visual.named_modules() if "forward" in m.__dict__]


def _grid_inputs(model, arch):
    inputs = get_inputs(arch, model)
    grid = inputs.get("image_grid_thw")
    return inputs["pixel_values"], grid


@pytest.mark.parametrize("arch", QWEN)
def test_installed_by_default_and_removed(arch):
    model = get_model(arch)
    n_attn = sum(1 for blk in model.model.visual.blocks)
    with vtoken.apply_pruning(model, method="fastv", keep=0.5, K=1):
        patched = _patched(model)
        assert sum(name.endswith(".attn") for name in patched) == n_attn  # every block's attention
        # Qwen2.5-VL's RMSNorm blocks run fused too (norms, padded MLP); LayerNorm blocks keep theirs
        fused_blocks = [name for name in patched if not name.endswith(".attn")]
        assert fused_blocks == ([f"blocks.{i}" for i in range(n_attn)] if arch == "qwen2_5_vl" else [])
    assert _patched(model) == []
    with vtoken.apply_pruning(model, method="fastv", keep=0.5, K=1, vision_varlen=False):
        assert _patched(model) == []
    llava = get_model("llava")
    with vtoken.apply_pruning(llava, method="fastv", keep=0.5, K=1):  # CLIP: one launch already
        assert not any("forward" in m.__dict__ for m in llava.model.vision_tower.modules())


def test_a_probed_attention_module_keeps_its_probe():
    """FasterVLM reads the last block's attention through a probe: that module is not replaced."""
    model = get_model("qwen2_vl")
    with vtoken.apply_pruning(model, method="fastervlm", keep=0.5):
        patched = _patched(model)
        last = f"blocks.{len(model.model.visual.blocks) - 1}.attn"
        assert last not in patched and len(patched) == len(model.model.visual.blocks) - 1


@pytest.mark.parametrize("arch", QWEN)
def test_keep_all_on_cpu_is_transformers_tower(arch):
    """Where the kernel does not run, the installed patch runs the module's own forward: the
    tower's output is transformers' bit for bit."""
    model = get_model(arch)
    pixels, grid = _grid_inputs(model, arch)
    with torch.no_grad():
        ref = model.model.visual(pixels, grid_thw=grid)
        with vtoken.apply_pruning(model, method="fastv", keep=1.0, K=1):
            out = model.model.visual(pixels, grid_thw=grid)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=0)


@pytest.mark.parametrize("arch", QWEN)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kernel_path_matches_transformers_tower(arch, backend):
    """The path the handle takes on CUDA (here the same code with the PyTorch reference, or the
    Triton kernel through the interpreter) against this transformers version's tower."""
    model = get_model(arch)
    pixels, grid = _grid_inputs(model, arch)
    with torch.no_grad():
        ref = model.model.visual(pixels, grid_thw=grid)
        remove = patch_vision_varlen(model.model.visual, backend=backend)
        try:
            out = model.model.visual(pixels, grid_thw=grid)
        finally:
            remove()
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-4, atol=1e-5)


def test_forced_triton_backend_routes_the_tower_through_the_kernel(monkeypatch):
    """``backend="triton"`` (the Triton interpreter here; CUDA on a GPU): the handle's tower runs
    the kernel, and a pruned forward equals the one with transformers' tower up to rounding."""
    import vtoken.kernels.vision_patch as vp

    calls = []
    real = vp.varlen_attention
    monkeypatch.setattr(vp, "varlen_attention", lambda *a, **k: calls.append(k.get("backend")) or real(*a, **k))
    model = get_model("qwen2_vl")
    inputs = get_inputs("qwen2_vl", model)
    with torch.no_grad():
        with vtoken.apply_pruning(model, method="divprune", keep=0.5, backend="triton"):
            out = model(**inputs).logits
        assert calls and set(calls) == {"triton"}
        with vtoken.apply_pruning(model, method="divprune", keep=0.5, backend="triton", vision_varlen=False):
            ref = model(**inputs).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
