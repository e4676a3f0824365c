"""Pre-training self-checks of :mod:`vtoken.zoo.train`.

:func:`check_pipeline` compares the training pixel pipeline and tokenisation with the saved
processor; :func:`check_packed_turns` compares packed training turns with the same turns run one
by one (the installed ``transformers``' handling of custom 4-D masks and explicit positions).
"""

from __future__ import annotations

import numpy as np
import torch

from vtoken.data import synthetic
from vtoken.zoo import build
from vtoken.zoo.train_data import _collate, _resize_like_processor, _Stream
from vtoken.zoo.train_inputs import PixelPipeline, fast_patch_embed, model_inputs, qwen_position_template


def check_pipeline(arch: str, processor, n: int = 3) -> float:
    """Max |difference| between the training pipeline and the processor on a few images.

    Also asserts that the first training turn is the processor's tokenisation of the inference
    prompt (and, for Qwen2-VL, that the fast patch embedding equals the Conv3d one).
    """
    recs = synthetic.make_split("test", n, seed=123)
    imgs = [r["image"] for r in recs]
    try:
        from vtoken.data import easy_vqa

        imgs.append(easy_vqa.load_easy_vqa("test", limit=1)[0]["image"])
    except ImportError:
        pass
    ref = processor.image_processor(images=imgs, return_tensors="pt")
    arr = torch.from_numpy(np.stack([np.asarray(_resize_like_processor(im, arch)) for im in imgs]))
    mine = PixelPipeline(processor, arch)(arr)
    err = (mine["pixel_values"] - ref["pixel_values"]).abs().max().item()
    if arch == "qwen2vl":
        assert torch.equal(mine["image_grid_thw"].cpu(), ref["image_grid_thw"]), (mine["image_grid_thw"], ref["image_grid_thw"])
    # token ids: the first turn must equal the processor's tokenisation of the inference prompt
    stream = _Stream(arch, 0, 1, 0.0)
    stream._setup()
    assert stream.encode([("what column is the red object in?", "3", "column")])[0].count(
        processor.tokenizer.unk_token_id) == 0, "auxiliary question words missing from the vocabulary"
    q, a = recs[0]["question"], recs[0]["answer"]
    ids = stream.encode([(q, a, "x")])[0]
    pin = processor(images=[recs[0]["image"]], text=[build.prompt(arch, q)], return_tensors="pt")
    ref_ids = pin["input_ids"][0].tolist()
    assert ids[: len(ref_ids)] == ref_ids, "training tokenisation differs from the processor's"
    if arch == "qwen2vl":
        tid = processor.tokenizer.convert_tokens_to_ids(build.QWEN_IMAGE_PAD)
        mm = (torch.tensor([ref_ids]) == tid).long()
        assert torch.equal(mm, pin["mm_token_type_ids"].long()), "mm_token_type_ids differ"
        model = build.build_model(arch, processor.tokenizer).eval()
        px = PixelPipeline(processor, arch)(arr[:2])["pixel_values"]
        with torch.no_grad():
            ref_emb = model.model.visual.patch_embed(px)
            fast_patch_embed(model)
            err = max(err, (model.model.visual.patch_embed(px) - ref_emb).abs().max().item())
    return err


@torch.no_grad()
def check_packed_turns(arch: str, processor, n_images: int = 2, turns: int = 2, video: bool = False) -> float:
    """Max |logit difference| between packed training turns and the same turns run one by one.

    A random model of ``arch`` runs ``n_images`` packed sequences of ``turns`` turns through the
    training path (device-side pixels, :func:`packed_attention_mask`, explicit positions /
    M-RoPE template) and every turn as its own right-padded sequence through the model's default
    path (processor pixels, 2-D attention mask, positions computed by the model). Exercises the
    installed ``transformers``' handling of custom 4-D masks and explicit positions.
    ``video=True`` (Qwen2-VL): the same with :mod:`vtoken.data.synthetic_video` clips (the video
    M-RoPE template of :func:`qwen_position_template` against the model's own video positions).
    """
    from vtoken.data import synthetic_video

    data = synthetic_video if video else synthetic
    recs = data.make_split("test", n_images, seed=321)
    tok = processor.tokenizer
    model = build.build_model(arch, tok).eval()
    stream = _Stream(arch, 0, turns, 0.0, video=video)
    stream._setup()
    pixels = PixelPipeline(processor, arch)
    image_token_id = model.config.video_token_id if video else model.config.image_token_id
    tpl = qwen_position_template(model, stream) if arch == "qwen2vl" else None
    rng = np.random.default_rng(0)
    packed_items, singles = [], []
    for r in recs:
        if video:
            img = np.stack([np.asarray(f, dtype=np.uint8) for f in r["video"]])
            qas = synthetic_video.make_questions(r["clip"], rng, turns)
            visual = r["video"]
        else:
            img = np.asarray(_resize_like_processor(r["image"], arch), dtype=np.uint8)
            qas = synthetic.make_questions(r["scene"], rng, turns)
            visual = r["image"]
        packed_items.append((img,) + tuple(np.asarray(x, np.int64) for x in stream.encode(qas)))
        singles += [(visual, stream.encode([qa])[0]) for qa in qas]
    imgs, ids, _, seg, pos = _collate(packed_items, pad_id=tok.pad_token_id)
    out = model(**model_inputs(arch, pixels, imgs, ids, seg, pos, image_token_id, tpl, packed=True), use_cache=False).logits
    L = max(len(x) for _, x in singles)
    s_ids = torch.full((len(singles), L), tok.pad_token_id, dtype=torch.long)
    s_mask = torch.zeros((len(singles), L), dtype=torch.long)
    for i, (_, x) in enumerate(singles):
        s_ids[i, : len(x)] = torch.tensor(x)
        s_mask[i, : len(x)] = 1
    if video:
        ref_in = dict(PixelPipeline(processor, arch)(torch.from_numpy(np.stack(
            [np.stack([np.asarray(f, dtype=np.uint8) for f in v]) for v, _ in singles]))))
    else:
        ref_in = dict(processor.image_processor(images=[im for im, _ in singles], return_tensors="pt"))
    ref_in.update(input_ids=s_ids, attention_mask=s_mask)
    if arch == "qwen2vl":
        ref_in["mm_token_type_ids"] = (s_ids == image_token_id).long() * (2 if video else 1)
    ref = model(**ref_in, use_cache=False).logits
    P = len(stream.prefix)
    err, k = 0.0, 0
    for b in range(len(recs)):
        for t in range(turns):
            cols = (seg[b] == t + 1).nonzero().flatten()
            n_tok = len(singles[k][1]) - P
            assert len(cols) == n_tok, (len(cols), n_tok)
            err = max(err, (out[b, cols] - ref[k, P : P + n_tok]).abs().max().item())
            err = max(err, (out[b, :P] - ref[k, :P]).abs().max().item())
            k += 1
    return err


def check_video_pipeline(processor, n: int = 2) -> float:
    """Max |difference| between the training pixels of ``n`` synthetic clips and the processor's
    ``videos=`` path (the stock ``Qwen2VLVideoProcessor`` where torchvision is installed, else
    :class:`vtoken.zoo.processing.Qwen2VLImageOnlyProcessor`'s); also asserts that the grids and
    the first training turn's token ids (and ``mm_token_type_ids``) are the processor's."""
    from vtoken.data import synthetic_video

    recs = synthetic_video.make_split("test", n, seed=123)
    arr = torch.from_numpy(np.stack([np.stack([np.asarray(f, dtype=np.uint8) for f in r["video"]]) for r in recs]))
    mine = PixelPipeline(processor, "qwen2vl")(arr)
    stream = _Stream("qwen2vl", 0, 1, 0.0, video=True)
    stream._setup()
    err = 0.0
    for i, r in enumerate(recs):
        ref = processor(videos=[r["video"]], text=[build.prompt("qwen2vl", r["question"], video=True)],
                        return_tensors="pt")
        rows = slice(i * len(ref["pixel_values_videos"]), (i + 1) * len(ref["pixel_values_videos"]))
        err = max(err, (mine["pixel_values_videos"][rows] - ref["pixel_values_videos"]).abs().max().item())
        assert torch.equal(mine["video_grid_thw"][i : i + 1].cpu(), ref["video_grid_thw"]), "video grids differ"
        ref_ids = ref["input_ids"][0].tolist()
        ids = stream.encode([(r["question"], r["answer"], r["qtype"])])[0]
        assert ids[: len(ref_ids)] == ref_ids, "training tokenisation of a video prompt differs from the processor's"
        assert ids.count(processor.tokenizer.unk_token_id) == 0, "video question words missing from the vocabulary"
        mm = (torch.tensor([ref_ids]) == stream.image_token_id).long() * 2
        assert torch.equal(mm, ref["mm_token_type_ids"].long()), "video mm_token_type_ids differ"
    return err
