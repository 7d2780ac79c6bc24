"""TF Serving's warm-up requests: written into the SavedModel at export, replayed by `serve` at start-up.

A model's first call pays for graph initialisation (function instantiation, Grappler, the
first allocation of every kernel): for ResNet50 and an in-graph beam search that is seconds,
which would otherwise land on the first user's request. TF Serving's answer, which `serve`
follows too, is a file of representative requests shipped inside the SavedModel,

    <saved model>/assets.extra/tf_serving_warmup_requests

a TFRecord file of `tensorflow.serving.PredictionLog` records (at most 1,000), each replayed
once when the model loads, before the version is reported AVAILABLE. The records are built
with `tensorflow-serving-api`'s protos and written with `tf.io.TFRecordWriter`, so TF Serving
reads exactly what `serve` reads:

    1. serving_default   images   tf.string  [1]        a small JPEG photo-like image
    2. serving_default   images   tf.string  [1]        a small PNG (the other decoder)
    3. caption_features  features tf.float32 [4, 2048]  a batch of ResNet50-like features
"""

import dataclasses
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from models import encoder
from pipeline.core import errors
from pipeline.serving import exported_model

WARMUP_FILE = "tf_serving_warmup_requests"  # TF Serving's fixed name, in assets.extra/
MAX_RECORDS = 1000  # TF Serving refuses to load a model whose warm-up file has more
FEATURE_ROWS = 4  # > 1, so the batched path of caption_features is the one initialised
# Shapes of the sample images: a landscape photo's aspect, small enough to keep the file at a
# few kB; the model resizes every image to its own input size, so the traced graph is the same.
JPEG_SIZE = (240, 320)
PNG_SIZE = (48, 64)


def warmup_path(saved_model_dir):
    """Path of the warm-up file inside a SavedModel folder (it may not exist)."""
    return Path(saved_model_dir) / exported_model.METADATA_DIR / WARMUP_FILE


def _sample_pixels(height, width):
    """A smooth colour gradient with a bright disc (uint8 [height, width, 3]): compresses like a photo."""
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((rows - height / 2) ** 2 + (columns - width / 3) ** 2) < (min(height, width) / 4) ** 2
    pixels = np.stack([columns / width * 255, rows / height * 255, np.full_like(rows, 96)], axis=-1)
    pixels[disc] = (250, 230, 120)
    return pixels.astype(np.uint8)


def sample_images():
    """(JPEG bytes, PNG bytes) of the two warm-up images, encoded by TensorFlow's own encoders."""
    jpeg = tf.io.encode_jpeg(_sample_pixels(*JPEG_SIZE), quality=90).numpy()
    png = tf.io.encode_png(_sample_pixels(*PNG_SIZE)).numpy()
    return jpeg, png


def sample_features(rows=FEATURE_ROWS):
    """Non-negative features like ResNet50's pooled ReLU outputs (float32 [rows, 2048]), seeded."""
    return np.abs(np.random.default_rng(0).standard_normal((rows, encoder.FEATURE_DIM))).astype(np.float32) * 0.5


def _predict_log(model_name, signature_name, input_name, array):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(array))
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))


def warmup_records(model_name):
    """The warm-up PredictionLog records (list of 3), in the order they are written and replayed."""
    jpeg, png = sample_images()
    return [
        _predict_log(model_name, exported_model.SERVING_SIGNATURE, "images", np.array([jpeg], dtype=object)),
        _predict_log(model_name, exported_model.SERVING_SIGNATURE, "images", np.array([png], dtype=object)),
        _predict_log(model_name, exported_model.FEATURES_SIGNATURE, "features", sample_features()),
    ]


def write_warmup_file(saved_model_dir, model_name):
    """Writes assets.extra/tf_serving_warmup_requests into `saved_model_dir`; returns its Path."""
    path = warmup_path(saved_model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in warmup_records(model_name):
            writer.write(record.SerializeToString())
    return path


def read_warmup_file(saved_model_dir):
    """The PredictionLog records of a SavedModel's warm-up file (list; empty if it has none).

    Raises ArtifactError, as TF Serving refuses to load the model, when the file is damaged,
    holds more than MAX_RECORDS records, or a record is not a predict request.
    """
    path = warmup_path(saved_model_dir)
    if not path.is_file():
        return []
    records = []
    try:
        for serialized in tf.data.TFRecordDataset(str(path)):
            record = prediction_log_pb2.PredictionLog.FromString(serialized.numpy())
            records.append(record)
            if len(records) > MAX_RECORDS:
                raise errors.ArtifactError(f"{path}: more than {MAX_RECORDS} warm-up records (TF Serving's limit)")
            if record.WhichOneof("log_type") != "predict_log":
                raise errors.ArtifactError(f"{path}: record {len(records)} is a {record.WhichOneof('log_type')}, "
                                           f"not a predict_log: serve replays Predict requests only")
    except (tf.errors.OpError, ValueError) as error:  # DataLossError (damaged TFRecord), DecodeError
        raise errors.ArtifactError(f"{path}: not a readable file of PredictionLog records ({error})") from None
    return records


def request_inputs(request):
    """(signature name, {input name: numpy array}) of a PredictRequest; its tensors read by TensorFlow.

    Strings come back as an object array of bytes, as `tf.make_ndarray` gives them.
    """
    signature_name = request.model_spec.signature_name or exported_model.SERVING_SIGNATURE
    return signature_name, {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}


def saved_model_runner(loaded):
    """run(signature name, inputs) for a `tf.saved_model.load`ed model: calls that signature directly.

    Returns {output name: numpy array}: `captions` (bytes [N]) and `scores` (float32 [N]).
    """

    def run(signature_name, inputs):
        outputs = loaded.signatures[signature_name](**{name: tf.constant(value) for name, value in inputs.items()})
        return {name: tensor.numpy() for name, tensor in outputs.items()}

    return run


@dataclasses.dataclass
class WarmupReport:
    """What a replay did: `requests` replayed (int), `seconds` they took (float), `outputs` (list), in order."""

    requests: int
    seconds: float
    outputs: list


def replay(records, run):
    """Replays each record's predict request once, in order, through `run(signature_name, inputs)`.

    Args:
      records: PredictionLog records (`read_warmup_file`).
      run: run(signature name, {input name: numpy array}) -> that request's outputs; an
        exception stops the replay, as a failing warm-up stops TF Serving's load.

    Returns:
      WarmupReport.
    """
    started = time.perf_counter()
    outputs = [run(*request_inputs(record.predict_log.request)) for record in records]
    return WarmupReport(len(records), time.perf_counter() - started, outputs)


def warm_up(saved_model_dir, records, run_batch, log_stream):
    """Replays `records` at a server's start-up through its `run_batch(signature, items)`; logs and returns the report.

    Each request's one input becomes the items of one model call (image bytes, or float32
    [2048] rows), so the warm-up initialises the very code requests run. No records: None.
    A failing record raises ArtifactError: the model is not served, as TF Serving does not load it.
    """
    if not records:
        return None

    def run(signature_name, inputs):
        (values,) = inputs.values()
        return run_batch(signature_name, list(values))

    try:
        report = replay(records, run)
    except (tf.errors.OpError, ValueError, KeyError) as error:
        raise errors.ArtifactError(f"{warmup_path(saved_model_dir)}: a warm-up request failed, so the model is "
                                   f"not served ({error})") from None
    print(f"warm-up: {report.requests} requests of {WARMUP_FILE} replayed in {report.seconds:.2f} s",
          file=log_stream, flush=True)
    return report
