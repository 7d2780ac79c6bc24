"""The run folder's readers: one rule for the usable images of a split, one decoder loader.

Training (`load_training_data`), validation (`build_validation_scorer`) and evaluation
read the images of a split through `run_folder.usable_images`; a run whose val and test
splits each hold an image extraction failed on and an image none of whose captions has a
word shows all three leaving out exactly those two.
"""

import io
import json
import re
import shutil

import h5py
import numpy as np
import pytest

from pipeline import evaluate, export, verify
from pipeline.core import config as config_module
from pipeline.core import errors, io_utils
from pipeline.data import features, run_folder
from pipeline.training import inputs as training_inputs
from pipeline.training import validation

WORDLESS_CAPTIONS = ["42 !!", "...", "3 - 4"]


@pytest.fixture(scope="module")
def edited_run(trained_out, tmp_path_factory):
    """(OUT, {split: the image ids every stage must use}): the session's trained run (the
    extracted run plus its decoder) with, in each of val and test, one image listed in
    extract_errors.json and one whose captions have no word."""
    out = tmp_path_factory.mktemp("run_folder") / "run"
    shutil.copytree(trained_out, out)
    captions = json.loads((out / run_folder.CAPTIONS_FILE).read_text())
    failures = io_utils.read_json(out / run_folder.EXTRACT_ERRORS_FILE, "the extraction error list")
    expected = {}
    for split in ("val", "test"):
        entries = [entry for entry in captions["images"] if entry["split"] == split]
        failed, wordless = entries[1], entries[2]
        failures.append({"image_id": failed["image_id"], "path": failed["path"], "reason": "undecodable"})
        wordless["captions"] = list(WORDLESS_CAPTIONS)
        expected[split] = [entry["image_id"] for entry in entries if entry not in (failed, wordless)]
    (out / run_folder.CAPTIONS_FILE).write_text(json.dumps(captions))
    io_utils.write_json(out / run_folder.EXTRACT_ERRORS_FILE, failures)
    return out, expected


def _row_of_image(out):
    with run_folder.open_feature_cache(out) as reader:
        return {image_id: row for row, image_id in enumerate(reader.image_ids)}


def test_the_rule_leaves_out_the_failed_and_the_wordless_image(edited_run):
    out, expected = edited_run
    row_of_image = _row_of_image(out)
    for split in ("val", "test"):
        images = run_folder.usable_images(out, split, list(row_of_image))
        assert [record.image_id for record in images.records] == expected[split]
        assert images.rows.tolist() == [row_of_image[image_id] for image_id in expected[split]]
        assert (images.failed, images.wordless, images.wordless_captions) == (1, 1, len(WORDLESS_CAPTIONS))
        assert all(references and all(references) for references in images.references)


def test_training_validation_and_evaluation_agree_on_the_usable_images(edited_run, tmp_path):
    out, expected = edited_run
    config = config_module.PipelineConfig.load(out)
    row_of_image = _row_of_image(out)
    cache = run_folder.read_feature_cache(out)

    # Training: the val captions are those of the usable val images, and only theirs; each
    # caption's row (in the array training holds) gives its image's vector.
    data = training_inputs.load_training_data(out, config)
    assert data.val.images == data.val_split_images == len(expected["val"])
    expected_rows = np.repeat([row_of_image[image_id] for image_id in expected["val"]], data.val.captions_per_image)
    np.testing.assert_array_equal(data.feature_rows.read(data.val.rows), cache.features[expected_rows])
    assert data.skipped_images == 1 and data.empty_captions == len(WORDLESS_CAPTIONS)

    # Validation: the same images, in captions.json order, on either split.
    for split in ("val", "test"):
        scorer = validation.build_validation_scorer(out, config, split=split)
        np.testing.assert_array_equal(scorer.image_features,
                                      cache.features[[row_of_image[image_id] for image_id in expected[split]]])

    # Evaluation: the test captions are those of the same test images.
    run = tmp_path / "evaluated"
    shutil.copytree(out, run)
    metrics = evaluate.run_evaluate(run, {"decode.beam_size": 1})
    test_captions = json.loads((run / run_folder.TEST_CAPTIONS_FILE).read_text())["captions"]
    assert [entry["image_id"] for entry in test_captions] == expected["test"]
    assert metrics["n_images"] == len(expected["test"])


def test_training_holds_the_rows_of_the_images_it_uses_and_no_others(edited_run):
    out, expected = edited_run
    config = config_module.PipelineConfig.load(out)
    image_ids = list(_row_of_image(out))
    cache = run_folder.read_feature_cache(out)
    train_images, val_images = (run_folder.usable_images(out, split, image_ids) for split in ("train", "val"))

    data = training_inputs.load_training_data(out, config, val_images=2)
    assert data.val.images == len(data.val_images) == 2 and data.val_split_images == len(expected["val"])
    assert data.val_images.references == val_images.references[:2]
    for split, images in ((data.train, train_images), (data.val, val_images)):
        file_rows = np.repeat(images.rows[:split.images], split.captions_per_image)
        np.testing.assert_array_equal(data.feature_rows.read(split.rows), cache.features[file_rows])
    np.testing.assert_array_equal(data.feature_rows.read(data.val_images.rows), cache.features[val_images.rows[:2]])
    # Held: the train images' rows and the first two val images', not the test split's nor the other val ones,
    # through a map of the file.
    assert data.in_memory and len(data.feature_rows.array) == len(train_images) + 2 < len(cache.features)
    assert isinstance(data.feature_rows.array, features.MappedRows)

    # Streamed from the file, the rows are the file's own and give the same vectors.
    streamed = training_inputs.load_training_data(out, config.replace({"train.max_cache_memory_gb": 1e-9}),
                                                  val_images=2)
    try:
        assert not streamed.in_memory
        for held, read in ((data.train, streamed.train), (data.val, streamed.val)):
            np.testing.assert_array_equal(streamed.feature_rows.read(read.rows), data.feature_rows.read(held.rows))
            np.testing.assert_array_equal(read.tokens, held.tokens)
    finally:
        streamed.feature_rows.close()


def test_training_reads_a_cache_it_cannot_map_into_an_array_of_the_same_rows(edited_run, copy_run):
    out = copy_run(edited_run[0])
    config = config_module.PipelineConfig.load(out)
    mapped = training_inputs.load_training_data(out, config, val_images=2)
    expected = {split: (getattr(mapped, split).rows, mapped.feature_rows.read(getattr(mapped, split).rows))
                for split in ("train", "val")}
    del mapped  # its map would see the file change under it
    with h5py.File(out / run_folder.FEATURES_FILE, "r+") as handle:  # the same rows, stored compressed
        values = handle["features"][:]
        del handle["features"]
        handle.create_dataset("features", data=values, chunks=(16, values.shape[1]), compression="gzip")

    data = training_inputs.load_training_data(out, config, val_images=2)
    assert data.in_memory and isinstance(data.feature_rows.array, np.ndarray)
    for split, (rows, vectors) in expected.items():
        np.testing.assert_array_equal(getattr(data, split).rows, rows)
        np.testing.assert_array_equal(data.feature_rows.read(rows), vectors)


def test_an_image_without_a_row_that_extraction_did_not_list_is_named_by_every_reader(edited_run, copy_run):
    out = copy_run(edited_run[0])
    captions = json.loads((out / run_folder.CAPTIONS_FILE).read_text())
    captions["images"].append({"image_id": "never_extracted.jpg", "path": "never_extracted.jpg", "split": "test",
                               "captions": ["a red square"]})
    (out / run_folder.CAPTIONS_FILE).write_text(json.dumps(captions))
    config = config_module.PipelineConfig.load(out)
    message = (r"features\.h5: 1 test image\(s\) of captions\.json have no feature row and are not listed in "
               r"extract_errors\.json \(e\.g\. 'never_extracted\.jpg'\); rerun `extract`")
    with pytest.raises(errors.ArtifactError, match=message):
        validation.build_validation_scorer(out, config, split="test")
    with pytest.raises(errors.ArtifactError, match=message):
        evaluate.run_evaluate(out, {})


def _damage_decoder(out):
    path = out / run_folder.DECODER_FILE
    path.write_bytes(path.read_bytes()[:1000])


def test_one_decoder_loader_one_message(trained_out, copy_run):
    out = copy_run(trained_out)
    vocabulary_size = len(run_folder.read_vocabulary(out))
    model = run_folder.load_decoder(out, vocabulary_size=vocabulary_size)
    assert model.outputs[0].shape[-1] == vocabulary_size
    with pytest.raises(errors.ArtifactError, match=r"decoder\.keras: the decoder predicts \d+ words but vocab\.json "
                                                   r"has 7; run `train` again after `extract`"):
        run_folder.load_decoder(out, vocabulary_size=7)
    with pytest.raises(errors.ArtifactError, match=r"decoder_xe\.keras: no trained decoder; run `train` first"):
        run_folder.load_decoder(out, run_folder.XE_DECODER_FILE)

    _damage_decoder(out)
    damaged = re.escape(f"{out / run_folder.DECODER_FILE}: cannot load the decoder (") + r".+\); run `train` again"
    for stage in (evaluate.run_evaluate, export.run_export):
        with pytest.raises(errors.ArtifactError, match=damaged):
            stage(out, {})
    stream = io.StringIO()
    assert verify.run_verify(out, stream=stream) == 2
    problems = [line for line in stream.getvalue().splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1 and re.match(f"problem: {re.escape(run_folder.DECODER_FILE)}: {damaged}",
                                           problems[0]), problems


def test_normalized_captions_are_text_normalize_caption_s_words():
    from pipeline.data import text

    rng = np.random.default_rng(0)
    alphabet = list("abcXYZ -'.,!?0123456789\t\n_") + ["é", "ß", "İ", "ﬁ", "〇", "Ω", "ç"]
    captions = ["A café-owner's dog, 2 years old!", "", "42 !!", "T-SHIRT_and\tjeans"] + [
        "".join(rng.choice(alphabet, size=rng.integers(0, 30))) for _ in range(500)]
    assert list(run_folder.normalized_captions(captions)) == [text.normalize_caption(raw) for raw in captions]
