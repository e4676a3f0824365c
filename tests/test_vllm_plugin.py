"""vtoken's vLLM plugin (vtoken/vllm/): the same method keeps the same tokens in vLLM as with
``apply_pruning`` on the transformers model, and the answers agree.

The end-to-end tests run vLLM's offline engine (``benchmarks/vllm/generate.py``, in a subprocess,
with ``VTOKEN_METHOD`` / ``VTOKEN_KEEP`` set: vLLM loads the plugin from its entry point) on the
built-in ``vtoken/tiny-qwen2vl`` (and a random-weight tiny Qwen2.5-VL made here) and one synthetic
image, and compare with the transformers model pruned by :func:`vtoken.apply_pruning` in this process:

* the kept token indices vLLM's plugin traced (``VTOKEN_VLLM_TRACE``) equal ``handle.stats``' kept
  indices (Qwen2-VL: divprune at 25 %, uniform at 11 %, random at 64 tokens, fastervlm at 25 % and
  visionzip at 11 %, both ranked by the vision probe's encoder attention, visionzip's contextual
  tokens merged; Qwen2.5-VL: divprune at 25 %);
* vLLM's prompt is shorter by exactly the pruned tokens (placeholders sized to what the image keeps);
* greedy tokens are equal and the first token's top log-probabilities agree to 1e-3 (float32),
  which fails when a kept token's M-RoPE position differs from its unpruned one.

They need the vLLM engine venv (``benchmarks/vllm/build_env.sh DIR``; then
``DIR/bin/python -m pytest tests/test_vllm_plugin.py``). Elsewhere they are skipped, unless
``VTOKEN_REQUIRE_VLLM=1`` (set by .ci/run, which builds that venv) makes a missing engine a failure.
The configuration tests at the top run everywhere. A last test serves the built-in checkpoint with
``vllm serve`` (the README's command) and asks it through the OpenAI chat API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vtoken.errors import PruningConfigError
from vtoken.vllm import config as vconfig
from vtoken.vllm.positions import (
    grid_offsets,
    index_offsets,
    llava_mrope_override,
    pack_offsets,
    pruned_1d_positions,
    pruned_mrope_positions,
    run_offsets,
    unpack_offsets,
)

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "how many objects are there?"
MAX_NEW = 6


# --- configuration and positions (no engine needed) ----------------------------------------------

@pytest.mark.parametrize("method", ["divprune", "random", "uniform", "fastervlm", "visionzip"])
def test_pre_llm_methods_are_accepted(method):
    cfg = vconfig.from_env({"VTOKEN_METHOD": method, "VTOKEN_KEEP": "0.25"})
    assert cfg.method == method and cfg.tokens_kept(576) == 144
    assert vconfig.from_env({"VTOKEN_METHOD": method, "VTOKEN_KEEP": "64"}).tokens_kept(576) == 64


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop", "sparsevlm"])
def test_in_llm_methods_are_refused_with_the_reason(method):
    with pytest.raises(PruningConfigError, match="paged KV cache") as err:
        vconfig.from_env({"VTOKEN_METHOD": method, "VTOKEN_KEEP": "64"})
    assert f"method {method!r} cannot run in vLLM" in str(err.value)


def test_method_options_come_from_vtoken_options():
    cfg = vconfig.from_env({"VTOKEN_METHOD": "random", "VTOKEN_KEEP": "64", "VTOKEN_OPTIONS": '{"seed": 3}'})
    assert cfg.stage.scorer.seed == 3
    with pytest.raises(PruningConfigError, match="JSON"):
        vconfig.from_env({"VTOKEN_METHOD": "random", "VTOKEN_KEEP": "64", "VTOKEN_OPTIONS": "seed=3"})
    with pytest.raises(PruningConfigError, match="bad option"):
        vconfig.from_env({"VTOKEN_METHOD": "uniform", "VTOKEN_KEEP": "64", "VTOKEN_OPTIONS": '{"seed": 3}'})


def test_bad_settings_are_refused():
    assert vconfig.from_env({}) is None and vconfig.from_env({"VTOKEN_METHOD": ""}) is None
    with pytest.raises(PruningConfigError, match="VTOKEN_KEEP is not"):
        vconfig.from_env({"VTOKEN_METHOD": "divprune"})
    with pytest.raises(PruningConfigError, match="not a vtoken method"):
        vconfig.from_env({"VTOKEN_METHOD": "nope", "VTOKEN_KEEP": "0.5"})
    with pytest.raises(PruningConfigError):
        vconfig.from_env({"VTOKEN_METHOD": "divprune", "VTOKEN_KEEP": "1.5"})
    with pytest.raises(PruningConfigError, match="signals the vLLM plugin does not capture"):
        vconfig.from_env({"VTOKEN_METHOD": "cdpruner", "VTOKEN_KEEP": "64"})  # text-guided


def test_model_specific_refusals_match_apply_pruning():
    """Encoder attention only where the model has the probe (Qwen2-VL, LLaVA; not Qwen2.5-VL's
    windowed tower), [CLS] attention only where the tower has [CLS] (LLaVA's CLIP); hidden-state
    methods everywhere."""
    stage = lambda m: vconfig.make_config(m, 64).stage  # noqa: E731
    why = vconfig.model_unsupported_reason
    assert why(stage("visionzip"), "Qwen2VL", vision_probe=True, cls_attention=False) is None
    assert why(stage("fastervlm"), "Qwen2VL", vision_probe=True, cls_attention=False) is None
    assert "vision-encoder attention" in why(stage("visionzip"), "Qwen2_5_VL", vision_probe=False, cls_attention=False)
    assert "[CLS]" in why(stage("prunesid"), "Qwen2VL", vision_probe=True, cls_attention=False)
    assert why(stage("divprune"), "Qwen2_5_VL", vision_probe=False, cls_attention=False) is None
    assert why(stage("prunesid"), "Llava", vision_probe=True, cls_attention=True) is None


def test_kept_tokens_get_their_unpruned_positions():
    """Layout with the kept tokens at the image start, plus their grid offsets, equals the
    unpruned layout gathered at the kept tokens; text keeps its unpruned positions."""
    import torch

    t, h, w, before, after = 1, 4, 6, 5, 3
    n = t * h * w
    full, full_delta = pruned_mrope_positions(before + n + after, [(before, n, t, h, w, 1.0)])
    kept = torch.tensor([0, 5, 7, 13, 22])
    pruned, delta = pruned_mrope_positions(before + len(kept) + after, [(before, len(kept), t, h, w, 1.0)])
    pruned[:, before:before + len(kept)] += grid_offsets(kept, (t, h, w)).T
    expect = torch.cat([full[:, :before], full[:, before + kept], full[:, before + n:]], dim=1)
    assert torch.equal(pruned, expect)
    # decoding continues where the unpruned prompt would: position = length + delta
    assert before + len(kept) + after + delta == before + n + after + full_delta


def test_llava_kept_tokens_get_their_unpruned_1d_positions():
    """LLaVA (1-D RoPE) on the M-RoPE path: three equal rows; kept tokens at their unpruned
    positions, text after the image and decoding (length + delta) as without pruning."""
    import torch

    n, before, after = 12, 4, 3
    full, full_delta = pruned_1d_positions(before + n + after, [(before, n, n)])
    assert torch.equal(full, torch.arange(before + n + after).expand(3, -1)) and full_delta == 0
    kept = torch.tensor([1, 2, 8, 11])
    pruned, delta = pruned_1d_positions(before + len(kept) + after, [(before, len(kept), n)])
    pruned[:, before:before + len(kept)] += index_offsets(kept).T
    expect = torch.cat([full[:, :before], full[:, before + kept], full[:, before + n:]], dim=1)
    assert torch.equal(pruned, expect) and torch.equal(pruned[0], pruned[1]) and torch.equal(pruned[0], pruned[2])
    assert before + len(kept) + after + delta == before + n + after
    # two images, the second whole: each run keeps its own start
    two, _ = pruned_1d_positions(2 + 2 + 1 + n + 1, [(2, 2, n), (5, n, n)])
    assert two[0].tolist() == [0, 1, 2, 2, 2 + n] + list(range(3 + n, 3 + 2 * n)) + [3 + 2 * n]


def _forward_positions(layout, media, runs):
    """The positions the plugin's forward sees: the request's layout plus, on each image's run of
    placeholders, :func:`run_offsets` (what ``_vtoken_prune`` attaches and ``forward`` adds)."""
    num_tokens, offsets_of = layout
    fn = pruned_mrope_positions if offsets_of is grid_offsets else pruned_1d_positions
    pos, delta = fn(num_tokens, media)
    for start, kept, n, grid in runs:
        pos[:, start:start + len(kept)] += run_offsets(kept, n, grid, offsets_of).T
    return pos, delta


def test_an_image_keeping_every_token_gets_the_unpruned_positions():
    """keep=1.0, an int keep >= the image's tokens (LLaVA's 576, a small Qwen image under an int
    budget): the run is laid out whole, and no offset is added on top (it used to be added again,
    doubling each token's position within its image)."""
    import torch

    from vtoken.plan import tokens_for

    # LLaVA, n = 4 tokens, 2 text tokens before and 1 after: positions 0..6 exactly as unpruned
    n = 4
    for keep in (1.0, 576, 10_000):
        k = tokens_for(keep, n)
        assert k == n
        pos, delta = _forward_positions((2 + k + 1, index_offsets), [(2, k, n)], [(2, torch.arange(k), n, (1, 2, 2))])
        assert pos[0].tolist() == list(range(7)) and delta == 0
        assert torch.equal(pos, torch.arange(7).expand(3, -1))
    # Qwen2-VL, a 1x2x2 grid under an int budget of 64: Qwen2-VL's own (t, h, w) rows
    t, h, w, before, after = 1, 2, 2, 2, 2
    n = t * h * w
    k = tokens_for(64, n)
    pos, delta = _forward_positions((before + k + after, grid_offsets), [(before, k, t, h, w, 1.0)],
                                    [(before, torch.arange(k), n, (t, h, w))])
    img = pos[:, before:before + k]
    assert img[0].tolist() == [2, 2, 2, 2] and img[1].tolist() == [2, 2, 3, 3] and img[2].tolist() == [2, 3, 2, 3]
    assert pos[:, before + k:].tolist() == [[4, 5]] * 3 and delta == -2
    # a pruned image beside a whole one: each run follows its own layout
    kept = torch.tensor([1, 3])
    media = [(1, 2, 1, 2, 2, 1.0), (4, 4, 1, 2, 2, 1.0)]
    pos, _ = _forward_positions((9, grid_offsets), media, [(1, kept, 4, (1, 2, 2)), (4, torch.arange(4), 4, (1, 2, 2))])
    full, _ = pruned_mrope_positions(11, [(1, 4, 1, 2, 2, 1.0), (6, 4, 1, 2, 2, 1.0)])
    expect = torch.cat([full[:, :1], full[:, 1 + kept], full[:, 5:]], dim=1)
    assert torch.equal(pos, expect)


def test_offsets_survive_bfloat16_in_two_channels():
    """LLaVA's offsets reach 575, past bfloat16's exact integers (256): 575 itself rounds to 576
    there. Packed as high and low base-256 digits they come back exact from any float dtype."""
    import torch

    kept = torch.tensor([0, 255, 256, 257, 300, 511, 574, 575])
    assert int(index_offsets(kept).to(torch.bfloat16).long()[-1, 0]) == 576  # one channel: off by one
    for offsets in (index_offsets(kept), grid_offsets(kept, (1, 24, 24)), torch.tensor([[65535, 0, 1]])):
        packed = pack_offsets(offsets)
        assert packed.shape == (offsets.shape[0], 6) and int(packed.max()) < 256 and int(packed.min()) >= 0
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert torch.equal(unpack_offsets(packed.to(dtype)), offsets)
    with pytest.raises(PruningConfigError):
        pack_offsets(torch.tensor([[65536, 0, 0]]))


def test_llava_mrope_override_covers_the_rotary_half():
    from types import SimpleNamespace

    text = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, head_dim=32, hidden_size=256,
                           num_attention_heads=8)
    params = llava_mrope_override(text)["text_config"]["rope_parameters"]
    assert params["rope_theta"] == 1e6 and sum(params["mrope_section"]) == 16 and min(params["mrope_section"]) > 0
    assert text.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}  # the config is not modified


# --- the engine ----------------------------------------------------------------------------------

def _require_vllm():
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken dependency of it
        if os.environ.get("VTOKEN_REQUIRE_VLLM") == "1":
            pytest.fail(f"vllm is required here (VTOKEN_REQUIRE_VLLM=1) but does not import: {exc!r}")
        pytest.skip(f"vLLM is not importable ({type(exc).__name__}: {exc}); run this file in the engine venv "
                    "built by benchmarks/vllm/build_env.sh")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    import numpy as np

    from vtoken.data.synthetic import make_scene, render

    path = tmp_path_factory.mktemp("img") / "scene.png"
    render(make_scene(np.random.default_rng(0), "test")).save(path)
    return path


@pytest.fixture(scope="module")
def noise_image_path(tmp_path_factory):
    """A random-pixel image: on the tiny LLaVA the synthetic scene's flat background gives DivPrune
    near-ties that 1e-5 relative noise in the features flips (2 of 5 draws, measured), so the kept
    sets of two float32 engines need an image without them (0 of 5 flips here)."""
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("noise") / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (336, 336, 3), dtype=np.uint8)).save(path)
    return path


def tiny_qwen2_5_vl(path: Path) -> Path:
    """A random-weight Qwen2.5-VL checkpoint (window attention in the vision tower, 2 layers) with the
    built-in tiny-qwen2vl's tokenizer and image processor; the CPU engine needs head_dim 32."""
    import shutil

    import torch
    import transformers as T

    from vtoken import zoo

    src = Path(zoo.resolve("vtoken/tiny-qwen2vl"))
    base = json.loads((src / "config.json").read_text())
    ids = {k: base[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    torch.manual_seed(0)
    text = dict(vocab_size=base["text_config"]["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
                eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0})
    vision = dict(depth=2, hidden_size=32, out_hidden_size=128, intermediate_size=64, num_heads=4, patch_size=7,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=56, fullatt_block_indexes=[1])
    cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                             tie_word_embeddings=False, **ids)
    model = T.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger weights than the init's: logits far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / f, path / f)
    proc = json.loads((src / "processor_config.json").read_text())
    proc["processor_class"] = "Qwen2_5_VLProcessor"
    (path / "processor_config.json").write_text(json.dumps(proc, indent=2))
    return path


_CHECKPOINTS: dict = {}


def _checkpoint(name, tmp_path_factory) -> str:
    """Folder of ``name``: the built-in tiny Qwen2-VL, or the random tiny Qwen2.5-VL (made once)."""
    from vtoken import zoo

    if name not in _CHECKPOINTS:
        _CHECKPOINTS[name] = (zoo.resolve({"qwen2vl": "vtoken/tiny-qwen2vl", "llava": "vtoken/tiny-llava"}[name])
                              if name in ("qwen2vl", "llava")
                              else str(tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2_5_vl"))))
    return _CHECKPOINTS[name]


def _llava_overrides(model) -> list:
    """generate.py's --hf-overrides for a LLaVA folder (the plugin runs LLaVA on vLLM's M-RoPE path)."""
    from types import SimpleNamespace

    cfg = json.loads((Path(model) / "config.json").read_text())
    if cfg.get("model_type") != "llava":
        return []
    return ["--hf-overrides", json.dumps(llava_mrope_override(SimpleNamespace(**cfg["text_config"])))]


def _run_vllm(env_extra: dict, image, tmp: Path, check=True, model="vtoken/tiny-qwen2vl", extra=()):
    out, trace = tmp / "out.json", tmp / "trace.jsonl"
    env = {**os.environ, **env_extra, "VTOKEN_VLLM_TRACE": str(trace)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vllm" / "generate.py"), "--model", str(model),
         "--image", str(image), "--question", QUESTION,
         "--max-tokens", str(MAX_NEW), "--logprobs", "3", "--out", str(out), *extra],
        env=env, cwd=str(tmp), capture_output=True, text=True, timeout=900,
    )
    if not check:
        return proc
    assert proc.returncode == 0, f"vLLM run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    traced = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    return json.loads(out.read_text())["outputs"][0], traced


_OFFLINE: dict = {}


def _offline(model, method, keep, image, tmp_path_factory):
    """vLLM's offline result for (model folder, method, keep), run once per session."""
    if (model, method, keep) not in _OFFLINE:
        _OFFLINE[model, method, keep] = _run_vllm({"VTOKEN_METHOD": method, "VTOKEN_KEEP": str(keep)}, image,
                                                  tmp_path_factory.mktemp(f"vllm-{method}"), model=model,
                                                  extra=_llava_overrides(model))
    return _OFFLINE[model, method, keep]


def _hf_model(name, path):
    """(model, processor) in float32: the built-in through vtoken.zoo, the random one through Auto*."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vtoken import zoo

    if name in ("qwen2vl", "llava"):
        return zoo.load(path)
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(path)


def _hf_pruned(hf_model, image, method, keep):
    import torch
    from PIL import Image

    from vtoken import apply_pruning, zoo

    model, processor = hf_model
    inputs = processor(images=[Image.open(image).convert("RGB")], text=[zoo.build_prompt(zoo.arch_of(model), QUESTION)],
                       return_tensors="pt")
    seen = []  # the first decoder layer's input after vtoken's own pre-hook (registered first) pruned it
    if method is None:  # unpruned
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
        return {"tokens": out.sequences[0, inputs["input_ids"].shape[1]:].tolist(),
                "first_logprobs": torch.log_softmax(out.scores[0][0].float(), dim=-1),
                "prompt_tokens": int(inputs["input_ids"].shape[1])}
    with apply_pruning(model, method=method, keep=keep) as handle, torch.inference_mode():
        undo = handle.runtime.adapter.layers[0].register_forward_pre_hook(
            lambda mod, args, kw: seen.append(kw.get("hidden_states", args[0] if args else None)), with_kwargs=True)
        try:
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
        finally:
            undo.remove()
        kept = handle.stats.stages[0].kept[0].tolist()
    ids = inputs["input_ids"][0]
    start = int((ids == model.config.image_token_id).nonzero()[0])
    rows = seen[0][0, start:start + len(kept)]  # the prompt's visual rows entering the LLM (batch of one)
    new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    first = torch.log_softmax(out.scores[0][0].float(), dim=-1)
    return {"kept": kept, "tokens": new, "first_logprobs": first, "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "norms": rows.float().norm(dim=1),
            "grid": _merged_grid(model, inputs)}


def _merged_grid(model, inputs) -> list:
    """(t, h, w) of the image's LLM tokens: Qwen's grid over merge size, LLaVA's square patch grid."""
    if "image_grid_thw" in inputs:
        t, h, w = (int(x) for x in inputs["image_grid_thw"][0])
        m = model.config.vision_config.spatial_merge_size
        return [t, h // m, w // m]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    return [1, side, side]


def _assert_same_answer(vllm_out, hf):
    """vLLM's greedy tokens equal transformers' and its first token's top log-probs agree to 1e-3."""
    got = vllm_out["token_ids"]
    assert got == hf["tokens"][: len(got)], f"greedy outputs differ: vLLM {got}, transformers {hf['tokens']}"
    for tok, lp in vllm_out["logprobs"][0].items():
        assert abs(lp - float(hf["first_logprobs"][int(tok)])) < 1e-3, (tok, lp, float(hf["first_logprobs"][int(tok)]))


@pytest.mark.slow
@pytest.mark.parametrize("name,method,keep", [("qwen2vl", "divprune", 0.25), ("qwen2vl", "uniform", 0.11),
                                              ("qwen2vl", "random", 64), ("qwen2_5_vl", "divprune", 0.25),
                                              ("qwen2vl", "fastervlm", 0.25), ("qwen2vl", "visionzip", 0.11),
                                              ("llava", "divprune", 0.25), ("llava", "uniform", 0.11),
                                              ("llava", "fastervlm", 0.25), ("llava", "visionzip", 0.11)])
def test_vllm_keeps_what_apply_pruning_keeps(name, method, keep, image_path, noise_image_path, tmp_path_factory):
    _require_vllm()
    if name in ("llava", "qwen2_5_vl"):
        # the random-weight tiny Qwen2.5-VL and the tiny LLaVA: DivPrune meets near-ties on the flat
        # synthetic scene, which two float32 engines may break differently; a noise image has none
        image_path = noise_image_path
    import torch

    from vtoken.plan import tokens_for

    path = _checkpoint(name, tmp_path_factory)
    vllm_out, traced = _offline(path, method, keep, image_path, tmp_path_factory)
    hf = _hf_pruned(_hf_model(name, path), image_path, method, keep)
    n = hf["grid"][0] * hf["grid"][1] * hf["grid"][2]
    k = tokens_for(keep, n)
    # the request's image went through the plugin last (earlier lines: vLLM's start-up profiling)
    assert traced and traced[-1]["method"] == method and traced[-1]["grid"] == hf["grid"]
    assert len(hf["kept"]) == k
    assert traced[-1]["kept"] == hf["kept"], "vLLM's plugin kept other tokens than apply_pruning"
    # the rows entering the LLM: the kept embeddings (VisionZip: its contextual tokens merged) as
    # apply_pruning's layer-0 input; a missing merge moves the merged rows' norms by far more
    assert torch.allclose(torch.tensor(traced[-1]["norms"]), hf["norms"], rtol=1e-4, atol=1e-5), "rows entering the LLM differ"
    assert vllm_out["prompt_tokens"] == hf["prompt_tokens"] - (n - k), "placeholders not sized to the kept tokens"
    _assert_same_answer(vllm_out, hf)


@pytest.mark.slow
@pytest.mark.parametrize("name,keep", [("qwen2vl", 4096), ("llava", 1.0)])
def test_vllm_keeping_every_token_answers_as_the_unpruned_model(name, keep, image_path, tmp_path_factory):
    """An image that keeps all its tokens (an int budget above its token count, keep=1.0) goes
    through the plugin at its unpruned positions: vLLM's greedy tokens and first-token log-probs
    equal the unpruned transformers model's (float32). Positions added twice (the run laid out
    whole plus the grid offsets) move the first log-probs far past 1e-3."""
    _require_vllm()
    path = _checkpoint(name, tmp_path_factory)
    vllm_out, traced = _offline(path, "divprune", keep, image_path, tmp_path_factory)
    hf = _hf_pruned(_hf_model(name, path), image_path, None, None)
    assert traced and len(traced[-1]["kept"]) == traced[-1]["grid"][0] * traced[-1]["grid"][1] * traced[-1]["grid"][2]
    assert vllm_out["prompt_tokens"] == hf["prompt_tokens"]
    _assert_same_answer(vllm_out, hf)


@pytest.mark.slow
def test_llava_serves_in_bfloat16(noise_image_path, tmp_path, tmp_path_factory):
    """LLaVA's offsets (up to 575) are not exact in bfloat16; carried as two base-256 digits
    (pack_offsets) they are, and the plugin serves a bfloat16 LLaVA (it used to refuse every image)."""
    _require_vllm()
    from vtoken.plan import tokens_for

    path = _checkpoint("llava", tmp_path_factory)
    out, traced = _run_vllm({"VTOKEN_METHOD": "uniform", "VTOKEN_KEEP": "0.25"}, noise_image_path, tmp_path, model=path,
                            extra=[*_llava_overrides(path), "--dtype", "bfloat16"])
    grid = traced[-1]["grid"]
    n = grid[0] * grid[1] * grid[2]
    assert len(traced[-1]["kept"]) == tokens_for(0.25, n) and max(traced[-1]["kept"]) > 256
    hf = _hf_pruned(_hf_model("llava", path), noise_image_path, None, None)
    assert out["prompt_tokens"] == hf["prompt_tokens"] - (n - tokens_for(0.25, n)) and out["token_ids"]


@pytest.mark.slow
def test_shipped_tiny_llava_serves_in_stock_vllm(image_path, tmp_path):
    """Without the plugin: vLLM's own LlavaForConditionalGeneration loads the shipped checkpoint (its
    CLIP tower in the portable layout) and answers as transformers does."""
    _require_vllm()
    env = {k: "" for k in ("VTOKEN_METHOD", "VTOKEN_KEEP")}
    path = _checkpoint("llava", None)
    out, traced = _run_vllm(env, image_path, tmp_path, model=path)
    hf = _hf_pruned(_hf_model("llava", path), image_path, None, None)
    assert not traced and out["prompt_tokens"] == hf["prompt_tokens"]
    assert out["token_ids"] == hf["tokens"][: len(out["token_ids"])]
    for tok, lp in out["logprobs"][0].items():
        assert abs(lp - float(hf["first_logprobs"][int(tok)])) < 1e-3


@pytest.mark.slow
def test_in_llm_method_stops_the_engine_with_the_reason(image_path, tmp_path):
    _require_vllm()
    proc = _run_vllm({"VTOKEN_METHOD": "fastv", "VTOKEN_KEEP": "64"}, image_path, tmp_path, check=False)
    assert proc.returncode != 0
    assert "cannot run in vLLM" in proc.stderr and "paged KV cache" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_vllm_serve_with_the_plugin_answers_as_the_offline_engine(image_path, tmp_path, tmp_path_factory):
    """The README's `vllm serve` command (chat template of the tiny checkpoint) and client."""
    _require_vllm()
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from vtoken import zoo

    env = {**os.environ, "VTOKEN_METHOD": "divprune", "VTOKEN_KEEP": "0.25"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "vllm"), "serve", zoo.resolve("vtoken/tiny-qwen2vl"), "--dtype", "float32",
         "--enforce-eager", "--max-model-len", "2048", "--gpu-memory-utilization", "0.1", "--port", str(port),
         "--chat-template", str(ROOT / "benchmarks" / "vllm" / "tiny_chat_template.jinja")],
        env=env, cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert server.poll() is None, "vllm serve exited:\n" + (tmp_path / "serve.log").read_text()[-6000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                time.sleep(2)
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vllm" / "ask_server.py"), "--url",
                               f"http://127.0.0.1:{port}", "--image", str(image_path), "--question", QUESTION,
                               "--max-tokens", str(MAX_NEW)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        served = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    offline, _ = _offline(_checkpoint("qwen2vl", tmp_path_factory), "divprune", 0.25, image_path, tmp_path_factory)
    assert served["prompt_tokens"] == offline["prompt_tokens"]
    assert served["answer"] == offline["text"]
