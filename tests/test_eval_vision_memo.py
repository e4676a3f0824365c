"""vtoken eval's vision-feature memo (vtoken.eval.vision_memo): a batch's vision tower runs once for
all the methods that leave the tower alone, and the answers and token counts are those of a run that
computes it every time."""

import pytest
import torch

from vtoken.adapters import get_adapter
from vtoken.eval.backend import load_backend
from vtoken.eval.loaders import load_dataset
from vtoken.eval.vision_memo import VisionMemo

CONFIGS = [("none", None), ("fastv", 0.25), ("divprune", 0.25), ("fastv", 0.5), ("visionzip", 0.25)]


def _answers(backend, samples):
    tower = get_adapter(backend.model).vision_tower
    runs = []
    hook = tower.register_forward_hook(lambda *a: runs.append(1))
    out = []
    try:
        for method, keep in CONFIGS:
            with backend.configure(method, keep):
                for batch in (samples[:3], samples[3:]):
                    r = backend.generate([s.image for s in batch], [s.question for s in batch])
                    out.append((method, keep, r.predictions, r.kept_tokens, r.timing["vision_reused"]))
    finally:
        hook.remove()
    return out, len(runs)


@pytest.mark.parametrize("model", ["vtoken/tiny-llava", "vtoken/tiny-qwen2vl"])
def test_reused_features_give_the_same_answers_with_one_tower_run_per_batch(model):
    samples = load_dataset("synthetic", limit=6).samples
    plain = load_backend(model, device="cpu", memo_inputs=True, reuse_vision=False)
    want, runs_plain = _answers(plain, samples)
    memo = load_backend(model, device="cpu", memo_inputs=True, reuse_vision=True)
    got, runs_memo = _answers(memo, samples)
    assert [g[:4] for g in got] == [w[:4] for w in want]
    assert runs_plain == 2 * len(CONFIGS)
    reads_encoder = get_adapter(memo.model).vision_attention_module() is not None  # visionzip runs on it
    # per batch: the plain model once, the pruned tower once (fastv, divprune, fastv again), visionzip
    # (it reads the encoder's attention: its probes need the tower to run) every time
    assert runs_memo == 2 * (2 + (1 if reads_encoder else 0))
    assert [g[4] for g in got] == [m in ("divprune",) or (m == "fastv" and k == 0.5) for m, k, *_ in got]
    memo.close()
    assert all(name not in vars(get_adapter(memo.model).multimodal_model)
               for name in ("get_image_features", "get_video_features"))


def test_memo_keys_calls_by_their_arguments_and_drops_beyond_its_bytes():
    class Tower(torch.nn.Module):
        calls = 0

        def get_image_features(self, pixel_values, grid):
            Tower.calls += 1
            return pixel_values * 2

    model = Tower()
    memo = VisionMemo(model, max_bytes=3 * 16)  # three 2x2 float32 outputs
    x, grid = torch.ones(2, 2), torch.tensor([[1, 2, 2]])
    assert torch.equal(model.get_image_features(x, grid), 2 * x) and Tower.calls == 1  # no key: computed
    model.get_image_features(x, grid)
    assert Tower.calls == 2 and memo.hits == 0
    with torch.no_grad():  # inference only, as vtoken eval answers
        memo.key = ("batch", 0)
        first = model.get_image_features(x, grid)
        assert model.get_image_features(x.clone(), grid) is first and Tower.calls == 3  # same key and arguments
        model.get_image_features(x, torch.tensor([[1, 1, 4]]))  # another grid: another entry
        model.get_image_features(x.double(), grid)  # another dtype: 32 more bytes, past the 48 kept ...
        assert Tower.calls == 5 and memo.hits == 1
        model.get_image_features(x, grid)  # ... so the oldest entry (the first) was dropped
        assert Tower.calls == 6
        model.get_image_features(x.double(), grid)
        assert Tower.calls == 6 and memo.hits == 2
    model.get_image_features(x, grid)  # never with gradients
    assert Tower.calls == 7
    memo.remove()
    assert "get_image_features" not in vars(model)


def test_memo_holds_nothing_on_a_card_that_is_short(monkeypatch):
    """Shards sharing one GPU: an output is stored only while its card has 1/8 of its memory free
    (the driver's count, every process on the card included); otherwise the memo drops what it holds."""
    from vtoken.eval import vision_memo

    out = {"features": torch.ones(2, 2)}
    assert vision_memo.card_has_room(out, mem_get_info=lambda d: (0, 1))  # no CUDA tensor: always
    monkeypatch.setattr(vision_memo, "_first_cuda_device", lambda value: torch.device("cuda", 0))
    assert not vision_memo.card_has_room(out, mem_get_info=lambda d: (9 << 30, 80 << 30))
    assert vision_memo.card_has_room(out, mem_get_info=lambda d: (10 << 30, 80 << 30))

    class Tower(torch.nn.Module):
        calls = 0

        def get_image_features(self, pixel_values):
            Tower.calls += 1
            return pixel_values * 2

    model, room = Tower(), [True]
    monkeypatch.setattr(vision_memo, "card_has_room", lambda value: room[0])
    memo = VisionMemo(model)
    x = torch.ones(2, 2)
    with torch.no_grad():
        memo.key = ("batch", 0)
        model.get_image_features(x)
        model.get_image_features(x)
        assert Tower.calls == 1 and memo.hits == 1
        room[0] = False
        model.get_image_features(x.double())  # computed; the card is short: nothing kept, the first dropped
        model.get_image_features(x)
        assert Tower.calls == 3 and memo.hits == 1
    memo.remove()


def test_a_video_batch_is_recognised_by_its_frames():
    """The runner opens a video's frames anew for every batch (a new list each time): the memo
    still finds the batch, and the answers are those computed afresh."""
    from vtoken.eval.files import open_image

    samples = load_dataset("synthetic-video", limit=3).samples
    got = {}
    for reuse in (False, True):
        backend = load_backend("vtoken/tiny-qwen2vl-video", device="cpu", memo_inputs=True, reuse_vision=reuse)
        tower = get_adapter(backend.model).vision_tower
        runs = []
        hook = tower.register_forward_hook(lambda *a: runs.append(1))
        answers = []
        for method in ("fastv", "divprune", "random"):
            with backend.configure(method, 0.25):
                answers.append(backend.generate([open_image(s.image) for s in samples],
                                                [s.question for s in samples]).predictions)
        hook.remove()
        backend.close()
        got[reuse] = (answers, len(runs))
    assert got[True][0] == got[False][0]
    assert (got[False][1], got[True][1]) == (3, 1)


def test_images_read_from_paths_reach_every_configuration_as_the_same_objects(tmp_path):
    """The runner keeps what it opened: a data set read from files hands the backend the same image
    objects for every method and budget, so the processor and vision memos (keyed by identity) find
    the batch again."""
    from PIL import Image
    from test_eval_runner import FakeBackend, config

    from vtoken.eval.runner import run_eval
    from vtoken.eval.samples import EvalDataset, Sample

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (6, 6), (40 * i, 0, 0)).save(paths[-1])
    ds = EvalDataset("Files", "vqav2", "vqa", "files",
                     [Sample(f"f{i}", f"q {i}|a", ["a"] * 10, str(p)) for i, p in enumerate(paths)])
    seen = {}

    class Recording(FakeBackend):
        def generate(self, images, questions):
            for im, q in zip(images, questions):
                seen.setdefault(q, set()).add(id(im))
            return super().generate(images, questions)

    run_eval(config(tmp_path, methods=["fastv", "random"], keeps=[64, 32], batch_size=2), backend=Recording(),
             datasets=[ds])
    assert len(seen) == 5 and all(len(ids) == 1 for ids in seen.values())  # 5 configurations, one object each
