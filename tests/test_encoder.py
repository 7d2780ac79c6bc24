"""models.encoder: the ResNet50 builder, BatchNorm folding and the weights fingerprint.

ResNet50 costs seconds to build, so small (64 px) seeded encoders are shared: the folded
one `build_encoder` makes by default (the session's `folded_encoder`), and a plain one
whose BatchNorm layers have random statistics (the reference the folded forms are
compared with), built once by this module.
"""

import ast
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import FOLDED_ENCODER_IMAGE_SIZE

IMAGE_SIZE = FOLDED_ENCODER_IMAGE_SIZE
RESNET50_PAIRS = 53  # Conv2D -> BatchNormalization pairs of Keras' ResNet50: all of its BatchNorms
REPOSITORY = Path(__file__).resolve().parents[1]
FINGERPRINT_SCRIPT = (
    "import os, sys; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3';"
    "from models import encoder;"
    f"print(*(encoder.encoder_fingerprint(encoder.build_encoder(None, {IMAGE_SIZE}, seed=seed)) for seed in (0, 1)))"
)


@pytest.fixture(scope="module")
def plain_model():
    """The plain Keras encoder of seed 0 (the convolutions of `folded_encoder`), every
    BatchNormalization with random statistics: an identity one would hide a folding bug."""
    from models import encoder

    model = encoder.build_encoder(None, IMAGE_SIZE, seed=0, folded=False)
    assert encoder.randomize_batch_normalization(model, seed=1) == RESNET50_PAIRS
    return model


@pytest.fixture(scope="module")
def photo_pixels():
    """float32 [4, 64, 64, 3]: photo-like 500x375 JPEGs through `decode_image`."""
    import tensorflow as tf

    from benchmarks import photos
    from models import image_decoding

    generator = np.random.default_rng(5)
    return tf.stack([image_decoding.decode_image(photos.photo_jpeg(500, 375, generator), IMAGE_SIZE)
                     for _ in range(4)]).numpy()


def _cosines(first, second):
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    return (first * second).sum(1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))


def test_random_weights_are_identical_in_separate_processes(folded_encoder):
    from models import encoder

    # A fresh interpreter builds seeds 0 and 1; this process built seed 0 too.
    completed = subprocess.run([sys.executable, "-c", FINGERPRINT_SCRIPT], cwd=REPOSITORY,
                               capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    seed_zero, seed_one = completed.stdout.strip().splitlines()[-1].split()
    here = encoder.encoder_fingerprint(folded_encoder)
    assert len(here) == 16 and int(here, 16) >= 0
    assert seed_zero == here
    assert seed_one != here


def test_encoder_applies_resnet_preprocessing_inside(folded_encoder):
    rng = np.random.default_rng(1)
    pixels = (rng.random((3, IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype(np.float32)
    output = np.asarray(folded_encoder(pixels))
    assert output.shape == (3, 2048) and output.dtype == np.float32
    # Caffe preprocessing by hand: RGB -> BGR, ImageNet channel means subtracted.
    by_hand = pixels[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
    backbone_output = np.asarray(folded_encoder.get_layer("resnet50")(by_hand))
    np.testing.assert_allclose(output, backbone_output, rtol=1e-5, atol=1e-4)
    assert not np.allclose(output[0], output[1])  # different images, different features


def test_fingerprint_changes_with_any_weight(plain_model):
    from models import encoder

    before = encoder.encoder_fingerprint(plain_model)
    variable = plain_model.weights[-1]
    original = np.asarray(variable.value).copy()
    changed = original.copy()
    changed.flat[0] += 1e-3
    variable.assign(changed)
    try:
        assert encoder.encoder_fingerprint(plain_model) != before
    finally:
        variable.assign(original)
    assert encoder.encoder_fingerprint(plain_model) == before


def test_weights_file_round_trip(plain_model, tmp_path):
    from models import encoder
    from pipeline.core import encoder_loading

    weights_file = tmp_path / "resnet50_notop.weights.h5"  # Keras 3's own format
    plain_model.get_layer("resnet50").save_weights(weights_file)
    loaded = encoder_loading.load_encoder(str(weights_file), IMAGE_SIZE)
    assert encoder.encoder_fingerprint(loaded) == encoder.encoder_fingerprint(plain_model)


def test_bad_arguments_are_value_errors_before_any_building():
    from models import encoder

    for arguments, message in (
        ({"image_size": 8}, "encoder.image_size must be an integer >= 32"),
        ({"image_size": 64.0}, "encoder.image_size must be an integer >= 32"),
        ({"precision": "auto"}, "encoder precision must be one of bf16, fp16, fp32, got 'auto'"),
        ({"weights": "random"}, "encoder weights must be None"),  # a user's string: `encoder_loading` reads it
        ({"weights": "resnet50_notop.h5"}, "encoder weights must be None"),
    ):
        with pytest.raises(ValueError, match=message):
            encoder.build_encoder(**{"image_size": IMAGE_SIZE, **arguments})


def test_models_import_nothing_from_pipeline():
    """`models/` builds and computes: the stages depend on it, never the other way round."""
    for path in sorted((REPOSITORY / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(name == "pipeline" or name.startswith("pipeline.") for name in names), (
                f"{path.name}:{node.lineno} imports {names}")


def test_folding_covers_every_batch_normalization_and_keeps_the_features(plain_model, folded_encoder, photo_pixels):
    import keras

    from models import encoder

    backbone = plain_model.get_layer("resnet50")
    folded_backbone, pairs = encoder.fold_batch_normalization(backbone)
    assert len(pairs) == RESNET50_PAIRS and pairs[0] == ("conv1_conv", "conv1_bn")
    assert pairs[-1] == ("conv5_block3_3_conv", "conv5_block3_3_bn")
    layer_types = [type(layer) for layer in folded_backbone.layers]
    assert keras.layers.BatchNormalization not in layer_types
    convolutions = [layer for layer in folded_backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convolutions) == RESNET50_PAIRS and all(layer.use_bias for layer in convolutions)
    assert len(folded_backbone.layers) == len(backbone.layers) - RESNET50_PAIRS

    folded = encoder.fold_encoder(plain_model)
    assert encoder.encoder_graph(folded) == "folded" and encoder.encoder_graph(plain_model) == "keras"
    # The fingerprint names the source weights, folded or not.
    assert encoder.encoder_fingerprint(folded) == encoder.encoder_fingerprint(plain_model)
    reference = np.asarray(plain_model(photo_pixels))
    assert encoder.encoder_graph(folded_encoder) == "folded"
    for candidate in (folded, folded_backbone):
        inputs = photo_pixels if candidate is folded else keras.applications.resnet50.preprocess_input(photo_pixels)
        assert _cosines(candidate(inputs), reference).min() >= 0.99999
    # The statistics matter: the same convolutions with identity BatchNorms give other features.
    assert _cosines(folded_encoder(photo_pixels), reference).max() < 0.99


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_folded_reduced_precision_matches_plain_fp32_without_changing_the_global_policy(
        plain_model, photo_pixels, precision):
    import keras

    from models import encoder

    # fp16 convolutions run on this CPU too (slowly: no native fp16 arithmetic here).
    plain = encoder.build_encoder(None, IMAGE_SIZE, seed=0, precision=precision, folded=False)
    plain.set_weights(plain_model.get_weights())
    folded = encoder.fold_encoder(plain)
    assert keras.config.dtype_policy().name == "float32"
    assert keras.layers.Dense(2).compute_dtype == "float32"  # a decoder built next is float32
    convolution = folded.get_layer("resnet50").get_layer("conv2_block1_1_conv")
    compute_dtype = {"bf16": "bfloat16", "fp16": "float16"}[precision]
    assert convolution.compute_dtype == compute_dtype and convolution.variable_dtype == "float32"
    # Same weights as fp32 (precision is arithmetic only), float32 output close to fp32's.
    assert encoder.encoder_fingerprint(folded) == encoder.encoder_fingerprint(plain_model)
    output, reference = np.asarray(folded(photo_pixels)), np.asarray(plain_model(photo_pixels))
    assert output.dtype == np.float32 and np.isfinite(output).all() and not np.array_equal(output, reference)
    assert _cosines(output, reference).min() >= 0.999


def _write_legacy_notop_h5(backbone, path):
    """Writes `backbone`'s weights as Keras' download resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5
    lays them out (Keras 2's HDF5 weights format): the file's `layer_names` attribute lists every
    layer in order; each layer's group lists its `weight_names` and holds each weight under that name."""
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = np.array([layer.name.encode("utf-8") for layer in backbone.layers])
        handle.attrs["backend"] = b"tensorflow"
        handle.attrs["keras_version"] = b"2.2.4"
        for layer in backbone.layers:
            group = handle.create_group(layer.name)
            names = [f"{layer.name}/{variable.name}:0" for variable in layer.weights]
            group.attrs["weight_names"] = np.array([name.encode("utf-8") for name in names])
            for name, variable in zip(names, layer.weights):
                group.create_dataset(name, data=np.asarray(variable.numpy()))


def test_a_legacy_notop_weights_file_loads_and_folds(plain_model, photo_pixels, tmp_path):
    from models import encoder
    from pipeline.core import encoder_loading

    weights_file = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    _write_legacy_notop_h5(plain_model.get_layer("resnet50"), weights_file)
    with h5py.File(weights_file, "r") as handle:  # the layout, as the real download has it
        assert list(handle.attrs["layer_names"][1:3]) == [b"conv1_pad", b"conv1_conv"]
        assert list(handle["conv1_bn"].attrs["weight_names"]) == [
            b"conv1_bn/gamma:0", b"conv1_bn/beta:0", b"conv1_bn/moving_mean:0", b"conv1_bn/moving_variance:0"]
        assert handle["conv1_conv"]["conv1_conv"]["kernel:0"].shape == (7, 7, 3, 64)
    loaded = encoder_loading.load_encoder(str(weights_file), IMAGE_SIZE)
    assert encoder.encoder_graph(loaded) == "folded"
    assert encoder.encoder_fingerprint(loaded) == encoder.encoder_fingerprint(plain_model)
    assert _cosines(loaded(photo_pixels), plain_model(photo_pixels)).min() >= 0.99999


def test_folding_leaves_the_pairs_it_cannot_fold():
    import keras

    from models import encoder

    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    activated = keras.layers.Conv2D(4, 3, activation="relu", name="with_relu")(inputs)
    first = keras.layers.BatchNormalization(name="after_relu")(activated)  # the ReLU is in between
    second = keras.layers.BatchNormalization(name="foldable")(keras.layers.Conv2D(4, 1, name="plain")(first))
    shared = keras.layers.Conv2D(4, 1, name="read_twice")(second)
    third = keras.layers.BatchNormalization(name="beside_an_add")(shared)  # the Add reads the conv too
    model = keras.Model(inputs, keras.layers.Add()([shared, third]))
    generator = np.random.default_rng(4)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([generator.uniform(0.5, 1.5, 4), generator.normal(0, 0.2, 4),
                               generator.normal(0, 0.5, 4), generator.uniform(0.5, 2.0, 4)])
    folded, pairs = encoder.fold_batch_normalization(model)
    assert pairs == [("plain", "foldable")]
    kept = {layer.name for layer in folded.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert kept == {"after_relu", "beside_an_add"}
    pixels = generator.normal(0, 1, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(folded(pixels), model(pixels), rtol=1e-5, atol=1e-5)
