"""Shared fixtures: one small generated dataset and one extract/train/export chain per
test session, so the expensive steps (ResNet50 build, extraction, training, export) run
once. Tests that change artifacts copy them first (`copy_run`)."""

import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

# Small, fast settings shared by the session's chain of stages.
TEST_NUM_IMAGES = 48
# fp32, not the machine's "auto": the session's features equal the fp32 encoder's (bf16: tests/test_precision.py).
EXTRACT_OVERRIDES = {"encoder.weights": "random", "encoder.batch_size": 8, "text.min_word_count": 1,
                     "encoder.precision": "fp32"}
TRAIN_OVERRIDES = {
    "train.epochs": 3,
    # 36 train images x 5 captions / 32 = 6 steps an epoch: three validation periods.
    "train.validate_every_steps": 6,
    "train.batch_size": 32,
    "decoder.units": 64,
    "decoder.embedding_dim": 32,
    "decoder.dropout": 0.1,
    "train.precision": "fp32",  # not the machine's "auto": exact comparisons (bf16: tests/test_precision.py)
}
# Small fine-tuning steps (6 images x 5 samples): 6 steps per epoch on the 36 training images;
# fp32 as in TRAIN_OVERRIDES: runs compared with each other compute alike (bf16: tests/test_precision.py).
FINETUNE_SETTINGS = {"finetune.epochs": 2, "finetune.batch_size": 6, "finetune.learning_rate": 5e-3,
                     "finetune.precision": "fp32"}


# ResNet50 costs seconds to build: the folded encoder of the encoder and extract tests is built once.
FOLDED_ENCODER_IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def folded_encoder():
    """The encoder `extract` builds for `--weights random` at FOLDED_ENCODER_IMAGE_SIZE px:
    ResNet50 of seed 0, BatchNorm folded (keras.Model, float32 [B, 64, 64, 3] pixels in
    0..255 -> float32 [B, 2048]). Shared: do not change its weights."""
    from models import encoder

    return encoder.build_encoder(None, FOLDED_ENCODER_IMAGE_SIZE, seed=0)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """A generated demo dataset in the Kaggle layout (Images/ + captions.txt)."""
    from pipeline.data import demo_data

    return demo_data.generate_demo_dataset(
        tmp_path_factory.mktemp("demo") / "data", seed=0, num_images=TEST_NUM_IMAGES
    )


@pytest.fixture(scope="session")
def extracted_out(demo_data_dir, tmp_path_factory):
    """OUT after `extract --weights random` on the demo dataset (read-only: copy to change)."""
    from pipeline import extract

    out = tmp_path_factory.mktemp("run") / "extracted"
    extract.run_extract(demo_data_dir, out, dict(EXTRACT_OVERRIDES))
    return out


@pytest.fixture(scope="session")
def trained_out(extracted_out, tmp_path_factory):
    """OUT after extract and a short `train` (read-only: copy to change)."""
    from pipeline import train

    out = tmp_path_factory.mktemp("run") / "trained"
    shutil.copytree(extracted_out, out)
    train.run_train(out, dict(TRAIN_OVERRIDES))
    return out


@pytest.fixture(scope="session")
def finetuned(trained_out, tmp_path_factory):
    """(OUT after an uninterrupted 2-epoch fine-tuning and `evaluate`, the summary, the
    original decoder bytes); read-only: copy to change."""
    from pipeline.core import config as config_module
    from pipeline import evaluate, finetune

    out = tmp_path_factory.mktemp("finetune") / "run"
    shutil.copytree(trained_out, out)
    config_module.PipelineConfig.load(out).replace(FINETUNE_SETTINGS).save(out)
    original = (out / "decoder.keras").read_bytes()
    summary = finetune.run_finetune(out, {})
    evaluate.run_evaluate(out, {"decode.beam_size": 1})
    return out, summary, original


@pytest.fixture(scope="session")
def exported_out(trained_out, tmp_path_factory):
    """OUT after extract, train and `export`; the SavedModel is at OUT/saved_model."""
    from pipeline import export

    out = tmp_path_factory.mktemp("run") / "exported"
    shutil.copytree(trained_out, out)
    export.run_export(out, {})
    return out


@pytest.fixture(scope="session")
def exported_captioner(exported_out):
    """The SavedModel of `exported_out`, loaded once (an exported_model.ExportedCaptioner) for in-process servers."""
    from pipeline.serving import exported_model

    return exported_model.ExportedCaptioner(exported_out / "saved_model")


@pytest.fixture
def copy_run(tmp_path):
    """copy_run(out) -> a private copy of a session run folder, safe to change."""

    def copy(out):
        target = tmp_path / f"copy_{out.name}"
        shutil.copytree(out, target)
        return target

    return copy


# A second, smaller dataset for tests that run `extract` in subprocesses (kills, shards,
# full disk): plain 64x64 PNGs, fast to decode, batches of two so a run has many steps.
SMALL_NUM_IMAGES = 32
SMALL_EXTRACT_FLAGS = ["--weights", "random", "--extract-batch-size", "2", "--min-word-count", "1",
                       "--precision", "fp32"]
SMALL_EXTRACT_OVERRIDES = {"encoder.weights": "random", "encoder.batch_size": 2, "text.min_word_count": 1,
                           "encoder.precision": "fp32"}


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """SMALL_NUM_IMAGES plain 64x64 PNGs in the Kaggle layout, two captions each."""
    import numpy as np
    from PIL import Image

    data_dir = tmp_path_factory.mktemp("small") / "data"
    (data_dir / "Images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["image,caption"]
    for index in range(SMALL_NUM_IMAGES):
        colour = ("red", "green", "blue")[index % 3]
        pixels = np.broadcast_to((rng.random(3) * 255).astype(np.uint8), (64, 64, 3))
        Image.fromarray(np.ascontiguousarray(pixels)).save(data_dir / "Images" / f"plain_{index:02d}.png")
        lines += [f"plain_{index:02d}.png,a {colour} picture", f"plain_{index:02d}.png,one plain {colour} square"]
    (data_dir / "captions.txt").write_text("\n".join(lines) + "\n")
    return data_dir


@pytest.fixture(scope="session")
def reference_cache(small_data, tmp_path_factory):
    """features.h5 of an uninterrupted extraction of `small_data` (a FeatureCache)."""
    from pipeline import extract
    from pipeline.data import features

    out = tmp_path_factory.mktemp("small") / "reference"
    extract.run_extract(small_data, out, dict(SMALL_EXTRACT_OVERRIDES))
    cache = features.read_features(out)
    assert len(cache.image_ids) == SMALL_NUM_IMAGES
    return cache
