"""The `caption` command on the real exported demo model (`exported_out`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import caption
from pipeline.core import errors
from pipeline.data import datasets, features
from pipeline.serving import exported_model
from tests.helpers import python_captions

REPOSITORY = Path(__file__).resolve().parent.parent


def _expected_captions(out_dir, image_ids):
    """In-Python captions of cached features for `image_ids`, the reference for the export."""
    cache = features.read_features(out_dir)
    return python_captions(out_dir, cache.features[[cache.index()[image_id] for image_id in image_ids]])[0]


def test_bad_files_are_reported_and_good_ones_captioned_in_order(exported_out, tmp_path):
    dataset = datasets.read_captions_json(exported_out)
    image_ids = [record.image_id for record in dataset.images[:3]]
    good = [str(dataset.image_dir / image_id) for image_id in image_ids]
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is text, not a JPEG")
    missing = tmp_path / "missing.png"
    # batch size 2: the text file shares its batch with a good image, which must survive it
    arguments = [good[0], str(not_an_image), good[1], str(missing), str(tmp_path), good[2]]
    result = subprocess.run(
        [sys.executable, "run_pipeline.py", "caption", *arguments,
         "--model", str(exported_out / "saved_model"), "--batch-size", "2"],
        cwd=REPOSITORY, capture_output=True, text=True, env=_environment_as_a_user_has_it(),
    )
    assert result.returncode == 2, result.stderr
    # TensorFlow's C++ start-up lines (oneDNN, no CUDA driver, cuInit) are filtered out by
    # default (pipeline.core.console): stderr holds our own lines only.
    assert [line for line in result.stderr.splitlines() if not line.startswith("error: ")] == []
    expected = _expected_captions(exported_out, image_ids)
    assert result.stdout.splitlines() == [f"{path}\t{text_}" for path, text_ in zip(good, expected)]
    errors_printed = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors_printed[0].startswith(f"error: {not_an_image}: not a readable JPEG, PNG, GIF or BMP image (")
    assert errors_printed[1:] == [f"error: {missing}: no such file",
                                  f"error: {tmp_path}: is a folder, not an image file"]


def _environment_as_a_user_has_it():
    """This process' environment without the TF_CPP_MIN_LOG_LEVEL that conftest sets."""
    return {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}


def test_tf_cpp_min_log_level_0_shows_tensorflows_start_up_lines(exported_out):
    image = datasets.read_captions_json(exported_out)
    path = str(image.image_dir / image.images[0].image_id)
    result = subprocess.run(
        [sys.executable, "run_pipeline.py", "caption", path, "--model", str(exported_out / "saved_model")],
        cwd=REPOSITORY, capture_output=True, text=True, env={**_environment_as_a_user_has_it(), "TF_CPP_MIN_LOG_LEVEL": "0"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}\t")
    assert "oneDNN custom operations are on" in result.stderr
    assert "absl::InitializeLog()" in result.stderr


def test_missing_model_folder_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(errors.PipelineError) as raised:
        caption.run_caption(["image.jpg"], tmp_path / "nowhere" / "saved_model")
    message = str(raised.value)
    assert f"{tmp_path / 'nowhere' / 'saved_model'}: no exported SavedModel here (the folder does not exist)" in message
    assert "python run_pipeline.py export --out OUT" in message and "`python run_pipeline.py`" in message
    with pytest.raises(errors.PipelineError, match="has no saved_model.pb"):
        caption.run_caption(["image.jpg"], tmp_path)


def test_image_problem_accepts_images_and_names_what_is_wrong(demo_data_dir):
    image_bytes = next((demo_data_dir / "Images").iterdir()).read_bytes()
    assert exported_model.image_problem(image_bytes) is None
    assert exported_model.image_problem(b"") == "empty file"
    assert exported_model.image_problem(b"GIF89a nonsense").startswith("not a readable JPEG, PNG, GIF or BMP image")
    assert "{{" not in exported_model.image_problem(b"plain text")  # no graph-node noise in the reason
    # The header check (serve, caption) passes a cut file whose header is whole: the
    # model's decoder refuses it, and image_problem, which decodes, then names it.
    truncated = image_bytes[: len(image_bytes) // 2]
    assert exported_model.header_problem(image_bytes) is None and exported_model.header_problem(truncated) is None
    assert exported_model.image_problem(truncated).startswith("not a readable JPEG, PNG, GIF or BMP image")
    assert exported_model.header_problem(b"") == "empty file"
