"""Caption normalization and the vocabulary: ids, order, encode/decode, vocab.json round trip."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import errors
from pipeline.data import datasets, text


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A dog runs .", ["a", "dog", "runs"]),
        ("  Two   DOGS\tplay\r\n", ["two", "dogs", "play"]),
        ("A café in Zürich", ["a", "cafe", "in", "zurich"]),
        ("A boy in a t-shirt", ["a", "boy", "in", "a", "t", "shirt"]),
        ("The dog's ball", ["the", "dog", "s", "ball"]),
        ("2 dogs , 3 cats ... !!", ["dogs", "cats"]),
        ("ﬁsh", ["fish"]),  # NFKD expands the ligature
        ("\ufeffA dog", ["a", "dog"]),
        ("a", ["a"]),
        ("", []),
        ("123 -- 456 .", []),
    ],
)
def test_normalize_caption(raw, expected):
    assert text.normalize_caption(raw) == expected


def test_special_ids_and_tokens():
    assert (text.PAD_ID, text.START_ID, text.END_ID, text.UNK_ID) == (0, 1, 2, 3)
    assert text.SPECIAL_TOKENS == ("<pad>", "<start>", "<end>", "<unk>")


def test_build_orders_by_count_then_alphabet_and_applies_min_count():
    captions = [["a", "dog", "runs"], ["a", "cat", "runs"], ["a", "dog", "sits"], ["bird"]]
    vocabulary = text.Vocabulary.build(captions, min_count=2)
    # a: 3; dog, runs: 2 (alphabetical tie); cat, sits, bird: 1 -> dropped
    assert vocabulary.words == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs"]
    assert vocabulary.counts == {"a": 3, "dog": 2, "runs": 2}
    assert len(vocabulary) == 7
    assert "dog" in vocabulary and "cat" not in vocabulary

    everything = text.Vocabulary.build(captions, min_count=1)
    assert everything.words[4:] == ["a", "dog", "runs", "bird", "cat", "sits"]


def test_build_is_independent_of_caption_order():
    captions = [["b", "a"], ["c", "a"], ["b", "d"], ["c"]]
    forward = text.Vocabulary.build(captions, min_count=1)
    backward = text.Vocabulary.build([list(reversed(tokens)) for tokens in reversed(captions)], min_count=1)
    assert forward == backward
    assert forward.words[4:] == ["a", "b", "c", "d"]


def test_build_rejects_bad_min_count_and_reserved_tokens():
    with pytest.raises(errors.PipelineError, match="min_word_count must be an integer >= 1, got 0"):
        text.Vocabulary.build([["a"]], min_count=0)
    with pytest.raises(ValueError, match="reserved tokens"):
        text.Vocabulary.build([["a", "<end>"]], min_count=1)


def test_encode_maps_unknown_words_and_decode_stops_at_end():
    vocabulary = text.Vocabulary.build([["a", "dog"], ["a", "cat"]], min_count=1)
    assert vocabulary.words[4:] == ["a", "cat", "dog"]
    assert vocabulary.encode(["a", "dog", "zebra"]) == [4, 6, text.UNK_ID]
    assert vocabulary.encode([]) == []
    assert vocabulary.word_id("zebra") == text.UNK_ID
    ids = [text.START_ID, 4, text.PAD_ID, 5, text.UNK_ID, text.END_ID, 6, 6]
    assert vocabulary.decode(ids) == ["a", "cat", "<unk>"]
    assert vocabulary.decode([4, 6]) == ["a", "dog"]
    with pytest.raises(ValueError, match="token id 99 is outside the vocabulary of 7 words"):
        vocabulary.decode([4, 99])


def test_decode_accepts_numpy_integers():
    import numpy  # only the test needs it: text.py stays free of numpy

    vocabulary = text.Vocabulary.build([["a", "dog"]], min_count=1)
    row = numpy.array([4, 5, text.END_ID, 0], dtype=numpy.int32)
    assert vocabulary.decode(row) == ["a", "dog"]


def test_from_dataset_uses_training_captions_only(tmp_path):
    dataset = datasets.Dataset(
        layout="kaggle", image_dir=tmp_path, name="tiny", missing=[],
        images=[
            datasets.ImageRecord("1.jpg", "train", ["A red dog.", "A dog!"]),
            datasets.ImageRecord("2.jpg", "val", ["A zebra"]),
            datasets.ImageRecord("3.jpg", "test", ["A giraffe"]),
        ],
    )
    vocabulary = text.Vocabulary.from_dataset(dataset, min_count=1)
    assert vocabulary.words[4:] == ["a", "dog", "red"]
    assert vocabulary.counts == {"a": 2, "dog": 2, "red": 1}


def test_save_load_round_trip(tmp_path):
    vocabulary = text.Vocabulary.build([["a", "café"], ["a", "dog"], ["dog"]], min_count=1)
    path = tmp_path / "vocab.json"
    vocabulary.save(path)
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert stored["format"] == "captioner.vocab" and stored["version"] == 1
    assert stored["words"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert stored["min_count"] == 1
    loaded = text.Vocabulary.load(path)
    assert loaded == vocabulary
    assert (loaded.words, loaded.counts, loaded.min_count) == (vocabulary.words, vocabulary.counts, 1)
    assert loaded.encode(["café", "dog", "cat"]) == vocabulary.encode(["café", "dog", "cat"])
    assert [entry.name for entry in tmp_path.iterdir()] == ["vocab.json"]  # no temporary left behind


def _vocab_data():
    return {"format": "captioner.vocab", "version": 1, "min_count": 1,
            "words": ["<pad>", "<start>", "<end>", "<unk>", "a"], "counts": {"a": 3}}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda data: data.update(format="captioner.captions"), "not a vocabulary file"),
        (lambda data: data.update(version=7), "vocabulary file version 7 is not supported"),
        (lambda data: data.update(words=["a", "<pad>", "<start>", "<end>", "<unk>"]), "must start with"),
        (lambda data: data["words"].pop(2), "must start with"),
        (lambda data: data["words"].append("a"), "repeats \\['a'\\]"),
        (lambda data: data.update(words="a b"), "'words' must be a list"),
        (lambda data: data.update(counts={"a": "3"}), "'counts' must map words"),
        (lambda data: data.update(counts={"zebra": 3}), "names words not in 'words'"),
        (lambda data: data.pop("min_count"), "'min_count' must be an integer >= 1"),
    ],
)
def test_load_rejects_damaged_vocabulary(tmp_path, change, message):
    data = _vocab_data()
    change(data)
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(errors.ArtifactError, match=message) as caught:
        text.Vocabulary.load(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_load_reports_missing_and_truncated_file(tmp_path):
    path = tmp_path / "vocab.json"
    with pytest.raises(errors.ArtifactError, match="the vocabulary file is missing"):
        text.Vocabulary.load(path)
    path.write_text('{"format": "captioner.vocab", "words": ["<pad>"', encoding="utf-8")
    with pytest.raises(errors.ArtifactError, match="vocab.json: the vocabulary file is not valid JSON"):
        text.Vocabulary.load(path)


def test_text_and_dataset_modules_do_not_import_tensorflow():
    # A fresh interpreter: this test process may already hold TensorFlow from other tests.
    script = (
        "import sys, pipeline.data.datasets, pipeline.data.text\n"
        "heavy = sorted(name for name in ('tensorflow', 'keras', 'numpy', 'h5py') if name in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    repository = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=repository, capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == ""
