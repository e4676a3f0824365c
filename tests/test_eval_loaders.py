"""Loaders of vtoken.eval on small fixture files written in each benchmark's official layout."""

import json

import pytest
from PIL import Image

from vtoken.eval.loaders import (
    DataError,
    load_dataset,
    open_image,
    parse_data_spec,
    split_data_args,
)


def png(path, color=(200, 30, 30), size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_parse_spec_and_split():
    s = parse_data_spec("pope:/data/pope?images=/x/val2014&name=POPE-r")
    assert s.kind == "pope" and s.path == "/data/pope" and s.options == {"images": "/x/val2014", "name": "POPE-r"}
    assert parse_data_spec("easy_vqa").kind == "easy-vqa"
    assert parse_data_spec("synthetic").path is None
    with pytest.raises(DataError, match="needs a path"):
        parse_data_spec("gqa")
    with pytest.raises(DataError, match="unknown data set"):
        parse_data_spec("imagenet:/x")
    assert split_data_args(["synthetic,easy-vqa", "gqa:/a,b/c"]) == ["synthetic", "easy-vqa", "gqa:/a,b/c"]


def test_vqav2_layout(tmp_path):
    root = tmp_path / "vqav2"
    qs = {"questions": [
        {"question_id": 10, "image_id": 42, "question": "What color is the bus?"},
        {"question_id": 11, "image_id": 43, "question": "How many dogs?"},
        {"question_id": 12, "question": "broken: no image id"},
        {"question_id": 13, "image_id": 42, "question": "no annotation for me"},
    ]}
    anns = {"annotations": [
        {"question_id": 10, "image_id": 42, "answer_type": "other", "question_type": "what color",
         "multiple_choice_answer": "red", "answers": [{"answer": "red", "answer_id": i + 1} for i in range(10)]},
        {"question_id": 11, "image_id": 43, "answer_type": "number", "question_type": "how many",
         "multiple_choice_answer": "2", "answers": [{"answer": "2", "answer_id": i + 1} for i in range(10)]},
    ]}
    root.mkdir()
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(qs))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(anns))
    png(root / "val2014" / "COCO_val2014_000000000042.jpg")
    png(root / "val2014" / "COCO_val2014_000000000043.jpg")
    ds = load_dataset(f"vqav2:{root}")
    assert (ds.name, ds.metric) == ("VQAv2", "vqa")
    assert [s.id for s in ds.samples] == ["10", "11"]
    assert ds.samples[0].answers == ["red"] * 10
    assert ds.samples[0].question.startswith("What color is the bus?\nAnswer the question using a single word")
    assert open_image(ds.samples[1].image).size == (8, 8)
    assert ds.malformed == 2 and ds.total_records == 4
    assert len(load_dataset(f"vqav2:{root}", limit=1).samples) == 1


def test_gqa_layout(tmp_path):
    root = tmp_path / "gqa"
    q = {
        "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no", "fullAnswer": "No.",
                      "types": {"structural": "verify", "semantic": "attr", "detailed": "weather"}},
        "201640614": {"imageId": "n235859", "question": "Who is wearing the dress?", "answer": "woman",
                      "types": {"structural": "query"}},
        "bad": {"question": "no image id"},
    }
    root.mkdir()
    (root / "testdev_balanced_questions.json").write_text(json.dumps(q))
    png(root / "images" / "n161313.jpg")
    png(root / "images" / "n235859.jpg")
    ds = load_dataset(f"gqa:{root}")
    assert (ds.name, ds.metric) == ("GQA", "exact")
    assert [(s.id, s.answers, s.qtype) for s in ds.samples] == [("201307251", ["no"], "verify"),
                                                                 ("201640614", ["woman"], "query")]
    assert ds.malformed == 1
    # the questions file itself works as PATH too
    assert len(load_dataset(f"gqa:{root / 'testdev_balanced_questions.json'}").samples) == 2


def test_textvqa_layout(tmp_path):
    root = tmp_path / "textvqa"
    data = {"dataset_name": "textvqa", "dataset_type": "val", "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?",
         "answers": ["dakota"] * 6 + ["dakota digital"] * 4, "image_classes": ["Camera"], "set_name": "val"},
        {"question_id": 34603, "image_id": "missing", "question": "no answers here"},
    ]}
    root.mkdir()
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    png(root / "train_images" / "003a8ae2ef43b901.jpg")
    ds = load_dataset(f"textvqa:{root}")
    assert (ds.name, ds.metric) == ("TextVQA", "vqa")
    assert len(ds.samples) == 1 and len(ds.samples[0].answers) == 10 and ds.malformed == 1


def test_pope_layout(tmp_path):
    root = tmp_path / "pope"
    root.mkdir()
    for cat, rows in {
        "random": [{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"},
                   {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a cat in the image?", "label": "no"}],
        "adversarial": [{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a skier in the image?", "label": "yes"},
                        {"question_id": 2, "image": "x.jpg", "text": "bad label", "label": "maybe"}],
    }.items():
        (root / f"coco_pope_{cat}.json").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    png(tmp_path / "elsewhere" / "COCO_val2014_000000310196.jpg")
    with pytest.raises(DataError, match="images=DIR"):
        load_dataset(f"pope:{root}")
    ds = load_dataset(f"pope:{root}?images={tmp_path / 'elsewhere'}")
    assert (ds.name, ds.metric) == ("POPE", "pope")
    assert [(s.id, s.answers, s.qtype) for s in ds.samples] == [
        ("adversarial/1", ["yes"], "adversarial"), ("random/1", ["yes"], "random"), ("random/2", ["no"], "random")]
    assert ds.malformed == 3  # two non-JSON lines + one bad label
    png(tmp_path / "coco" / "val2014" / "COCO_val2014_000000310196.jpg")  # COCO's folder is found by itself
    one = load_dataset(f"pope:{root / 'coco_pope_random.json'}")
    assert [s.id for s in one.samples] == ["1", "2"]
    assert open_image(one.samples[0].image).size == (8, 8)


def test_scienceqa_layout(tmp_path):
    root = tmp_path / "scienceqa"
    problems = {
        "5": {"question": "Which animal is a mammal?", "choices": ["frog", "whale", "shark"], "answer": 1,
              "hint": "Mammals have fur or hair.", "image": "image.png", "split": "test", "subject": "natural science"},
        "6": {"question": "No image here", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None, "split": "test"},
        "7": {"question": "Train question", "choices": ["a", "b"], "answer": 0, "image": "image.png", "split": "train"},
        "8": {"question": "Bad answer", "choices": ["a", "b"], "answer": 5, "image": "image.png", "split": "test"},
    }
    root.mkdir()
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["5", "6", "8"], "train": ["7"]}))
    png(root / "images" / "test" / "5" / "image.png")
    ds = load_dataset(f"scienceqa:{root}")
    assert (ds.name, ds.metric) == ("SQA-IMG", "mc")
    assert [s.id for s in ds.samples] == ["5"]
    s = ds.samples[0]
    assert s.answers == ["B"] and s.choices == ["frog", "whale", "shark"]
    assert s.question == ("Context: Mammals have fur or hair.\nWhich animal is a mammal?\nA. frog\nB. whale\nC. shark\n"
                          "Answer with the option's letter from the given choices directly.")
    assert open_image(s.image).size == (8, 8)
    assert ds.malformed == 1 and ds.total_records == 2  # only problems with an image count


def test_mme_layout(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    # flat category: images and txt side by side
    png(root / "existence" / "000000006040.jpg")
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n")
    # nested category: images/ + questions_answer_YN/
    png(root / "artwork" / "images" / "10002.jpg")
    (root / "artwork" / "questions_answer_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answer_YN" / "10002.txt").write_text(
        "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\n"
        "Does this artwork exist in the form of glassware? Please answer yes or no.\tNo\n"
        "a malformed line without an answer\n")
    ds = load_dataset(f"mme:{tmp_path}")
    assert (ds.name, ds.metric) == ("MME", "mme")
    assert [(s.id, s.answers, s.qtype, s.group) for s in ds.samples] == [
        ("artwork/10002/0", ["yes"], "artwork", "artwork/10002"), ("artwork/10002/1", ["no"], "artwork", "artwork/10002"),
        ("existence/000000006040/0", ["yes"], "existence", "existence/000000006040"),
        ("existence/000000006040/1", ["no"], "existence", "existence/000000006040")]
    assert ds.malformed == 1


def test_hf_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    d = datasets.Dataset.from_dict({
        "image": imgs, "question": ["q0", "q1", ""], "answers": [["a"] * 10, ["b"] * 10, ["c"] * 10],
        "question_id": [100, 101, 102],
    }).cast_column("image", datasets.Image())
    d.save_to_disk(str(tmp_path / "myset"))
    ds = load_dataset(str(tmp_path / "myset"))  # a bare directory is a `datasets` directory
    assert (ds.kind, ds.metric, ds.name) == ("hf", "vqa", "myset")
    assert [s.id for s in ds.samples] == ["100", "101"] and ds.malformed == 1
    assert open_image(ds.samples[1].image).getpixel((0, 0)) == (40, 0, 0)
    mc = datasets.DatasetDict({"test": datasets.Dataset.from_dict({
        "image": imgs[:1], "question": ["pick"], "choices": [["x", "y"]], "answer": [1]}).cast_column("image", datasets.Image())})
    mc.save_to_disk(str(tmp_path / "mc"))
    ds = load_dataset(f"hf:{tmp_path / 'mc'}?name=MC")
    assert (ds.metric, ds.name, ds.samples[0].answers) == ("mc", "MC", ["B"])


def test_missing_paths_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"vqav2:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="VQAv2 questions"):
        load_dataset(f"vqav2:{tmp_path / 'empty'}")


def test_open_image_errors(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError is an OSError
        open_image(str(bad))
    with pytest.raises(OSError):
        open_image(str(tmp_path / "missing.png"))


def test_builtin_detail_set_loads_without_a_path():
    ds = load_dataset("synthetic-detail", limit=6)
    assert ds.name == "Detail" and ds.kind == "synthetic-detail" and len(ds.samples) == 6
