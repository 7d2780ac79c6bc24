"""models.encoder: the ResNet50 builder, BatchNorm folding, image decoding and the weights fingerprint.

ResNet50 costs seconds to build, so small (64 px) seeded encoders are shared by the module:
the folded one `build_encoder` makes by default, and a plain one whose BatchNorm layers
have random statistics (the reference the folded forms are compared with).
"""

import io
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import PipelineError

IMAGE_SIZE = 64
RESNET50_PAIRS = 53  # Conv2D -> BatchNormalization pairs of Keras' ResNet50: all of its BatchNorms
REPOSITORY = Path(__file__).resolve().parents[1]
FINGERPRINT_SCRIPT = (
    "import os, sys; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3';"
    "from models import encoder;"
    "print(*(encoder.encoder_fingerprint(encoder.build_encoder('random', 64, seed=seed)) for seed in (0, 1)))"
)


@pytest.fixture(scope="module")
def encoder_model():
    from models import encoder

    return encoder.build_encoder("random", IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def plain_model():
    """The plain Keras encoder of seed 0 (the convolutions of `encoder_model`), every
    BatchNormalization with random statistics: an identity one would hide a folding bug."""
    from models import encoder

    model = encoder.build_encoder("random", IMAGE_SIZE, seed=0, folded=False)
    assert encoder.randomize_batch_normalization(model, seed=1) == RESNET50_PAIRS
    return model


@pytest.fixture(scope="module")
def photo_pixels():
    """float32 [4, 64, 64, 3]: photo-like 500x375 JPEGs through `decode_image`."""
    import tensorflow as tf

    from benchmarks import photos
    from models import encoder

    generator = np.random.default_rng(5)
    return tf.stack([encoder.decode_image(photos.photo_jpeg(500, 375, generator), IMAGE_SIZE)
                     for _ in range(4)]).numpy()


def _cosines(first, second):
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    return (first * second).sum(1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))


def _encoded(array, file_format, **options):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, file_format, **options)
    return buffer.getvalue()


def _pil_reference(data, image_size):
    """PIL's decoding of `data`, resized by our own resize: what decode_image must give."""
    from models import encoder

    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    return encoder.resize_image(pixels, image_size).numpy()


def test_random_weights_are_identical_in_separate_processes(encoder_model):
    from models import encoder

    # A fresh interpreter builds seeds 0 and 1; this process built seed 0 too.
    completed = subprocess.run([sys.executable, "-c", FINGERPRINT_SCRIPT], cwd=REPOSITORY,
                               capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    seed_zero, seed_one = completed.stdout.strip().splitlines()[-1].split()
    here = encoder.encoder_fingerprint(encoder_model)
    assert len(here) == 16 and int(here, 16) >= 0
    assert seed_zero == here
    assert seed_one != here


def test_encoder_applies_resnet_preprocessing_inside(encoder_model):
    rng = np.random.default_rng(1)
    pixels = (rng.random((3, IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype(np.float32)
    output = np.asarray(encoder_model(pixels))
    assert output.shape == (3, 2048) and output.dtype == np.float32
    # Caffe preprocessing by hand: RGB -> BGR, ImageNet channel means subtracted.
    by_hand = pixels[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
    backbone_output = np.asarray(encoder_model.get_layer("resnet50")(by_hand))
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


def test_weights_file_round_trip_and_bad_files(plain_model, tmp_path):
    from models import encoder

    weights_file = tmp_path / "resnet50_notop.weights.h5"  # Keras 3's own format
    plain_model.get_layer("resnet50").save_weights(weights_file)
    loaded = encoder.build_encoder(str(weights_file), IMAGE_SIZE)
    assert encoder.encoder_fingerprint(loaded) == encoder.encoder_fingerprint(plain_model)

    with pytest.raises(PipelineError, match="no such file") as raised:
        encoder.build_encoder(str(tmp_path / "absent.h5"), IMAGE_SIZE)
    assert "absent.h5" in str(raised.value) and "--weights random" in str(raised.value)

    not_weights = tmp_path / "notes.h5"
    not_weights.write_text("these are not weights")
    with pytest.raises(PipelineError, match="not ResNet50 notop weights") as raised:
        encoder.build_encoder(str(not_weights), IMAGE_SIZE)
    assert str(not_weights) in str(raised.value)


def test_imagenet_download_failure_names_the_alternatives(tmp_path, monkeypatch):
    from models import encoder

    # An empty Keras cache: a copy of the weights elsewhere must not hide the failure.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(PipelineError) as raised:
        encoder.build_encoder("imagenet", IMAGE_SIZE)
    message = str(raised.value)
    assert "ImageNet weights" in message and "could not be downloaded" in message
    assert "--weights FILE.h5" in message and "--weights random" in message
    assert "URL fetch failure" in message  # the cause is kept


def test_bad_precision_and_image_size_are_refused():
    from models import encoder

    with pytest.raises(PipelineError, match="encoder.precision"):
        encoder.build_encoder("random", IMAGE_SIZE, precision="fp8")
    with pytest.raises(PipelineError, match="encoder.image_size"):
        encoder.build_encoder("random", 8)


@pytest.mark.parametrize(
    "name, make, tolerance",
    [
        ("rgb png", lambda rgb: _encoded(rgb, "PNG"), 1e-3),
        ("grayscale png", lambda rgb: _encoded(rgb[..., 0], "PNG"), 1e-3),
        ("palette png", None, 1e-3),
        ("16-bit png", lambda rgb: _encoded((rgb[..., 0].astype(np.uint16) * 257), "PNG"), 1.0),
        ("bmp", lambda rgb: _encoded(rgb, "BMP"), 1e-3),
        ("jpeg", lambda rgb: _encoded(rgb, "JPEG", quality=95), 4.0),
        ("cmyk jpeg", None, 4.0),
        ("gif first frame", None, 1e-3),
    ],
)
def test_decode_image_matches_pil(name, make, tolerance):
    from models import encoder

    rng = np.random.default_rng(2)
    # Smooth content, so JPEG decoders that differ in rounding stay close.
    gradient = np.linspace(0, 255, 90, dtype=np.float32)
    rgb = np.stack(
        [np.add.outer(np.linspace(0, 80, 60), gradient * 0.6), np.tile(gradient, (60, 1)),
         np.full((60, 90), 60.0) + rng.random((60, 90)) * 4], axis=-1
    ).clip(0, 255).astype(np.uint8)
    if name == "palette png":
        data = _encoded_image(Image.fromarray(rgb).quantize(colors=16), "PNG")
    elif name == "cmyk jpeg":
        data = _encoded_image(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    elif name == "gif first frame":
        frames = [Image.fromarray(rgb).quantize(colors=32), Image.fromarray(255 - rgb).quantize(colors=32)]
        buffer = io.BytesIO()
        frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
        data = buffer.getvalue()
    else:
        data = make(rgb)
    decoded = encoder.decode_image(data, 32).numpy()
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.float32
    assert 0.0 <= decoded.min() and decoded.max() <= 255.0
    if name == "16-bit png":
        # PIL clips 16-bit values to 255 when converting to RGB; TF scales them (v / 257).
        expected = encoder.resize_image(np.repeat(rgb[..., :1], 3, axis=-1), 32).numpy()
    else:
        expected = _pil_reference(data, 32)
    assert np.abs(decoded - expected).mean() <= tolerance, name


def _encoded_image(image, file_format, **options):
    buffer = io.BytesIO()
    image.save(buffer, file_format, **options)
    return buffer.getvalue()


def test_decode_image_squashes_without_keeping_aspect_ratio():
    from models import encoder

    # Left half black, right half white: a squash keeps the split in the middle column.
    wide = np.zeros((40, 400, 3), np.uint8)
    wide[:, 200:] = 255
    decoded = encoder.decode_image(_encoded(wide, "PNG"), 20).numpy()
    assert decoded.shape == (20, 20, 3)
    assert decoded[:, :9].max() < 1.0 and decoded[:, 11:].min() > 254.0


def test_decode_image_rejects_what_is_not_a_whole_image():
    import tensorflow as tf

    from models import encoder

    jpeg = _encoded((np.random.default_rng(3).random((80, 80, 3)) * 255).astype(np.uint8), "JPEG")
    for data in (b"", b"plain text, not an image", jpeg[: len(jpeg) // 2]):
        with pytest.raises(tf.errors.InvalidArgumentError):
            encoder.decode_image(data, 32)


def test_auto_precision_follows_the_cpu_flags(tmp_path, monkeypatch):
    from models import encoder

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    header = "processor\t: 0\nmodel name\t: Some CPU\n"
    cpuinfo.write_text(header + "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n" + "processor\t: 1\n")
    assert encoder.cpu_flags(cpuinfo) >= {"avx2", "avx512_bf16"}
    assert encoder.resolve_precision("auto", cpuinfo) == "bf16"
    cpuinfo.write_text(header + "flags\t\t: fpu sse2 avx2 amx_tile amx_bf16\n")
    assert encoder.resolve_precision("auto", cpuinfo) == "bf16"
    cpuinfo.write_text(header + "flags\t\t: fpu sse2 avx2 avx512f avx512_fp16\n")
    assert encoder.resolve_precision("auto", cpuinfo) == "fp32"
    assert encoder.resolve_precision("auto", tmp_path / "absent") == "fp32"  # not Linux
    # Explicit names pass through whatever the machine.
    assert encoder.resolve_precision("fp16", cpuinfo) == "fp16"
    # Without oneDNN, TF emulates bfloat16 convolutions: slower than float32.
    cpuinfo.write_text(header + "flags\t\t: avx512_bf16 amx_bf16\n")
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert encoder.resolve_precision("auto", cpuinfo) == "fp32"
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    # The real /proc/cpuinfo (the development host, an AMD EPYC Zen 5, has avx512_bf16 and no AMX: "bf16").
    machine_flags = encoder.cpu_flags()
    assert bool(machine_flags) == Path(encoder.CPUINFO_PATH).is_file()
    import tensorflow as tf

    expected = "bf16" if machine_flags & set(encoder.BF16_CPU_FLAGS) else "fp32"
    assert encoder.resolve_precision("auto") == ("fp16" if tf.config.list_physical_devices("GPU") else expected)


def test_decode_image_refuses_a_header_that_declares_too_many_pixels():
    """A tiny PNG whose IHDR declares 20000 x 20000 is refused before decoding (graph-side)."""
    import io
    import struct

    import tensorflow as tf
    from PIL import Image

    from models import encoder

    buffer = io.BytesIO()
    Image.new("RGB", (10, 10), (1, 2, 3)).save(buffer, format="PNG")
    bomb = bytearray(buffer.getvalue())
    bomb[16:24] = struct.pack(">II", 20000, 20000)
    assert int(encoder.declared_pixels(tf.constant(bytes(bomb)))) == 20000 * 20000
    decode = tf.function(lambda data: encoder.decode_image(data, 8), input_signature=[tf.TensorSpec([], tf.string)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="megapixels"):
        decode(tf.constant(bytes(bomb)))
    for image_format, mode in (("JPEG", "RGB"), ("PNG", "RGB"), ("GIF", "P"), ("BMP", "RGB")):
        buffer = io.BytesIO()
        Image.new(mode, (37, 23)).save(buffer, format=image_format)
        assert int(encoder.declared_pixels(tf.constant(buffer.getvalue()))) == 37 * 23, image_format
        assert decode(tf.constant(buffer.getvalue())).shape == (8, 8, 3)
    assert int(encoder.declared_pixels(tf.constant(b"abc"))) == 0


def test_folding_covers_every_batch_normalization_and_keeps_the_features(plain_model, encoder_model, photo_pixels):
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
    assert encoder.encoder_graph(encoder_model) == "folded"
    for candidate in (folded, folded_backbone):
        inputs = photo_pixels if candidate is folded else keras.applications.resnet50.preprocess_input(photo_pixels)
        assert _cosines(candidate(inputs), reference).min() >= 0.99999
    # The statistics matter: the same convolutions with identity BatchNorms give other features.
    assert _cosines(encoder_model(photo_pixels), reference).max() < 0.99


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_folded_reduced_precision_matches_plain_fp32_without_changing_the_global_policy(
        plain_model, photo_pixels, precision):
    import keras

    from models import encoder

    # fp16 convolutions run on this CPU too (slowly: no native fp16 arithmetic here).
    plain = encoder.build_encoder("random", IMAGE_SIZE, seed=0, precision=precision, folded=False)
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

    weights_file = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    _write_legacy_notop_h5(plain_model.get_layer("resnet50"), weights_file)
    with h5py.File(weights_file, "r") as handle:  # the layout, as the real download has it
        assert list(handle.attrs["layer_names"][1:3]) == [b"conv1_pad", b"conv1_conv"]
        assert list(handle["conv1_bn"].attrs["weight_names"]) == [
            b"conv1_bn/gamma:0", b"conv1_bn/beta:0", b"conv1_bn/moving_mean:0", b"conv1_bn/moving_variance:0"]
        assert handle["conv1_conv"]["conv1_conv"]["kernel:0"].shape == (7, 7, 3, 64)
    loaded = encoder.build_encoder(str(weights_file), IMAGE_SIZE)
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
