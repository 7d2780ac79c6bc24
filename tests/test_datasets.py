"""Dataset readers on generated folders of every layout, with the real releases' quirks.

Readers only check that image files exist, so most images here are empty files; one
test uses the session's generated demo dataset (real JPEGs, Kaggle layout).
"""

import csv
import json
import random

import pytest

from pipeline.core import config, errors
from pipeline.data import datasets

DATA_CONFIG = config.DataConfig()
BAD_SUFFIX = "2258277193_586949ec62.jpg.1"  # the real Flickr8k token file names this non-image


def _touch_images(folder, names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def _write_flickr8k(root, *, text_folder="Flickr8k_text", image_folder="Flicker8k_Dataset", newline="\n",
                    bom=False):
    """A small Flickr8k release: 6 train, 2 dev, 2 test images with 2 captions each, plus quirks.

    Quirks: the `.jpg.1` entry, one captioned image in no split list, one listed image
    without captions, one listed image whose file is missing, a non-ASCII caption, stray
    spaces and blank lines.
    """
    text_dir = root / text_folder if text_folder else root
    text_dir.mkdir(parents=True, exist_ok=True)
    train = [f"train_{index}.jpg" for index in range(6)]
    dev, test = ["dev_0.jpg", "dev_1.jpg"], ["test_0.jpg", "test_1.jpg"]
    captioned = train + dev + test + ["unlisted.jpg"]
    _touch_images(root / image_folder, [name for name in captioned if name != "dev_1.jpg"])
    lines = []
    for name in captioned:
        lines.append(f"{name}#0\tA dog runs on the grass .")
        lines.append(f"  {name}#1 \t  A café by the river  ")
        lines.append("")
    lines.append(f"{BAD_SUFFIX}#0\tA man in a red shirt .")
    text = newline.join(lines) + newline
    (text_dir / "Flickr8k.token.txt").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    for filename, names in (("Flickr_8k.trainImages.txt", train + ["nocaption.jpg"]),
                            ("Flickr_8k.devImages.txt", dev), ("Flickr_8k.testImages.txt", test)):
        (text_dir / filename).write_bytes((newline.join(names) + newline).encode("utf-8"))
    return root


def _write_kaggle(root, rows, header="image,caption"):
    (root / "Images").mkdir(parents=True, exist_ok=True)
    with open(root / "captions.txt", "w", encoding="utf-8", newline="") as handle:
        handle.write(header + "\n")
        csv.writer(handle, lineterminator="\n").writerows(rows)
    _touch_images(root / "Images", {name for name, _ in rows})
    return root


def _kaggle_rows(num_images, captions_per_image=2):
    return [(f"{index:04d}_img.jpg", f"A dog, number {index}, says \"hi\" #{caption}")
            for index in range(num_images) for caption in range(captions_per_image)]


def _karpathy_entry(filename, split, sentences, filepath=None):
    entry = {"filename": filename, "split": split, "sentences": sentences}
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def _write_karpathy(root, name, entries, image_folder="Images", present=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / f"dataset_{name}.json").write_text(json.dumps({"images": entries, "dataset": name}), encoding="utf-8")
    ids = [f"{entry['filepath']}/{entry['filename']}" if entry.get("filepath") else entry["filename"]
           for entry in entries]
    _touch_images(root / image_folder if image_folder else root, ids if present is None else present)
    return root


# --- Flickr8k release ---------------------------------------------------------------------------


@pytest.mark.parametrize("newline, bom", [("\n", False), ("\r\n", True)], ids=["lf", "crlf-bom"])
def test_flickr8k_release_with_quirks(tmp_path, newline, bom):
    root = _write_flickr8k(tmp_path / "flickr8k", newline=newline, bom=bom)
    dataset = datasets.load_dataset(root, DATA_CONFIG)

    assert dataset.layout == "flickr8k" and dataset.name == "flickr8k"
    assert dataset.image_dir == (root / "Flicker8k_Dataset").resolve()
    assert dataset.split_counts() == {"train": 6, "val": 1, "test": 2}
    assert [record.image_id for record in dataset.split_images("val")] == ["dev_0.jpg"]
    assert dataset.missing == [BAD_SUFFIX, "dev_1.jpg"]
    assert dataset.unsplit == ["unlisted.jpg"]
    assert dataset.uncaptioned == ["nocaption.jpg"]
    first = dataset.images[0]
    assert first.image_id == "dev_0.jpg"  # images are sorted by id
    assert first.captions == ["A dog runs on the grass .", "A café by the river"]  # raw, stripped
    assert [record.image_id for record in dataset.images] == sorted(record.image_id for record in dataset.images)

    summary = dataset.summary()
    assert "flickr8k layout" in summary
    assert "6 train, 1 val, 2 test (9 total), 18 captions" in summary
    assert f"missing image files: 2 ({BAD_SUFFIX}, dev_1.jpg)" in summary
    assert "no split list, left out: 1 (unlisted.jpg)" in summary
    assert "without captions, left out: 1 (nocaption.jpg)" in summary
    assert "Flickr8k_text/Flickr_8k.*Images.txt" in summary


def test_flickr8k_text_at_top_and_images_in_images_folder(tmp_path):
    root = _write_flickr8k(tmp_path / "top", text_folder="", image_folder="Images")
    dataset = datasets.load_dataset(root, DATA_CONFIG)
    assert dataset.image_dir == (root / "Images").resolve()
    assert dataset.split_counts() == {"train": 6, "val": 1, "test": 2}


def test_flickr8k_picks_the_image_folder_that_holds_the_images(tmp_path):
    root = _write_flickr8k(tmp_path / "two", image_folder="Flickr8k_Dataset")
    (root / "Images").mkdir()  # an empty folder of a preferred name must not win
    (root / "Images" / "unrelated.jpg").write_bytes(b"")
    dataset = datasets.load_dataset(root, DATA_CONFIG)
    assert dataset.image_dir == (root / "Flickr8k_Dataset").resolve()
    assert len(dataset.images) == 9


@pytest.mark.parametrize(
    "line, message",
    [
        ("train_0.jpg#0 A dog without a tab", "expected 'image.jpg#k<TAB>caption', found no tab"),
        ("train_0.jpg\tA dog", "expected 'image.jpg#k' before the tab"),
        ("train_0.jpg#x\tA dog", "expected 'image.jpg#k' before the tab"),
        ("train_0.jpg#2\t   ", "empty caption for train_0.jpg"),
        ("../etc/passwd#0\tA dog", "must be a path inside the image folder"),
    ],
)
def test_flickr8k_malformed_token_line_names_file_and_line(tmp_path, line, message):
    root = _write_flickr8k(tmp_path / "bad", newline="\r\n", bom=True)
    token_file = root / "Flickr8k_text" / "Flickr8k.token.txt"
    lines = token_file.read_bytes().decode("utf-8-sig").split("\r\n")
    lines.insert(3, line)  # line 4 of the file
    token_file.write_text("\r\n".join(lines), encoding="utf-8")
    with pytest.raises(errors.DataFormatError, match=message) as caught:
        datasets.load_dataset(root, DATA_CONFIG)
    assert str(caught.value).startswith(f"{token_file}:4: ")
    assert caught.value.line == 4


def test_flickr8k_image_listed_in_two_splits(tmp_path):
    root = _write_flickr8k(tmp_path / "twice")
    test_list = root / "Flickr8k_text" / "Flickr_8k.testImages.txt"
    test_list.write_text("test_0.jpg\ntrain_3.jpg\n", encoding="utf-8")
    with pytest.raises(errors.DataFormatError, match="train_3.jpg is already listed at Flickr_8k.trainImages.txt:4"):
        datasets.load_dataset(root, DATA_CONFIG)


def test_flickr8k_with_an_incomplete_set_of_split_lists(tmp_path):
    root = _write_flickr8k(tmp_path / "partial")
    (root / "Flickr8k_text" / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(errors.PipelineError, match="but not Flickr_8k.devImages.txt; provide all three"):
        datasets.load_dataset(root, DATA_CONFIG)


def test_no_image_left_is_an_error_naming_missing_files(tmp_path):
    root = tmp_path / "empty_images"
    (root / "Images").mkdir(parents=True)
    (root / "captions.txt").write_text("image,caption\na.jpg,A dog\nb.jpg,A cat\n", encoding="utf-8")
    with pytest.raises(errors.PipelineError, match=r"none of its 2 captioned images is usable \(2 missing") as caught:
        datasets.load_dataset(root, DATA_CONFIG)
    assert "missing: a.jpg, b.jpg" in str(caught.value)


# --- Kaggle layout ------------------------------------------------------------------------------


def test_kaggle_csv_with_quotes_commas_and_non_ascii(tmp_path):
    root = tmp_path / "kaggle"
    (root / "Images").mkdir(parents=True)
    _touch_images(root / "Images", ["a.jpg", "b.jpg", "c.jpg"])
    (root / "captions.txt").write_bytes(
        "\ufeffimage,caption\r\n"
        'a.jpg,"A dog, brown and white, runs ."\r\n'
        'a.jpg,"The ""best"" dog"\r\n'
        "\r\n"
        "b.jpg,Ein Mädchen spielt\r\n"
        'c.jpg,"A caption over\r\ntwo lines"\r\n'
        "gone.jpg,A missing picture\r\n".encode("utf-8")
    )
    dataset = datasets.load_dataset(root, DATA_CONFIG)
    assert dataset.layout == "kaggle" and dataset.name == "kaggle"
    captions = {record.image_id: record.captions for record in dataset.images}
    assert captions["a.jpg"] == ["A dog, brown and white, runs .", 'The "best" dog']
    assert captions["b.jpg"] == ["Ein Mädchen spielt"]
    assert captions["c.jpg"] == ["A caption over\r\ntwo lines"]
    assert dataset.missing == ["gone.jpg"]
    # The split is drawn over every captioned name, missing files included, so that a file
    # going missing does not move the other images: 4 names -> 2 train, 1 val, 1 test.
    expected = datasets.deterministic_split(["a.jpg", "b.jpg", "c.jpg", "gone.jpg"], 1000, 1000)
    assert sorted(expected.values()) == ["test", "train", "train", "val"]
    assert {record.image_id: record.split for record in dataset.images} == {
        image_id: split for image_id, split in expected.items() if image_id != "gone.jpg"}
    assert "deterministic" in dataset.split_source


@pytest.mark.parametrize(
    "content, line, message",
    [
        ("img,text\na.jpg,A dog\n", 1, "expected the header 'image,caption', found 'img,text'"),
        ("image,caption\na.jpg,A dog\na.jpg,A dog,extra\n", 3, "expected 2 fields \\(image,caption\\), found 3"),
        ("image,caption\na.jpg\n", 2, "expected 2 fields"),
        ("image,caption\n\"a.jpg\",\"a\nb\"\n,A dog\n", 4, "empty image name"),
        ("image,caption\na.jpg,   \n", 2, "empty caption for a.jpg"),
    ],
)
def test_kaggle_malformed_csv_names_file_and_line(tmp_path, content, line, message):
    root = tmp_path / "bad_csv"
    (root / "Images").mkdir(parents=True)
    _touch_images(root / "Images", ["a.jpg"])
    (root / "captions.txt").write_text(content, encoding="utf-8")
    with pytest.raises(errors.DataFormatError, match=message) as caught:
        datasets.load_dataset(root, DATA_CONFIG)
    assert str(caught.value).startswith(f"{root / 'captions.txt'}:{line}: ")


def test_kaggle_split_is_deterministic_and_independent_of_row_order(tmp_path):
    rows = _kaggle_rows(40)
    first = datasets.load_dataset(_write_kaggle(tmp_path / "sorted", rows), DATA_CONFIG)
    shuffled_rows = list(rows)
    random.Random(7).shuffle(shuffled_rows)
    second = datasets.load_dataset(_write_kaggle(tmp_path / "shuffled", shuffled_rows), DATA_CONFIG)

    assert first.split_counts() == {"train": 30, "val": 5, "test": 5}
    splits = {record.image_id: record.split for record in first.images}
    assert splits == {record.image_id: record.split for record in second.images}
    # A real shuffle, not the sorted order cut in three.
    test_ids = sorted(image_id for image_id, split in splits.items() if split == "test")
    assert test_ids != sorted(splits)[-5:]
    # Captions of one image keep their file order within it.
    by_id = {record.image_id: record.captions for record in first.images}
    assert by_id["0003_img.jpg"] == ['A dog, number 3, says "hi" #0', 'A dog, number 3, says "hi" #1']


def test_deterministic_split_sizes():
    names = [f"{index:05d}.jpg" for index in range(8000)]
    splits = datasets.deterministic_split(names, val_images=1000, test_images=1000)
    counts = {split: list(splits.values()).count(split) for split in datasets.SPLITS}
    assert counts == {"train": 6000, "val": 1000, "test": 1000}
    assert datasets.deterministic_split(reversed(names), 1000, 1000) == splits
    custom = datasets.deterministic_split(names + ["extra.jpg"], val_images=500, test_images=250)
    assert sorted(custom.values()).count("test") == 250 and sorted(custom.values()).count("val") == 500

    small = datasets.deterministic_split([f"{index}.jpg" for index in range(40)], 1000, 1000)
    assert sorted(small.values()).count("val") == 5 and sorted(small.values()).count("test") == 5
    assert sorted(datasets.deterministic_split(["a", "b", "c"], 1000, 1000).values()) == ["test", "train", "val"]
    assert datasets.deterministic_split(["a", "b"], 1000, 1000) == {"a": "train", "b": "train"}
    with pytest.raises(errors.PipelineError, match="leave no training image out of 8000"):
        datasets.deterministic_split(names, val_images=4000, test_images=4000)


def test_kaggle_uses_flickr8k_split_lists_when_present(tmp_path):
    rows = [(name, "A dog") for name in ("x.jpg", "y.jpg", "z.jpg", "w.jpg")]
    root = _write_kaggle(tmp_path / "kaggle_lists", rows)
    text_dir = root / "Flickr8k_text"
    text_dir.mkdir()
    (text_dir / "Flickr_8k.trainImages.txt").write_text("x.jpg\ny.jpg\n", encoding="utf-8")
    (text_dir / "Flickr_8k.devImages.txt").write_text("z.jpg\n", encoding="utf-8")
    (text_dir / "Flickr_8k.testImages.txt").write_text("\n", encoding="utf-8")
    dataset = datasets.load_dataset(root, DATA_CONFIG)
    assert {record.image_id: record.split for record in dataset.images} == {
        "x.jpg": "train", "y.jpg": "train", "z.jpg": "val"}
    assert dataset.unsplit == ["w.jpg"]


def test_generated_demo_dataset_reads_as_kaggle(demo_data_dir):
    dataset = datasets.load_dataset(demo_data_dir, DATA_CONFIG)
    assert dataset.layout == "kaggle" and dataset.missing == []
    assert dataset.split_counts() == {"train": 36, "val": 6, "test": 6}
    for record in dataset.images:
        assert record.path(dataset.image_dir).is_file()
        assert record.captions and all(caption.strip() for caption in record.captions)


# --- Karpathy split JSON ------------------------------------------------------------------------


def test_karpathy_flickr8k_with_restval_and_token_fallback(tmp_path):
    entries = [
        _karpathy_entry("1.jpg", "train", [{"raw": "A dog.", "tokens": ["a", "dog"]}]),
        _karpathy_entry("2.jpg", "restval", [{"raw": "A cat.", "tokens": ["a", "cat"]}]),
        _karpathy_entry("3.jpg", "val", [{"tokens": ["a", "bird", "flies"]}, {"raw": "", "tokens": ["sky"]}]),
        _karpathy_entry("4.jpg", "test", [{"raw": "Ein Vogel über dem See"}]),
        _karpathy_entry("5.jpg", "test", [{"raw": "Missing"}]),
        _karpathy_entry("6.jpg", "train", []),
    ]
    root = _write_karpathy(tmp_path / "k8", "flickr8k", entries, image_folder="Flicker8k_Dataset",
                           present=["1.jpg", "2.jpg", "3.jpg", "4.jpg", "6.jpg"])
    dataset = datasets.load_dataset(root, DATA_CONFIG)
    assert dataset.layout == "karpathy" and dataset.name == "flickr8k"
    assert dataset.image_dir == (root / "Flicker8k_Dataset").resolve()
    assert {record.image_id: record.split for record in dataset.images} == {
        "1.jpg": "train", "2.jpg": "train", "3.jpg": "val", "4.jpg": "test"}
    by_id = {record.image_id: record.captions for record in dataset.images}
    assert by_id["3.jpg"] == ["a bird flies", "sky"]
    assert by_id["4.jpg"] == ["Ein Vogel über dem See"]
    assert dataset.missing == ["5.jpg"]
    assert dataset.uncaptioned == ["6.jpg"]


def test_karpathy_coco_filepath_and_images_in_the_data_folder(tmp_path):
    entries = [
        _karpathy_entry("COCO_val2014_000000000042.jpg", "val", [{"raw": "A plate of food."}], filepath="val2014"),
        _karpathy_entry("COCO_train2014_000000000009.jpg", "train", [{"raw": "A bus."}], filepath="train2014"),
        _karpathy_entry("COCO_val2014_000000000073.jpg", "restval", [{"raw": "A cat."}], filepath="val2014"),
        _karpathy_entry("COCO_val2014_000000000074.jpg", "test", [{"raw": "A dog."}], filepath="val2014"),
    ]
    root = _write_karpathy(tmp_path / "coco", "coco", entries, image_folder=None)
    (root / "images").mkdir()  # a preferred name holding none of the images
    dataset = datasets.load_dataset(root, DATA_CONFIG)
    assert dataset.name == "coco"
    assert dataset.image_dir == root.resolve()
    assert [record.image_id for record in dataset.images] == [
        "train2014/COCO_train2014_000000000009.jpg", "val2014/COCO_val2014_000000000042.jpg",
        "val2014/COCO_val2014_000000000073.jpg", "val2014/COCO_val2014_000000000074.jpg"]
    assert [record.split for record in dataset.images] == ["train", "val", "train", "test"]
    assert all(record.path(dataset.image_dir).is_file() for record in dataset.images)


@pytest.mark.parametrize(
    "entries, message",
    [
        (None, "expected an object with an 'images' list"),
        ([{"split": "train", "sentences": [{"raw": "A"}]}], r"images\[0\]\.filename: missing"),
        ([_karpathy_entry("a.jpg", "train", [{"raw": "A"}]), {"filename": "b.jpg", "split": "train"}],
         r"images\[1\]\.sentences: missing or not a list"),
        ([_karpathy_entry("a.jpg", "train", [{"raw": "A"}]), _karpathy_entry("b.jpg", "dev", [{"raw": "B"}])],
         r"images\[1\]\.split: 'dev' is not one of train, val, test, restval"),
        ([_karpathy_entry("a.jpg", "train", [{"raw": "A"}, {"raw": " "}])],
         r"images\[0\]\.sentences\[1\]: neither a non-empty 'raw' string nor a 'tokens' list"),
        ([_karpathy_entry("a.jpg", "train", [{"raw": "A"}]), _karpathy_entry("a.jpg", "test", [{"raw": "B"}])],
         r"images\[1\]\.filename: a.jpg already appears as images\[0\]"),
    ],
)
def test_karpathy_invalid_json_names_file_and_entry(tmp_path, entries, message):
    root = tmp_path / "bad_karpathy"
    root.mkdir()
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k"} if entries is None else {"images": entries}), encoding="utf-8")
    with pytest.raises(errors.DataFormatError, match=message) as caught:
        datasets.load_dataset(root, DATA_CONFIG)
    assert str(caught.value).startswith(f"{path}: ")


def test_karpathy_truncated_json_names_the_line(tmp_path):
    root = tmp_path / "truncated"
    root.mkdir()
    (root / "dataset_flickr30k.json").write_text('{"images": [\n{"filename": "a.jpg",\n', encoding="utf-8")
    with pytest.raises(errors.DataFormatError, match=r"dataset_flickr30k.json:3: invalid JSON"):
        datasets.load_dataset(root, DATA_CONFIG)


# --- Detection and captions.json ----------------------------------------------------------------


def test_unrecognized_folder_lists_what_was_looked_for(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"")
    with pytest.raises(errors.PipelineError) as caught:
        datasets.load_dataset(tmp_path, DATA_CONFIG)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path.resolve()}: no captioned dataset found")
    for looked_for in ("dataset_*.json", "Flickr8k.token.txt", "Flickr8k_text/", "Flicker8k_Dataset/", "captions.txt"):
        assert looked_for in message
    with pytest.raises(errors.PipelineError, match="dataset folder does not exist"):
        datasets.load_dataset(tmp_path / "nowhere", DATA_CONFIG)


def test_captions_json_round_trip(tmp_path):
    root = _write_flickr8k(tmp_path / "flickr8k")
    dataset = datasets.load_dataset(root, DATA_CONFIG)
    out = tmp_path / "out"
    path = datasets.write_captions_json(out, dataset)
    assert path == out / "captions.json"
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert (stored["format"], stored["version"], stored["layout"]) == ("captioner.captions", 1, "flickr8k")
    assert stored["images"][0] == {"image_id": "dev_0.jpg", "path": "dev_0.jpg", "split": "val",
                                   "captions": ["A dog runs on the grass .", "A café by the river"]}
    assert datasets.read_captions_json(out) == dataset


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda data: data.update(format="captioner.vocab"), "not a captions file"),
        (lambda data: data.update(version=2), "captions file version 2 is not supported"),
        (lambda data: data.pop("images"), "field 'images' must be a list"),
        (lambda data: data["images"][1].update(split="dev"), r"images\[1\]\.split is 'dev'"),
        (lambda data: data["images"][0].pop("captions"), r"images\[0\]\.captions must be a non-empty list"),
        (lambda data: data.update(missing="a.jpg"), "field 'missing' must be a list of strings"),
    ],
)
def test_read_captions_json_rejects_damaged_file(tmp_path, change, message):
    dataset = datasets.Dataset(
        layout="kaggle", image_dir=tmp_path, name="tiny", missing=[],
        images=[datasets.ImageRecord("a.jpg", "train", ["A dog"]), datasets.ImageRecord("b.jpg", "test", ["A cat"])],
    )
    path = datasets.write_captions_json(tmp_path, dataset)
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(errors.ArtifactError, match=message) as caught:
        datasets.read_captions_json(tmp_path)
    assert str(caught.value).startswith(f"{path}: ")


def test_read_captions_json_missing_file(tmp_path):
    with pytest.raises(errors.ArtifactError, match="captions.json: the captions file is missing"):
        datasets.read_captions_json(tmp_path)
