"""The image encoder: ResNet50 without its classifier, its preprocessing inside, in float32 or mixed precision.

`build_encoder` makes it from arguments the caller has already resolved (seeded weights,
Keras' ImageNet weights or a loader of its own; a precision name, never "auto"): it opens
no file of its own and asks nothing of the machine. Feature extraction and the exported
SavedModel run its inference form, every BatchNormalization folded into the convolution
before it (`fold_encoder`); the plain Keras model stays available
(`build_encoder(..., folded=False)`) as the reference that tests compare it with.
Bad arguments raise ValueError.
"""

import contextlib
import hashlib

import keras
import numpy as np
import tensorflow as tf

ENCODER_NAME = "resnet50"
FEATURE_DIM = 2048
MIN_IMAGE_SIZE = 32  # ResNet50's five stride-2 stages need at least 32 pixels a side
# Keras' mixed-precision policy names for `EncoderConfig.precision`; variables stay float32.
PRECISION_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def build_encoder(weights=None, image_size=224, seed=0, precision="fp32", folded=True):
    """Builds ResNet50 (no top, global average pooling) with its own preprocessing inside.

    Args:
        weights: None: seeded He initialisation, the same in every process for one seed;
            "imagenet": Keras' ImageNet weights (Keras fetches them into its cache: a
            caller that wants a network timeout sets it); or a callable `load(backbone)`
            that fills the weights of the freshly built ResNet50 (a keras.Model named
            "resnet50", input the preprocessed [B, S, S, 3]) in place, e.g. from a file.
        image_size: side S of the square input, an int >= 32.
        seed: seed of the initialisation when `weights` is None.
        precision: "fp32", "bf16" or "fp16" (a key of PRECISION_POLICIES: Keras mixed
            precision; variables and the output stay float32).
        folded: True (extraction, export): the inference form, every BatchNormalization
            folded into the convolution before it (`fold_encoder`); False: the plain Keras
            model, with its BatchNormalization layers (the reference of tests and benchmarks).

    Returns:
        A functional keras.Model named "encoder": input float32 [B, S, S, 3] RGB pixel
        values in 0..255, output float32 [B, 2048]. Folded or not, `encoder_fingerprint`
        gives the same digest for the same weights.

    Raises:
        ValueError: a bad image_size, precision or weights argument, before any building.
    """
    check_image_size(image_size)
    if precision not in PRECISION_POLICIES:
        raise ValueError(f"encoder precision must be one of {', '.join(sorted(PRECISION_POLICIES))}, got {precision!r}")
    if not (weights is None or callable(weights) or (isinstance(weights, str) and weights == "imagenet")):
        raise ValueError(f"encoder weights must be None (seeded), 'imagenet' or a callable that loads them, got {weights!r}")
    with _dtype_policy(PRECISION_POLICIES[precision]):
        if weights is None:
            # Keras draws default initializer seeds from the global seed generator, which
            # this seeds; that makes the weights a function of `seed` alone.
            keras.utils.set_random_seed(seed)
            backbone = _resnet50(None, image_size)
        elif weights == "imagenet":
            backbone = _resnet50("imagenet", image_size)
        else:
            backbone = _resnet50(None, image_size)
            weights(backbone)
        plain = _with_preprocessing(backbone, image_size)
    return fold_encoder(plain) if folded else plain


def check_image_size(image_size):
    """Raises ValueError unless `image_size` (the input side S) is an int >= MIN_IMAGE_SIZE."""
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"encoder.image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")


def _resnet50(weights, image_size):
    """Keras' ResNet50, no top, global average pooling: float32 [B, S, S, 3] (preprocessed) -> [B, 2048]."""
    return keras.applications.ResNet50(
        include_top=False, weights=weights, input_shape=(image_size, image_size, 3), pooling="avg"
    )


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
