"""The image encoder: ResNet50 without its classifier, and the image decoding it expects.

`decode_image` and `build_encoder` are shared by feature extraction and by the exported
SavedModel, so cached features and served captions see exactly the same pixels. Both
run the inference form of ResNet50, every BatchNormalization folded into the convolution
before it (`fold_encoder`), built once from the plain Keras model, which stays available
(`build_encoder(..., folded=False)`) as the reference that tests compare it with.
"""

import contextlib
import hashlib
import os
import socket
from pathlib import Path

import h5py
import keras
import numpy as np
import tensorflow as tf

from pipeline.core import errors

DOWNLOAD_TIMEOUT_SECONDS = 60  # per socket operation, not for the whole 94 MB
ENCODER_NAME = "resnet50"
FEATURE_DIM = 2048
# Keras' mixed-precision policy names for `EncoderConfig.precision`; variables stay float32.
PRECISION_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
# x86 feature flags (/proc/cpuinfo) of native bfloat16 matrix arithmetic, which oneDNN uses
# for bfloat16 convolutions; without them bfloat16 is emulated and slower than float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO_PATH = "/proc/cpuinfo"
# Decoding allocates width x height x 3 bytes whatever the file's size: a 600-byte JPEG
# can declare 12000 x 12000 pixels. Images whose header declares more are refused before
# decoding, inside the graph too (extraction, the SavedModel, TF Serving).
MAX_IMAGE_PIXELS = 50_000_000
# EXIF orientation (tag 0x0112 of IFD0, in the JPEG's APP1 "Exif" segment): phones store a
# portrait photo sideways and tag it 6. The Exif segment follows SOI (and APP0), so only the
# file's start is read, a bounded number of segments and IFD entries (TIFF sorts entries by
# tag, and 0x0112 is among the first).
EXIF_ORIENTATION_TAG = 0x0112
EXIF_SCAN_BYTES = 256 * 1024
EXIF_MAX_SEGMENTS = 32
EXIF_MAX_ENTRIES = 64


def cpu_flags(cpuinfo_path=CPUINFO_PATH):
    """The CPU feature flags the Linux kernel reports (set of str); empty elsewhere or unreadable."""
    try:
        text = Path(cpuinfo_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # the same on every core: the first one is enough
            return set(value.split())
    return set()


def resolve_precision(precision, cpuinfo_path=CPUINFO_PATH):
    """Resolves "auto" for this machine and checks the name; returns a key of PRECISION_POLICIES.

    "auto" is "fp16" when a GPU is visible (mixed_float16: tensor cores), "bf16" on a CPU
    with AMX-BF16 or AVX512-BF16 while oneDNN is on (TF's default on x86; the environment
    variable TF_ENABLE_ONEDNN_OPTS=0 turns it off), and "fp32" otherwise.
    """
    if precision == "auto":
        if tf.config.list_physical_devices("GPU"):
            return "fp16"
        onednn_on = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false")
        if onednn_on and cpu_flags(cpuinfo_path) & set(BF16_CPU_FLAGS):
            return "bf16"
        return "fp32"
    if precision not in PRECISION_POLICIES:
        raise errors.PipelineError(
            f"encoder.precision must be one of {', '.join(sorted(PRECISION_POLICIES))} or auto, got {precision!r}"
        )
    return precision


def build_encoder(weights="imagenet", image_size=224, seed=0, precision="fp32", folded=True):
    """Builds ResNet50 (no top, global average pooling) with its own preprocessing inside.

    Args:
        weights: "imagenet" (Keras' download), "random" (seeded He initialisation, the
            same in every process for one seed) or the path of an .h5 file holding
            ResNet50 "notop" weights.
        image_size: side S of the square input.
        seed: seed of the "random" weights.
        precision: "fp32", "bf16", "fp16" or "auto" (Keras mixed precision; the output
            is always float32).
        folded: True (extraction, export): the inference form, every BatchNormalization
            folded into the convolution before it (`fold_encoder`); False: the plain Keras
            model, with its BatchNormalization layers (the reference of tests and benchmarks).

    Returns:
        A functional keras.Model named "encoder": input float32 [B, S, S, 3] RGB pixel
        values in 0..255, output float32 [B, 2048]. Folded or not, `encoder_fingerprint`
        gives the same digest for the same weights.
    """
    if not isinstance(image_size, int) or image_size < 32:
        raise errors.PipelineError(f"encoder.image_size must be an integer >= 32, got {image_size!r}")
    with _dtype_policy(PRECISION_POLICIES[resolve_precision(precision)]):
        if weights == "random":
            # Keras draws default initializer seeds from the global seed generator, which
            # this seeds; that makes the weights a function of `seed` alone.
            keras.utils.set_random_seed(seed)
            backbone = _resnet50(None, image_size)
        elif weights == "imagenet":
            backbone = _imagenet_resnet50(image_size)
        else:
            backbone = _resnet50_from_file(weights, image_size)
        plain = _with_preprocessing(backbone, image_size)
    return fold_encoder(plain) if folded else plain


@contextlib.contextmanager
def _dtype_policy(name):
    """Keras' global dtype policy set to `name` inside the block, the caller's restored after it."""
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _with_preprocessing(backbone, image_size):
    """The encoder around `backbone` (built under the wanted dtype policy, which is current)."""
    pixels = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name="pixels")
    # Caffe-style preprocessing (RGB -> BGR, ImageNet mean subtracted) as graph ops,
    # so every caller can feed raw pixels and none can forget it.
    preprocessed = keras.applications.resnet50.preprocess_input(pixels)
    features = backbone(preprocessed)
    # Mixed precision computes in a 16-bit type; the cache and decoder want float32.
    features = keras.layers.Activation("linear", dtype="float32", name="features")(features)
    return keras.Model(pixels, features, name="encoder")


def fold_encoder(encoder_model):
    """The inference form of a plain encoder (`build_encoder(..., folded=False)`).

    Every BatchNormalization whose input is a Conv2D used by nothing else is folded into
    that convolution: y = gamma (conv(x) + b - mean) / sqrt(variance + epsilon) + beta
    is conv'(x) + b' with kernel' = kernel * s and b' = (b - mean) * s + beta, where
    s = gamma / sqrt(variance + epsilon) per output channel. Keras runs a BatchNormalization
    at inference as separate element-wise ops (under mixed precision with casts around
    them); folded, each block is convolution + bias + ReLU, which oneDNN fuses.

    The folded weights are computed in float64 from the float32 variables and stored as
    float32 variables; under a mixed policy the model then computes in bfloat16/float16
    like the plain one. Returns a new keras.Model with the same input, output and layer
    names (the backbone is still the layer "resnet50"), without BatchNormalization
    layers; `encoder_fingerprint` of it is that of `encoder_model` (the source weights).
    """
    backbone = encoder_model.get_layer(ENCODER_NAME)
    image_size = int(encoder_model.inputs[0].shape[1])
    with _dtype_policy(backbone.dtype_policy.name):
        folded_backbone, _ = fold_batch_normalization(backbone)
        folded = _with_preprocessing(folded_backbone, image_size)
    folded.source_fingerprint = encoder_fingerprint(encoder_model)
    return folded


def fold_batch_normalization(model):
    """Rebuilds a functional `model` with each Conv2D -> BatchNormalization pair fused.

    A pair is folded when the BatchNormalization normalizes the last (channel) axis of
    the output of a channels-last Conv2D without activation that nothing else reads;
    other layers (an unfolded BatchNormalization too) are cloned with their weights.
    The new Conv2D keeps the old one's name and config, with a bias.

    Returns (new functional keras.Model named like `model`, [(conv name, batch
    normalization name), ...] in layer order): ResNet50 has 53 pairs and keeps no
    BatchNormalization.
    """
    producers = {id(layer.output): layer for layer in model.layers}
    readers = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        for tensor in tf.nest.flatten(layer.input):
            readers[id(tensor)] = readers.get(id(tensor), 0) + 1
    convolution_of = {}  # batch normalization name -> its Conv2D
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        producer = producers.get(id(layer.input))
        axis = layer.axis if isinstance(layer.axis, int) else None
        # A convolution with its own activation cannot take the normalization's affine map.
        if (isinstance(producer, keras.layers.Conv2D) and producer.data_format == "channels_last"
                and producer.get_config()["activation"] == "linear"
                and readers[id(layer.input)] == 1 and axis in (-1, len(layer.input.shape) - 1)):
            convolution_of[layer.name] = producer
    folding = {convolution.name: model.get_layer(name) for name, convolution in convolution_of.items()}

    def clone(layer):
        if layer.name in convolution_of:
            return layer  # never called: `call` below passes its input through
        config = layer.get_config()
        if layer.name in folding:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    def call(layer, *args, **kwargs):
        if layer.name in convolution_of:
            return args[0]
        return layer(*args, **kwargs)

    folded = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for layer in folded.layers:
        if layer.name in folding:
            layer.set_weights(_folded_convolution(model.get_layer(layer.name), folding[layer.name]))
        elif layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    pairs = [(layer.name, folding[layer.name].name) for layer in model.layers if layer.name in folding]
    return folded, pairs


def _folded_convolution(convolution, normalization):
    """[kernel float32 [kh, kw, in, out], bias float32 [out]] of conv + batch normalization."""
    kernel = np.asarray(convolution.kernel.numpy(), np.float64)
    bias = np.asarray(convolution.bias.numpy(), np.float64) if convolution.use_bias else 0.0
    channels = kernel.shape[-1]
    gamma = np.asarray(normalization.gamma.numpy(), np.float64) if normalization.scale else np.ones(channels)
    beta = np.asarray(normalization.beta.numpy(), np.float64) if normalization.center else np.zeros(channels)
    mean = np.asarray(normalization.moving_mean.numpy(), np.float64)
    variance = np.asarray(normalization.moving_variance.numpy(), np.float64)
    scale = gamma / np.sqrt(variance + normalization.epsilon)
    return [(kernel * scale).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)]


def randomize_batch_normalization(encoder_model, seed):
    """Gives every BatchNormalization of a plain encoder seeded statistics that are not the identity.

    For tests and benchmarks: random weights leave moving mean 0, variance 1, gamma 1 and
    beta 0, under which a fold that dropped any of them would go unnoticed. Draws, per
    channel, gamma in [0.5, 1.5], beta ~ N(0, 0.2), mean ~ N(0, 0.5) and variance in
    [0.5, 2]; the same for one seed in every process. Returns the number of layers changed.
    """
    generator = np.random.default_rng(seed)
    changed = 0
    for layer in encoder_model.get_layer(ENCODER_NAME).layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            for variable, values in ((layer.gamma, generator.uniform(0.5, 1.5, channels)),
                                     (layer.beta, generator.normal(0.0, 0.2, channels)),
                                     (layer.moving_mean, generator.normal(0.0, 0.5, channels)),
                                     (layer.moving_variance, generator.uniform(0.5, 2.0, channels))):
                variable.assign(values.astype(np.float32))
            changed += 1
    return changed


def encoder_graph(model):
    """"folded" for an encoder made by `fold_encoder` (the default of `build_encoder`), else "keras"."""
    return "folded" if getattr(model, "source_fingerprint", None) else "keras"


def _resnet50(weights, image_size):
    return keras.applications.ResNet50(
        include_top=False, weights=weights, input_shape=(image_size, image_size, 3), pooling="avg"
    )


def _imagenet_resnet50(image_size):
    # Keras fetches with urllib and no timeout: a network that drops packets silently
    # would hang the run forever instead of failing with the advice below.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_SECONDS)
    try:
        return _resnet50("imagenet", image_size)
    except Exception as error:  # Keras raises a bare Exception for a failed URL fetch
        raise errors.PipelineError(
            "the ImageNet weights of ResNet50 could not be downloaded "
            f"({type(error).__name__}: {error}); pass --weights FILE.h5 with a local copy of "
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5, or --weights random for "
            "untrained, seeded weights (tests and smoke runs only)"
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _resnet50_from_file(weights, image_size):
    path = Path(weights)
    if not path.is_file():
        raise errors.PipelineError(
            f"encoder weights {weights!r}: no such file (use --weights imagenet, --weights random "
            "or the path of a ResNet50 notop .h5 weights file)"
        )
    if not h5py.is_hdf5(path):
        # Checked before the seconds-long build of the network the weights would fill.
        raise errors.PipelineError(f"{path}: not ResNet50 notop weights (not an HDF5 file)")
    backbone = _resnet50(None, image_size)
    try:
        backbone.load_weights(str(path))
    except Exception as error:  # h5py, Keras and OS errors alike mean "not these weights"
        message = str(error).splitlines()[0] if str(error) else ""
        raise errors.PipelineError(
            f"{path}: not ResNet50 notop weights ({type(error).__name__}: {message})"
        ) from None
    return backbone


def decode_image(image_bytes, image_size):
    """Decodes encoded image bytes into the encoder's input, with TF ops only.

    Args:
        image_bytes: tf.string scalar, a JPEG, PNG, GIF (first frame) or BMP file.
            Grayscale, palette, CMYK and 16-bit images come out as 8-bit RGB.
        image_size: side S of the output.

    Returns:
        float32 [S, S, 3], RGB values in 0..255, squashed to S x S without keeping the
        aspect ratio (as `keras.utils.load_img(target_size=...)` does).

    Raises tf.errors.InvalidArgumentError on bytes that are not a complete image.
    """
    within_limit = tf.debugging.assert_less_equal(
        declared_pixels(image_bytes), tf.constant(MAX_IMAGE_PIXELS, tf.int64),
        message=f"the image declares more than {MAX_IMAGE_PIXELS // 1_000_000} megapixels",
    )
    with tf.control_dependencies([within_limit]):
        image = tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    image = apply_exif_orientation(image, exif_orientation(image_bytes))
    return resize_image(image, image_size)


def declared_pixels(image_bytes):
    """Width x height that an image's header declares, read without decoding, in TF ops.

    Args:
        image_bytes: tf.string scalar.

    Returns:
        int64 scalar: the declared pixel count of a JPEG (via `tf.image.extract_jpeg_shape`),
        PNG (IHDR), GIF (logical screen, per frame) or BMP (info header); 0 for anything
        else or a header too short to say, which the decoder then refuses on its own.
    """
    header_size = 26
    header = tf.strings.substr(
        image_bytes + tf.constant(b"\0" * header_size), 0, header_size)
    raw = tf.ensure_shape(tf.cast(tf.io.decode_raw(header, tf.uint8), tf.int64), [header_size])  # zero-padded

    def starts_with(signature):
        return tf.reduce_all(tf.equal(raw[: len(signature)], tf.constant(list(signature), tf.int64)))

    def number(offset, size, big_endian=False):
        return _number(raw[offset: offset + size], tf.constant(big_endian))

    def signed_32(value):  # BMP sizes are signed (a negative height means top-down rows)
        return tf.where(value >= 2**31, 2**32 - value, value)

    # Formats other than JPEG by arithmetic on the header, so only JPEG's libjpeg parse
    # (which raises on anything else) needs a branch: one graph function, not one per format.
    long_enough = tf.strings.length(image_bytes) >= header_size
    other = tf.constant(0, tf.int64)
    for signature, pixels in (
        (b"BM", lambda: signed_32(number(18, 4)) * signed_32(number(22, 4))),
        (b"GIF8", lambda: number(6, 2) * number(8, 2)),
        (b"\x89PNG", lambda: number(16, 4, big_endian=True) * number(20, 4, big_endian=True)),
    ):
        other = tf.where(tf.logical_and(long_enough, starts_with(signature)), pixels(), other)
    return tf.cond(starts_with(b"\xff\xd8"),
                   lambda: tf.reduce_prod(tf.cast(tf.image.extract_jpeg_shape(image_bytes)[:2], tf.int64)),
                   lambda: other)


def _number(digits, big_endian):
    """Unsigned integers from their bytes (int64 [..., width]); big_endian a bool tensor."""
    width = digits.shape[-1]
    little_weights = tf.constant([256**index for index in range(width)], tf.int64)
    weights = tf.where(big_endian, tf.reverse(little_weights, [0]), little_weights)
    return tf.reduce_sum(digits * weights, axis=-1)


def exif_orientation(image_bytes):
    """The EXIF orientation of a JPEG, read in TF ops, as PIL reads it for `ImageOps.exif_transpose`.

    Walks the JPEG's segments (up to SOS) to the first APP1 segment starting "Exif\\0\\0",
    reads the TIFF header's byte order ("II" little-endian, "MM" big-endian), and looks in
    IFD0's entries for tag 0x0112 (a SHORT or LONG, one value). Every read is bounds-checked
    against the segment, so damaged or absent EXIF (and any non-JPEG) gives 1: as decoded
    without it. Graph-safe (fixed loop bounds), never raises.

    Each step reads all the bytes it needs in one gather (a segment's head; the TIFF
    header; every IFD entry as one [entries, 12] block), which keeps the graph small: its
    ops cost time on every image and its size on every new tf.data iterator.

    Args:
        image_bytes: tf.string scalar.

    Returns:
        int32 scalar in 1..8 (1: upright, nothing to do).
    """
    data = tf.strings.substr(image_bytes, 0, EXIF_SCAN_BYTES)
    raw = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int64)
    size = tf.size(raw, out_type=tf.int64)
    # Reads past the end land on this zero, so no index can fall outside the tensor.
    padded = tf.concat([raw, tf.zeros([1], tf.int64)], axis=0)

    def read(positions):
        """The bytes at int64 `positions` (any shape); 0 where a position is outside the data."""
        inside = tf.logical_and(positions >= 0, positions < size)
        return tf.where(inside, tf.gather(padded, tf.clip_by_value(positions, 0, size)), tf.zeros_like(positions))

    def offsets(count):
        return tf.range(count, dtype=tf.int64)

    exif_signature = tf.constant(list(b"Exif\0\0"), tf.int64)

    def walk(position, tiff_start, segment_end, step, done):
        head = read(position + offsets(10))  # 0xFF, marker, length (2 bytes), then "Exif\0\0"?
        marker, length = head[1], head[2] * 256 + head[3]
        is_fill = tf.logical_and(head[0] == 0xFF, marker == 0xFF)  # padding before a marker
        stop = tf.reduce_any(tf.stack([head[0] != 0xFF, position + 4 > size,
                                       marker == 0xDA, marker == 0xD9, length < 2]))  # image data, end
        stop = tf.logical_and(tf.logical_not(is_fill), stop)
        found = tf.logical_and(tf.logical_not(tf.logical_or(stop, is_fill)),
                               tf.logical_and(marker == 0xE1, tf.reduce_all(tf.equal(head[4:], exif_signature))))
        return (tf.where(is_fill, position + 1, position + 2 + length), tf.where(found, position + 10, tiff_start),
                tf.where(found, tf.minimum(position + 2 + length, size), segment_end),
                step + 1, tf.logical_or(stop, found))

    is_jpeg = tf.reduce_all(tf.equal(read(offsets(2)), tf.constant([0xFF, 0xD8], tf.int64)))
    start = (tf.constant(2, tf.int64), tf.constant(-1, tf.int64), tf.constant(0, tf.int64),
             tf.constant(0, tf.int64), tf.logical_not(is_jpeg))
    _, tiff, segment_end, _, _ = tf.while_loop(
        lambda position, tiff_start, segment_end, step, done: tf.logical_and(
            tf.logical_not(done), step < EXIF_MAX_SEGMENTS),
        walk, start)

    header = read(tiff + offsets(8))  # byte order, 42, offset of IFD0
    little = tf.reduce_all(tf.equal(header[:4], tf.constant(list(b"II\x2a\x00"), tf.int64)))
    big = tf.reduce_all(tf.equal(header[:4], tf.constant(list(b"MM\x00\x2a"), tf.int64)))

    def number(digits):
        return _number(digits, tf.logical_not(little))

    ifd = tiff + number(header[4:8])
    entry_count = number(read(ifd + offsets(2)))
    indices = offsets(EXIF_MAX_ENTRIES)
    entries = ifd + 2 + 12 * indices
    fields = read(entries[:, tf.newaxis] + offsets(12)[tf.newaxis, :])  # tag, type, count, value
    entry_type = number(fields[:, 2:4])
    value = tf.where(entry_type == 3, number(fields[:, 8:10]), number(fields[:, 8:12]))
    is_orientation = tf.reduce_all(tf.stack([
        indices < entry_count,
        entries + 12 <= segment_end,
        number(fields[:, 0:2]) == EXIF_ORIENTATION_TAG,
        tf.logical_or(entry_type == 3, entry_type == 4),  # SHORT or LONG
        number(fields[:, 4:8]) == 1,
    ]), axis=0)
    orientation = tf.gather(value, tf.argmax(tf.cast(is_orientation, tf.int32)))
    usable = tf.reduce_all(tf.stack([
        tf.logical_or(little, big), tiff + 8 <= segment_end, ifd >= tiff + 8, ifd + 2 <= segment_end,
        tf.reduce_any(is_orientation), orientation >= 1, orientation <= 8,
    ]))
    return tf.cast(tf.where(usable, orientation, tf.ones_like(orientation)), tf.int32)


def apply_exif_orientation(image, orientation):
    """Turns a decoded image upright as PIL's `ImageOps.exif_transpose` does, in TF ops.

    Orientations 5-8 are a transpose (PIL's TRANSPOSE) followed by the flips of 1-4:
    2 mirrors left-right, 3 rotates 180, 4 mirrors top-bottom; 6 (a phone's portrait
    photo, stored 90 degrees counter-clockwise) is PIL's ROTATE_270, 8 its ROTATE_90 and
    7 its TRANSVERSE. One transpose and one reverse with computed axes, no branches.

    Args:
        image: [H, W, C] tensor, as decoded (the photo as stored).
        orientation: int32 scalar, the EXIF orientation 1..8 (`exif_orientation`).

    Returns:
        The image as it should be shown: [H, W, C] for orientations 1-4, [W, H, C] for 5-8.
    """
    orientation = tf.clip_by_value(orientation, 1, 8)
    permutation = tf.where(orientation >= 5, tf.constant([1, 0, 2]), tf.constant([0, 1, 2]))
    flip_rows = tf.reduce_any(tf.equal(orientation, tf.constant([3, 4, 7, 8])))
    flip_columns = tf.reduce_any(tf.equal(orientation, tf.constant([2, 3, 6, 7])))
    axes = tf.boolean_mask(tf.constant([0, 1]), tf.stack([flip_rows, flip_columns]))
    return tf.reverse(tf.transpose(image, permutation), axes)


def resize_image(image, image_size):
    """uint8 or float [H, W, 3] RGB -> float32 [S, S, 3] in 0..255, bilinear.

    Antialiasing makes bilinear downscaling average over the whole footprint of each
    output pixel, as PIL's resize does; without it a 3000-pixel photo would be sampled at
    only 4 source pixels per output pixel and aliasing would leak into the features.
    """
    image = tf.cast(image, tf.float32)
    resized = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    # Antialiased kernels can overshoot slightly; the encoder's contract is 0..255.
    return tf.clip_by_value(resized, 0.0, 255.0)


def encoder_fingerprint(model):
    """A short hex digest of the source weights of an encoder (names ignored, order and values kept).

    For a plain model, the digest of every weight; for a folded one (`fold_encoder`), the
    digest of the plain model it was folded from, recorded when it was folded: the same
    weights give the same fingerprint folded or not, so caches and exports written by
    either form identify the same ImageNet, file or seeded weights.

    Returns 16 hex characters; two plain models share it only if their weights are identical.
    """
    recorded = getattr(model, "source_fingerprint", None)
    if recorded:
        return recorded
    digest = hashlib.sha256()
    for variable in model.weights:
        value = np.ascontiguousarray(variable.numpy(), dtype=np.float32)
        digest.update(str(value.shape).encode("ascii"))
        digest.update(memoryview(value).cast("B"))  # hashed in place: 94 MB are not copied again
    return digest.hexdigest()[:16]
