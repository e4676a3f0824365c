"""rope_vision (vtoken.kernels.vision_rope): a Qwen-VL vision tower's rotary embedding in one launch.

Independent expectations: transformers' own ``apply_rotary_pos_emb_vision`` of each Qwen vision
tower, in the installed version (CI runs the oldest and the newest supported), for the PyTorch path
(bit for bit) and the Triton kernel (through Triton's interpreter on the CPU, within one rounding
step); the unpatched tower for the patched one; and a tower whose rotary function is not the
half-split formula, which the patch must leave to its own function.
"""

import os
import sys

import torch

if not torch.cuda.is_available():  # on a GPU the kernels compile; the interpreter would break every later test
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402

from vtoken.kernels import HAS_TRITON, patch_vision_varlen  # noqa: E402
from vtoken.kernels.vision_rope import rope_vision, rope_vision_reference  # noqa: E402
from rounding import rotate_half, within_rotary_rounding  # noqa: E402

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter test (the GPU test covers CUDA)")
MODULES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _qkv_views(S=5, H=3, Dh=10, dtype=torch.float32, seed=0):
    """q, k as the vision attention leaves them: strided views of one fused qkv output; fp32 tables."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(S, 3 * H * Dh, generator=g).to(dtype)
    q, k, v = qkv.reshape(S, 3, H, Dh).permute(1, 0, 2, 3).unbind(0)
    angles = torch.randn(S, Dh // 2, generator=g) * 3
    emb = torch.cat((angles, angles), dim=-1)
    return q, k, emb.cos(), emb.sin()


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_is_transformers_formula(module, dtype):
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    q, k, cos, sin = _qkv_views(dtype=dtype)
    want = mod.apply_rotary_pos_emb_vision(q, k, cos, sin)
    got = rope_vision_reference(q, k, cos, sin)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert got[0].is_contiguous() and got[0].dtype == dtype


@needs_triton
@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 3, 10), (7, 16, 80), (2, 1, 4)])
def test_kernel_matches_transformers_within_one_rounding(dtype, shape):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    q, k, cos, sin = _qkv_views(*shape, dtype=dtype, seed=sum(shape))
    q0, k0 = q.clone(), k.clone()
    got = rope_vision(q, k, cos, sin, backend="triton")
    want = apply_rotary_pos_emb_vision(q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    eps = torch.finfo(dtype).eps
    for g, w in zip(got, want):
        assert g.is_contiguous() and g.shape == w.shape
        assert ((g.float() - w.float()).abs() <= eps * w.float().abs() + 1e-30).all()


def test_bad_arguments_are_refused():
    q, k, cos, sin = _qkv_views()
    with pytest.raises(ValueError, match="cos and sin"):
        rope_vision(q, k, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="one shape and dtype"):
        rope_vision(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="even"):
        rope_vision(q[..., :9], k[..., :9], cos[:, :9], sin[:, :9])
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        rope_vision(q.long(), k.long(), cos, sin)


def _tower(**overrides):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_kernels_varlen import tiny_qwen25_vision, tower_inputs

    tower = tiny_qwen25_vision(**overrides)
    return tower, tower_inputs(torch.tensor([[1, 6, 8], [2, 4, 4]]))


@needs_triton
@cpu_only
def test_patched_tower_uses_the_fused_kernels_where_they_agree():
    """Qwen2.5-VL's tower: the rotary embedding, the blocks' RMSNorms (with the residual adds) and
    the SiLU gate all pass their checks and run fused; the tower's output is the unpatched one's,
    and ``remove()`` leaves no forward behind."""
    from vtoken.kernels import vision_patch

    tower, (x, grid) = _tower()
    calls = []
    real = vision_patch.add_rms_norm

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    with torch.no_grad():
        ref = tower(x, grid_thw=grid).pooler_output
        vision_patch.add_rms_norm = counted
        try:
            remove = patch_vision_varlen(tower, backend="triton")
            out = tower(x, grid_thw=grid).pooler_output
        finally:
            vision_patch.add_rms_norm = real
        remove()
    names = {getattr(k[0], "__name__", "") for k in remove.fused_verdicts}  # what each check replaced
    assert len(remove.fused_verdicts) == 3 and all(remove.fused_verdicts.values()), remove.fused_verdicts
    assert {"apply_rotary_pos_emb_vision", "Qwen2_5_VLRMSNorm"} <= names
    assert len(calls) >= 2 * len(tower.blocks)  # two fused norms a block (and the checks)
    assert all("forward" not in m.__dict__ for m in tower.modules())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_triton
@cpu_only
def test_padded_mlp_of_an_unaligned_width():
    """An MLP 44 wide (Qwen2.5-VL-7B's 3,420 is not a multiple of 8 either) runs as a gate/up GEMM
    and a down GEMM padded to 48: the tower's output is the unpatched one's; while patched the MLP
    weights are views of the padded buffers (the module's own forward reads them), and ``remove()``
    gives them their own storage back, unchanged."""
    tower, (x, grid) = _tower(intermediate_size=44)
    mlp = tower.blocks[0].mlp
    before = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    with torch.no_grad():
        ref = tower(x, grid_thw=grid).pooler_output
        remove = patch_vision_varlen(tower, backend="triton")
        assert mlp.down_proj.weight.is_contiguous()  # nothing re-pointed before a fused call
        out = tower(x, grid_thw=grid).pooler_output
        assert not mlp.down_proj.weight.is_contiguous() and mlp.down_proj.weight.shape == (32, 44)
        assert mlp.down_proj.weight.untyped_storage().nbytes() == 32 * 48 * 4
        remove()
    assert all(remove.fused_verdicts.values()) and len(remove.fused_verdicts) == 3
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for k, v in mlp.state_dict().items():
        assert v.is_contiguous() and v.untyped_storage().nbytes() == v.numel() * 4 and torch.equal(v, before[k])


@needs_triton
@cpu_only
def test_a_tower_with_another_rotary_formula_keeps_its_own(monkeypatch):
    """An interleaved rotation (pairs (0,1), (2,3), ...) is not the half-split formula: the check
    refuses the fused kernel and the patched tower equals the unpatched one with that formula."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mod

    def interleaved(q, k, cos, sin):
        def rot(x):
            xf = x.float()
            pairs = torch.stack((-xf[..., 1::2], xf[..., ::2]), dim=-1).flatten(-2)
            return (xf * cos.unsqueeze(-2) + pairs * sin.unsqueeze(-2)).to(x.dtype)
        return rot(q), rot(k)

    monkeypatch.setattr(mod, "apply_rotary_pos_emb_vision", interleaved)
    tower, (x, grid) = _tower()
    with torch.no_grad():
        ref = tower(x, grid_thw=grid).pooler_output
        remove = patch_vision_varlen(tower, backend="triton")
        out = tower(x, grid_thw=grid).pooler_output
        remove()
    verdicts = {getattr(k[0], "__name__", ""): v for k, v in remove.fused_verdicts.items()}
    assert verdicts["interleaved"] is False and sum(verdicts.values()) == 2  # the norm and the gate still fuse
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("module", MODULES)
def test_kernel_matches_transformers_on_gpu(module):
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    q, k, cos, sin = (t.cuda() for t in _qkv_views(S=4096, H=16, Dh=80, dtype=torch.bfloat16, seed=7))
    got = rope_vision(q, k, cos, sin)
    want = mod.apply_rotary_pos_emb_vision(q, k, cos, sin)
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    for g, w, x in zip(got, want, (q, k)):  # transformers multiplies in float32, as the kernel does
        assert within_rotary_rounding(g, w, x, c, s, torch.float32).all()
        wrong = rope_vision_reference(x, x, cos, -sin)[0]  # the bound is no wider than a wrong formula's miss
        assert not within_rotary_rounding(wrong, w, x, c, s, torch.float32).all()



@pytest.mark.parametrize("module", MODULES)
def test_gpu_tests_bound_takes_a_correctly_rounded_rotary_and_refuses_wrong_ones(module):
    """The bound the GPU test applies (tests/rounding.py), checked on the CPU at the GPU test's sizes:
    the rotary computed in float64 and rounded once (the most accurate a kernel can be) is within it
    of transformers' float32 result, though not within one rounding of that result everywhere (what the
    GPU test asserted before, and a correct kernel failed on the H100); a sign error or the unrotated
    input are not."""
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    q, k, cos, sin = _qkv_views(S=4096, H=16, Dh=80, dtype=torch.bfloat16, seed=7)
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    want = mod.apply_rotary_pos_emb_vision(q, k, cos, sin)[0]
    exact = (q.double() * c.double() + rotate_half(q.double()) * s.double()).to(torch.bfloat16)
    assert within_rotary_rounding(exact, want, q, c, s, torch.float32).all()
    eps = torch.finfo(torch.bfloat16).eps
    assert not ((exact.float() - want.float()).abs() <= eps * want.float().abs() + 1e-30).all()
    wrong_sign = (q.double() * c.double() - rotate_half(q.double()) * s.double()).to(torch.bfloat16)
    for wrong in (wrong_sign, q):
        assert not within_rotary_rounding(wrong, want, q, c, s, torch.float32).all()
