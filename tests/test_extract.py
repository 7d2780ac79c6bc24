"""Stage 1 end to end: run_extract on real files into a real HDF5 cache.

One module-scoped run on a small Kaggle-layout dataset that holds every kind of bad and
awkward image; the session's `extracted_out` covers the shared demo dataset.
"""

import io
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import ArtifactError
from tests.conftest import FOLDED_ENCODER_IMAGE_SIZE
from tests.helpers import as_version_1, image_bytes

# The size of the session's `folded_encoder`: the encoder `extract` builds for OVERRIDES.
IMAGE_SIZE = FOLDED_ENCODER_IMAGE_SIZE
OVERRIDES = {
    "encoder.weights": "random",
    "encoder.precision": "fp32",  # the features are compared with the fp32 encoder's
    "encoder.image_size": IMAGE_SIZE,
    "encoder.batch_size": 8,
    "text.min_word_count": 1,
    "data.val_images": 2,
    "data.test_images": 2,
}
GOOD_IMAGES = 14
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def awkward_data(tmp_path_factory):
    """A Kaggle-layout dataset: good JPEGs, awkward-but-usable images and bad files.

    Returns (data_dir, usable ids, {bad id: expected reason prefix}).
    """
    data_dir = tmp_path_factory.mktemp("awkward") / "data"
    images = data_dir / "Images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    usable = []
    for index in range(GOOD_IMAGES):
        name = f"photo_{index:02d}.jpg"
        pixels = (rng.random((90 + index, 120, 3)) * 255).astype(np.uint8)
        (images / name).write_bytes(image_bytes(pixels, "JPEG", quality=90))
        usable.append(name)
    color = (rng.random((70, 50, 3)) * 255).astype(np.uint8)
    (images / "gray.png").write_bytes(image_bytes(color[..., 0], "PNG"))
    (images / "palette.png").write_bytes(image_bytes(Image.fromarray(color).quantize(colors=8), "PNG"))
    (images / "cmyk.jpg").write_bytes(image_bytes(Image.fromarray(color).convert("CMYK"), "JPEG"))
    (images / "png_named.jpg").write_bytes(image_bytes(color, "PNG"))
    big = np.zeros((2000, 3000, 3), np.uint8)
    big[:, :, 0] = np.linspace(0, 255, 3000, dtype=np.uint8)
    (images / "big.jpg").write_bytes(image_bytes(big, "JPEG"))
    usable += ["gray.png", "palette.png", "cmyk.jpg", "png_named.jpg", "big.jpg"]
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("a caption file, not a picture\n")
    whole = (images / "photo_00.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    bad = {"empty.jpg": "empty", "text.jpg": "not an image", "truncated.jpg": "undecodable",
           "missing.jpg": "missing"}
    lines = ["image,caption"]
    for name in usable + sorted(bad):
        lines += [f"{name},a dog runs on the grass", f"{name},two people walk by a red house"]
    (data_dir / "captions.txt").write_text("\n".join(lines) + "\n")
    return data_dir, usable, bad


@pytest.fixture(scope="module")
def awkward_run(awkward_data, tmp_path_factory):
    from pipeline import extract

    data_dir, _, _ = awkward_data
    out = tmp_path_factory.mktemp("awkward") / "out"
    summary = extract.run_extract(data_dir, out, dict(OVERRIDES))
    return out, summary


def test_demo_extraction_matches_its_captions(extracted_out):
    from pipeline.data import features

    cache = features.read_features(extracted_out)
    captions = json.loads((extracted_out / "captions.json").read_text())
    expected_ids = {image["image_id"] for image in captions["images"]}
    assert sorted(cache.image_ids) == sorted(expected_ids) and len(cache.image_ids) == len(expected_ids)
    assert cache.features.shape == (len(expected_ids), 2048) and cache.features.dtype == np.float32
    assert np.isfinite(cache.features).all() and cache.features.std(axis=0).max() > 0
    assert cache.attrs["weights"] == "random" and cache.attrs["image_size"] == 224
    assert json.loads((extracted_out / "extract_errors.json").read_text()) == []
    config = json.loads((extracted_out / "config.json").read_text())
    assert config["data"]["layout"] == "kaggle" and Path(config["data"]["image_dir"]).is_absolute()
    assert json.loads((extracted_out / "vocab.json").read_text())["words"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]


def test_cache_schema_and_attributes(awkward_run):
    out, _ = awkward_run
    with h5py.File(out / "features.h5", "r") as handle:
        assert handle["features"].dtype == np.float32 and handle["features"].shape[1] == 2048
        assert handle["features"].maxshape == (None, 2048) and handle["features"].chunks is not None
        assert h5py.check_string_dtype(handle["image_ids"].dtype).encoding == "utf-8"
        attrs = dict(handle.attrs)
    for name in ("format", "version", "encoder", "weights", "image_size", "pooling", "dtype", "feature_dim",
                 "encoder_fingerprint", "tensorflow_version", "keras_version", "h5py_version", "num_rows"):
        assert name in attrs, name
    assert attrs["format"] == "captioner.features" and attrs["image_size"] == IMAGE_SIZE
    assert attrs["version"] == 2 and attrs["encoder_graph"] == "folded"
    assert attrs["num_rows"] == handle_rows(out)


def handle_rows(out):
    with h5py.File(out / "features.h5", "r") as handle:
        return handle["features"].shape[0]


def test_bad_images_are_reported_and_kept_out(awkward_data, awkward_run):
    from pipeline.data import features

    _, usable, bad = awkward_data
    out, summary = awkward_run
    cache = features.read_features(out)
    assert sorted(cache.image_ids) == sorted(usable)
    reported = json.loads((out / "extract_errors.json").read_text())
    reasons = {entry["image_id"]: entry["reason"] for entry in reported}
    assert set(reasons) == set(bad)
    for image_id, prefix in bad.items():
        assert reasons[image_id].startswith(prefix), (image_id, reasons[image_id])
    assert all(entry["path"].endswith(entry["image_id"]) for entry in reported)
    # The dataset leaves the absent file out of its images; the other bad files are tried.
    assert summary["images"] == len(usable) + len(bad) - 1 and summary["new"] == len(usable)
    assert summary["cached"] == 0 and summary["errors"] == len(bad)


def test_features_equal_the_encoder_on_the_decoded_image(awkward_data, awkward_run, folded_encoder):
    from models import encoder, image_decoding
    from pipeline.data import features

    data_dir, _, _ = awkward_data
    out, _ = awkward_run
    cache = features.read_features(out)
    model = folded_encoder
    assert encoder.encoder_fingerprint(model) == cache.attrs["encoder_fingerprint"]
    rows = cache.index()
    for image_id in ("photo_03.jpg", "gray.png", "palette.png", "png_named.jpg", "big.jpg", "cmyk.jpg"):
        pixels = image_decoding.decode_image((data_dir / "Images" / image_id).read_bytes(), IMAGE_SIZE)
        direct = np.asarray(model(pixels[None]))[0]
        np.testing.assert_allclose(cache.features[rows[image_id]], direct, rtol=1e-4, atol=1e-4, err_msg=image_id)


def test_rerun_adds_nothing_and_leaves_the_file_alone(awkward_data, awkward_run, copy_run):
    from pipeline import extract
    from pipeline.data import features

    data_dir, usable, _ = awkward_data
    out = copy_run(awkward_run[0])
    before = features.read_features(out)
    summary = extract.run_extract(data_dir, out, dict(OVERRIDES))
    assert summary["new"] == 0 and summary["cached"] == len(usable)
    after = features.read_features(out)
    assert after.image_ids == before.image_ids
    np.testing.assert_array_equal(after.features, before.features)


@pytest.mark.parametrize("change, attribute", [({"encoder.weights": "imagenet"}, "weights"),
                                               ({"encoder.image_size": 96}, "image_size"),
                                               ({"encoder.feature_dtype": "float16"}, "dtype")])
def test_other_encoder_settings_are_refused(awkward_data, awkward_run, copy_run, change, attribute):
    from pipeline import extract

    data_dir, _, _ = awkward_data
    out = copy_run(awkward_run[0])
    before = (out / "features.h5").read_bytes()
    with pytest.raises(ArtifactError) as raised:
        extract.run_extract(data_dir, out, {**OVERRIDES, **change})
    message = str(raised.value)
    assert "features.h5" in message and f"{attribute}=" in message
    assert "--overwrite" in message and "--out" in message
    assert (out / "features.h5").read_bytes() == before


def test_a_version_1_cache_is_read_and_rerun_but_not_extended(awkward_data, awkward_run, copy_run, folded_encoder):
    from pipeline import extract
    from pipeline.core import config
    from pipeline.data import features

    data_dir, usable, bad = awkward_data
    out = copy_run(awkward_run[0])
    cache_path = out / "features.h5"
    as_version_1(cache_path)
    cache = features.read_features(out)
    assert len(cache.image_ids) == len(usable) and features.cached_encoder_graph(cache.attrs) == "keras"
    encoder_config = config.EncoderConfig(weights="random", image_size=IMAGE_SIZE, batch_size=8, precision="fp32")
    image_ids = sorted(usable + [name for name in bad if name != "missing.jpg"])

    def rerun():
        return extract.extract_to_cache(data_dir / "Images", image_ids, cache_path, encoder_config,
                                        encoder_model=folded_encoder)

    # A rerun that adds no row (the bad images fail again) accepts the cache as it is.
    result = rerun()
    assert result["new"] == 0 and len(result["failures"]) == len(bad) - 1
    assert features.read_features(out).attrs == cache.attrs
    # One image lacking (its batch never counted): folded rows would join plain-graph ones.
    with h5py.File(cache_path, "a") as handle:
        handle.attrs["num_rows"] = len(usable) - 1
    with pytest.raises(ArtifactError) as raised:
        rerun()
    message = str(raised.value)
    assert str(cache_path) in message and "plain Keras ResNet50" in message and "cache version 1" in message
    assert "would add rows computed by the folded ResNet50" in message
    assert "--overwrite" in message and "train, evaluate and export" in message
    after = features.read_features(out)
    assert after.image_ids == cache.image_ids[:-1] and after.attrs == {**cache.attrs, "num_rows": len(usable) - 1}
    np.testing.assert_array_equal(after.features, cache.features[:-1])


def test_overwrite_replaces_the_cache_with_float16(awkward_data, awkward_run, copy_run):
    from pipeline import extract
    from pipeline.data import features

    data_dir, usable, _ = awkward_data
    out = copy_run(awkward_run[0])
    reference = features.read_features(out)
    summary = extract.run_extract(data_dir, out, {**OVERRIDES, "encoder.feature_dtype": "float16"}, overwrite=True)
    assert summary["new"] == len(usable)
    with h5py.File(out / "features.h5", "r") as handle:
        assert handle["features"].dtype == np.float16 and handle.attrs["dtype"] == "float16"
        half_storage = handle["features"].id.get_storage_size()
    with h5py.File(awkward_run[0] / "features.h5", "r") as handle:
        assert half_storage * 2 == handle["features"].id.get_storage_size()
    cache = features.read_features(out)
    assert cache.features.dtype == np.float32
    # Determinism: a second run from scratch, same rows in the same order; float16 rounding only.
    assert cache.image_ids == reference.image_ids
    np.testing.assert_allclose(cache.features, reference.features, rtol=2e-3, atol=2e-3)


def test_damaged_and_foreign_caches_raise_one_clear_error(tmp_path):
    from pipeline.data import features

    (tmp_path / "features.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ArtifactError, match="not a readable HDF5 feature cache") as raised:
        features.read_features(tmp_path)
    assert str(tmp_path / "features.h5") in str(raised.value)
    with h5py.File(tmp_path / "features.h5", "w") as handle:
        handle["features"] = np.zeros((2, 2048), np.float32)
    with pytest.raises(ArtifactError, match="not a Captioner feature cache"):
        features.read_features(tmp_path)
    with pytest.raises(ArtifactError, match="missing"):
        features.read_features(tmp_path / "elsewhere")


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from pipeline import extract
from pipeline.core import config
from pipeline.data import feature_writer

appends = []
original_append = feature_writer.FeatureWriter.append

def append_then_die(self, image_ids, vectors):
    if len(appends) == 2:
        # The third batch lands in the datasets but the process dies before it counts.
        stop = self.num_rows + len(image_ids)
        self._features.resize(stop, axis=0)
        self._image_ids.resize(stop, axis=0)
        self._features[self.num_rows:stop] = vectors
        self._image_ids[self.num_rows:stop] = list(image_ids)
        self._handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    appends.append(len(image_ids))
    original_append(self, image_ids, vectors)

feature_writer.FeatureWriter.append = append_then_die
image_dir, cache = Path(sys.argv[1]), Path(sys.argv[2])
ids = sorted(path.name for path in image_dir.glob("photo_*.jpg"))
extract.extract_to_cache(image_dir, ids, cache,
                         config.EncoderConfig(weights="random", image_size=64, batch_size=4, precision="fp32"))
"""


def test_a_run_killed_mid_batch_keeps_what_it_counted(awkward_data, awkward_run, tmp_path):
    from pipeline import extract
    from pipeline.core import config
    from pipeline.data import features

    data_dir, _, _ = awkward_data
    cache_path = tmp_path / "features.h5"
    completed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(data_dir / "Images"), str(cache_path)],
                               cwd=REPOSITORY, capture_output=True, text=True, check=False)
    assert completed.returncode == -signal.SIGKILL, completed.stderr
    with h5py.File(cache_path, "r") as handle:
        assert handle["features"].shape[0] == 12 and handle.attrs["num_rows"] == 8
    partial = features.read_features(None, path=cache_path)
    assert len(partial.image_ids) == 8
    ids = sorted(path.name for path in (data_dir / "Images").glob("photo_*.jpg"))
    result = extract.extract_to_cache(data_dir / "Images", ids, cache_path,
                                      config.EncoderConfig(weights="random", image_size=IMAGE_SIZE, batch_size=8,
                                                           precision="fp32"))
    assert result["new"] == len(ids) - 8 and result["cached"] == 8
    resumed = features.read_features(None, path=cache_path)
    assert sorted(resumed.image_ids) == ids
    full = features.read_features(awkward_run[0])
    rows = full.index()
    np.testing.assert_allclose(resumed.features, full.features[[rows[image_id] for image_id in resumed.image_ids]],
                               rtol=1e-4, atol=1e-4)


def test_image_pipeline_runs_untuned_on_every_core_and_traces_decoding_once(awkward_data):
    # tf.data's autotuner made releasing a finished iterator wait up to ~10 s (see
    # pipeline/core/tf_data.py); the pipeline sets its parallelism itself instead.
    import tensorflow as tf

    from pipeline import extract
    from pipeline.core import tf_data

    data_dir, usable, _ = awkward_data
    datasets = [extract.image_dataset(data_dir / "Images", usable[:3], IMAGE_SIZE, batch_size=2) for _ in range(2)]
    options = datasets[0].options()
    assert options.autotune.enabled is False
    assert options.threading.max_intra_op_parallelism == 1
    ids, images = next(iter(datasets[1]))
    assert [value.decode() for value in ids.numpy()] == usable[:2]
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == tf.float32
    # Two datasets, one trace of read + decode (which alone takes ~0.25 s at every start).
    read_and_decode = extract._read_and_decode_function(IMAGE_SIZE)
    assert read_and_decode is extract._read_and_decode_function(IMAGE_SIZE)
    assert read_and_decode.experimental_get_tracing_count() == 1
    assert tf_data.cpu_count() >= 1


def test_progress_reports_rate_and_eta():
    from pipeline.core import progress

    now = [100.0]
    stream = io.StringIO()
    reporter = progress.Progress(total=30, label="extract", unit="images", stream=stream, interval=0.0,
                                 clock=lambda: now[0])
    now[0] = 105.0  # set-up time before the first batch is not counted in the rate
    reporter.update(10)
    now[0] = 106.0
    reporter.update(10)
    assert reporter.rate() == pytest.approx(10.0) and reporter.eta() == pytest.approx(1.0)
    now[0] = 107.0
    reporter.update(10)
    reporter.close()
    assert stream.getvalue().splitlines() == [
        "extract 10/30 images (33%) - images/s ETA ?",
        "extract 20/30 images (67%) 10.0 images/s ETA 1s",
        "extract 30/30 images (100%) 10.0 images/s ETA 0s",
    ]
    assert progress.format_duration(3725) == "1h02m" and progress.format_duration(65) == "1m05s"
    # Everything finished in one update: the rate since construction, not "- images/s".
    stream = io.StringIO()
    now[0] = 200.0
    reporter = progress.Progress(total=60, label="evaluate", unit="images", stream=stream, clock=lambda: now[0])
    now[0] = 203.0
    reporter.update(60)
    reporter.close()
    assert stream.getvalue().splitlines() == ["evaluate 60/60 images (100%) 20.0 images/s ETA 0s"]


def test_bf16_extraction_records_its_precision_and_matches_fp32(awkward_data, awkward_run, copy_run, tmp_path):
    import keras

    from pipeline import extract
    from pipeline.core import device
    from pipeline.data import features

    data_dir, usable, _ = awkward_data
    out = tmp_path / "bf16"
    summary = extract.run_extract(data_dir, out, {**OVERRIDES, "encoder.precision": "bf16"})
    assert summary["new"] == len(usable) and summary["errors"] == 4
    # The mixed policy was set for the encoder's layers only, not left behind for later models.
    assert keras.config.dtype_policy().name == "float32"
    with h5py.File(out / "features.h5", "r") as handle:
        assert handle["features"].dtype == np.float32 and handle.attrs["precision"] == "bf16"
    assert json.loads((out / "config.json").read_text())["encoder"]["precision"] == "bf16"
    bf16, fp32 = features.read_features(out), features.read_features(awkward_run[0])
    assert bf16.image_ids == fp32.image_ids
    assert not np.array_equal(bf16.features, fp32.features)  # it did compute in bfloat16
    cosine = (bf16.features * fp32.features).sum(1) / (
        np.linalg.norm(bf16.features, axis=1) * np.linalg.norm(fp32.features, axis=1))
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.98, cosine

    # A cache of one precision is not extended at another; "auto" means this machine's choice.
    with pytest.raises(ArtifactError, match="precision='bf16'.*precision='fp32'") as raised:
        extract.run_extract(data_dir, copy_run(out), {**OVERRIDES, "encoder.precision": "fp32"})
    assert "--precision bf16" in str(raised.value)
    fp32_out = copy_run(awkward_run[0])
    with pytest.raises(ArtifactError, match="precision='fp32'.*precision='bf16'"):
        extract.run_extract(data_dir, fp32_out, {**OVERRIDES, "encoder.precision": "bf16"})
    # A refused run leaves the settings that made the artifacts in config.json.
    assert json.loads((fp32_out / "config.json").read_text())["encoder"]["precision"] == "fp32"
    auto_out = tmp_path / "auto"
    shutil.copytree(out, auto_out)
    if device.resolve_precision("auto") == "bf16":  # this machine: AMX-BF16 (see test_device)
        assert extract.run_extract(data_dir, auto_out, {**OVERRIDES, "encoder.precision": "auto"})["new"] == 0
        assert json.loads((auto_out / "config.json").read_text())["encoder"]["precision"] == "bf16"
    else:
        with pytest.raises(ArtifactError, match="precision="):
            extract.run_extract(data_dir, auto_out, {**OVERRIDES, "encoder.precision": "auto"})
