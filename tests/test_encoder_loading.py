"""pipeline.core.encoder_loading: `--weights` and `--precision` as the user gives them, and their errors.

The round trips through weights files (both layouts) need a ResNet50 to save, so they sit
in test_encoder.py beside its shared plain encoder; these tests build none.
"""

import pytest

from pipeline.core import encoder_loading
from pipeline.core.errors import PipelineError

IMAGE_SIZE = 64


def test_bad_weights_files_are_named(tmp_path):
    with pytest.raises(PipelineError, match="no such file") as raised:
        encoder_loading.load_encoder(str(tmp_path / "absent.h5"), IMAGE_SIZE)
    assert "absent.h5" in str(raised.value) and "--weights random" in str(raised.value)

    not_weights = tmp_path / "notes.h5"
    not_weights.write_text("these are not weights")
    with pytest.raises(PipelineError, match="not ResNet50 notop weights") as raised:
        encoder_loading.load_encoder(str(not_weights), IMAGE_SIZE)
    assert str(not_weights) in str(raised.value)


def test_imagenet_download_failure_names_the_alternatives(tmp_path, monkeypatch):
    # An empty Keras cache: a copy of the weights elsewhere must not hide the failure.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(PipelineError) as raised:
        encoder_loading.load_encoder("imagenet", IMAGE_SIZE)
    message = str(raised.value)
    assert "ImageNet weights" in message and "could not be downloaded" in message
    assert "--weights FILE.h5" in message and "--weights random" in message
    assert "URL fetch failure" in message  # the cause is kept


def test_bad_precision_and_image_size_are_refused():
    with pytest.raises(PipelineError, match="encoder.precision"):
        encoder_loading.load_encoder("random", IMAGE_SIZE, precision="fp8")
    with pytest.raises(PipelineError, match="encoder.image_size"):
        encoder_loading.load_encoder("random", 8)
