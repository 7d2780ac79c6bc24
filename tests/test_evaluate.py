"""Evaluation on the test split (metrics.json, captions_test.json) and the HTML report."""

import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline import evaluate
from pipeline.core import errors
from pipeline.data import datasets
from pipeline.evaluation import report


@pytest.fixture(scope="module")
def evaluated_out(trained_out, tmp_path_factory):
    """A copy of the session's trained run after `evaluate --beam-size 2`."""
    out = tmp_path_factory.mktemp("evaluate") / "run"
    shutil.copytree(trained_out, out)
    metrics = evaluate.run_evaluate(out, {"decode.beam_size": 2})
    return out, metrics


def test_metrics_json_has_every_key_in_range(evaluated_out):
    out, returned = evaluated_out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == returned
    test_images = datasets.read_captions_json(out).split_images("test")
    assert metrics["n_images"] == len(test_images) > 1
    assert metrics["beam_size"] == 2
    for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "shuffled_bleu_4", "meteor"):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert metrics["bleu_1"] >= metrics["bleu_4"]
    assert 0.0 <= metrics["cider"] <= 10.0
    assert 1 / metrics["n_images"] <= metrics["distinct_captions"] <= 1.0
    assert "notes" not in metrics  # Java is present here, so METEOR ran


def test_test_captions_file_lists_every_test_image(evaluated_out):
    out, metrics = evaluated_out
    data = json.loads((out / "captions_test.json").read_text())
    assert data["decode"]["beam_size"] == 2
    entries = data["captions"]
    assert len(entries) == metrics["n_images"]
    by_id = {record.image_id: record for record in datasets.read_captions_json(out).split_images("test")}
    for entry in entries:
        assert entry["references"] == by_id[entry["image_id"]].captions
        assert isinstance(entry["caption"], str) and "<" not in entry["caption"]
        assert np.isfinite(entry["score"]) and entry["score"] <= 0.0  # a length-normalized log probability
    distinct = len({entry["caption"] for entry in entries}) / len(entries)
    assert distinct == pytest.approx(metrics["distinct_captions"])


def test_report_embeds_thumbnails_captions_and_curves(evaluated_out):
    out, metrics = evaluated_out
    page = (out / "report.html").read_text()
    entries = json.loads((out / "captions_test.json").read_text())["captions"]
    assert page.count('src="data:image/jpeg;base64,') == len(entries)
    assert page.count('src="data:image/png;base64,') == 1  # the training curves
    for entry in entries:
        assert entry["image_id"] in page
        assert entry["references"][0].replace("'", "&#x27;") in page
    thumbnail = page.split('src="data:image/jpeg;base64,', 1)[1].split('"', 1)[0]
    with Image.open(io.BytesIO(base64.b64decode(thumbnail))) as image:
        assert max(image.size) == report.THUMBNAIL_SIZE
    assert f"{metrics['bleu_4']:.4f}" in page and "CIDEr-D" in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch: opens from disk


def test_report_escapes_text_and_shows_a_placeholder_for_unreadable_images(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.new("RGB", (320, 200), (200, 30, 30)).save(image_dir / "red.png")
    (image_dir / "broken.jpg").write_bytes(b"not an image at all")
    captions = [
        {"image_id": "red.png", "caption": "a red <b>box</b>", "score": -0.5, "references": ["x & y"]},
        {"image_id": "broken.jpg", "caption": "something", "score": -1.0, "references": ["z"]},
        {"image_id": "absent.jpg", "caption": "nothing", "score": -2.0, "references": ["w"]},
        {"image_id": "red.png", "caption": "beyond the limit", "score": -3.0, "references": ["v"]},
    ]
    history = [{"epoch": 1, "loss": 3.0, "val_loss": 3.1}, {"epoch": 2, "loss": 2.0, "val_loss": 2.5}]
    path = report.write_report(
        tmp_path, "run <1>", {"bleu_4": 0.25, "n_images": 3}, captions, history, image_dir, max_images=3,
        notes=["METEOR left out: <java>"],
    )
    page = path.read_text()
    assert path.name == "report.html"
    assert "a red &lt;b&gt;box&lt;/b&gt;" in page and "<b>box" not in page
    assert "x &amp; y" in page and "run &lt;1&gt;" in page and "METEOR left out: &lt;java&gt;" in page
    assert page.count('src="data:image/jpeg;base64,') == 1  # only red.png renders
    assert page.count("image unavailable") == 2  # broken and absent images
    assert "beyond the limit" not in page  # max_images caps the gallery
    assert "Test images (3 of 4)" in page
    assert "0.2500" in page


def test_training_curves_are_a_png_or_none():
    assert report.training_curves_png([]) is None
    png = report.training_curves_png([{"epoch": 1, "loss": 2.0, "masked_accuracy": 0.1}])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    # Per-period histories are drawn per step, with the validation CIDEr-D in its own panel.
    periods = [{"period": 1, "step": 50, "loss": 2.0, "val_cider": 0.4, "best": True},
               {"period": 2, "step": 100, "loss": 1.5, "val_cider": 0.7, "best": True}]
    without_cider = [{name: value for name, value in entry.items() if name != "val_cider"} for entry in periods]
    assert report.training_curves_png(periods) != report.training_curves_png(without_cider)


def test_evaluate_without_a_trained_decoder_is_a_clear_error(extracted_out, copy_run):
    out = copy_run(extracted_out)
    with pytest.raises(errors.ArtifactError, match=r"decoder\.keras: no trained decoder; run `train` first"):
        evaluate.run_evaluate(out, {})
    assert not (out / "metrics.json").exists()


def test_bad_beam_size_is_rejected(trained_out, copy_run):
    out = copy_run(trained_out)
    with pytest.raises(errors.PipelineError, match=r"decode\.beam_size \(--beam-size\) must be at least 1, got 0"):
        evaluate.run_evaluate(out, {"decode.beam_size": 0})


def test_evaluation_and_the_validation_scorer_read_only_the_rows_of_their_split(trained_out, evaluated_out, tmp_path):
    import h5py

    from pipeline.core import config as config_module
    from pipeline.data import run_folder
    from pipeline.training import validation

    out = tmp_path / "run"
    shutil.copytree(trained_out, out)
    config = config_module.PipelineConfig.load(out)
    val_scorer = validation.build_validation_scorer(out, config)
    with run_folder.open_feature_cache(out) as reader:
        test_rows = set(run_folder.usable_images(out, "test", reader.image_ids).rows.tolist())
        val_rows = set(run_folder.usable_images(out, "val", reader.image_ids).rows.tolist())
    with h5py.File(out / run_folder.FEATURES_FILE, "r+") as handle:
        features = handle["features"]
        for row in range(features.shape[0]):
            if row not in test_rows | val_rows:
                features[row] = np.nan
    # Every row but the test and val ones is NaN: a stage that used one would score NaN or differ.
    metrics = evaluate.run_evaluate(out, {"decode.beam_size": 2})
    assert metrics == evaluated_out[1]
    with h5py.File(out / run_folder.FEATURES_FILE, "r+") as handle:
        for row in test_rows:
            handle["features"][row] = np.nan
    scorer = validation.build_validation_scorer(out, config)
    np.testing.assert_array_equal(scorer.image_features, val_scorer.image_features)
    assert np.isfinite(scorer.image_features).all()
