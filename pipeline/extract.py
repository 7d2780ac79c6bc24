"""Stage 1: ResNet50 features of every image of a dataset into OUT/features.h5.

    run_extract(data_dir, out_dir, {"encoder.weights": "random"})

The encoder is ResNet50's inference form, BatchNorm folded into the convolutions
(`models.encoder.build_encoder`, `fold_encoder`), recorded as encoder_graph="folded".
The input pipeline is `tf.data`: files are read and decoded in parallel, batched and
prefetched, so decoding overlaps with the encoder. The encoder runs in
one `tf.function` traced once per model for [None, S, S, 3] (any batch size, so the last
short batch needs no padding and no retrace), and a writer thread appends the encoded
batches to the HDF5 file while the encoder works on the next one.

Bad images never stop a run and never reach the cache: the pipeline drops every element
whose read or decode fails (TF refuses truncated JPEGs: `decode_image` does not try to
recover them, so they cannot come out half grey), and afterwards each dropped image is
diagnosed in Python. Images TF cannot decode but PIL can are encoded from PIL's pixels;
the rest are listed with their reason in OUT/extract_errors.json.
"""

import hashlib
import os
import queue
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import tensorflow as tf

from models import encoder as encoder_module
from models import image_decoding
from pipeline.core import device, encoder_loading, errors, io_utils, progress, tf_data
from pipeline.data import feature_writer, features, run_folder

# Batches tf.data keeps decoded ahead of the encoder: one encoder batch outlasts the
# decoding of the next by far (ResNet50 costs ~20x the decode+resize of a photo).
PREFETCH_BATCHES = 2
# Encoded batches the writer thread may hold before the encoder waits for it: enough to
# absorb a slow flush, little memory (32 x 2048 float32 = 256 KiB a batch).
WRITE_QUEUE_BATCHES = 8
# encoder model -> {image_size: tf.function}, so a model is traced once per process.
_ENCODE_FUNCTIONS = weakref.WeakKeyDictionary()
# image size -> tf.function reading and decoding one image file (`_read_and_decode_function`).
_READ_AND_DECODE_FUNCTIONS = {}


def run_extract(data_dir, out_dir, overrides, overwrite=False, num_shards=1, shard_index=0):
    """Extracts the features of every image of `data_dir` that OUT's cache lacks.

    Args:
        data_dir: dataset folder (any layout `pipeline.data.datasets.load_dataset` detects).
        out_dir: artifact folder; created if needed.
        overrides: {"section.field": value} applied to OUT/config.json (None values ignored).
        overwrite: replace a cache made with other encoder settings instead of failing.
        num_shards, shard_index: extract only shard `shard_index` of `num_shards`
            (a deterministic share of the sorted image ids) into features.shard-K-of-N.h5.

    Returns:
        A summary dict: images, new, cached, errors, seconds, images_per_second,
        features_file, errors_file.
    """
    from pipeline.data import datasets, text

    started = time.monotonic()
    out_dir = Path(out_dir)
    if not isinstance(num_shards, int) or num_shards < 1:
        raise errors.PipelineError(f"--num-shards must be a positive integer, got {num_shards!r}")
    if not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
        raise errors.PipelineError(f"--shard-index must be in 0..{num_shards - 1}, got {shard_index!r}")
    config = run_folder.read_config(out_dir, requires=None).replace(overrides)
    config.check("encoder")
    # Recorded resolved ("auto" -> "bf16" here, "fp16" on a GPU machine), in config.json as in
    # the cache's attributes: the artifacts say what was computed, not what was asked.
    config.encoder.precision = device.resolve_precision(config.encoder.precision)
    device.announce("extract", config.encoder.precision)
    data_dir = Path(data_dir).resolve()
    dataset = datasets.load_dataset(data_dir, config.data)
    config.data.data_dir = str(data_dir)
    config.data.layout = dataset.layout
    config.data.image_dir = str(Path(dataset.image_dir).resolve())
    cache_path = features.features_path(out_dir, num_shards, shard_index)
    if cache_path.exists() and not overwrite:
        # Before config.json is saved: a refused run must leave the settings of the cache.
        features.check_attrs(features.read_attrs(cache_path), config.encoder, path=cache_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save(out_dir)  # a killed run still leaves the settings of its artifacts
    datasets.write_captions_json(out_dir, dataset)
    text.Vocabulary.from_dataset(dataset, config.text.min_word_count).save(out_dir / run_folder.VOCAB_FILE)

    image_ids = sorted(record.image_id for record in dataset.images)
    if num_shards > 1:
        image_ids = [image_id for image_id in image_ids if shard_of(image_id, num_shards) == shard_index]
    result = extract_to_cache(
        Path(config.data.image_dir), image_ids, cache_path, config.encoder, seed=config.seed, overwrite=overwrite,
    )
    listed = {record.image_id for record in dataset.images}
    missing = [
        {"image_id": image_id, "path": str(Path(config.data.image_dir) / image_id), "reason": "missing: named in the captions but not found"}
        for image_id in dataset.missing
        if image_id not in listed and (num_shards == 1 or shard_of(image_id, num_shards) == shard_index)
    ]
    failures = missing + result["failures"]
    errors_path = out_dir / (run_folder.EXTRACT_ERRORS_FILE if num_shards == 1 else
                             run_folder.EXTRACT_ERRORS_SHARD_PATTERN.format(index=shard_index, count=num_shards))
    io_utils.write_json(errors_path, failures)
    config.save(out_dir)
    seconds = time.monotonic() - started
    summary = {
        "images": len(image_ids),
        "new": result["new"],
        "cached": result["cached"],
        "errors": len(failures),
        "seconds": round(seconds, 2),
        "images_per_second": round(result["new"] / result["extract_seconds"], 2) if result["extract_seconds"] > 0 else 0.0,
        "features_file": str(result["path"]),
        "errors_file": str(errors_path),
    }
    print(
        f"extract: {summary['images']} images, {summary['new']} new, {summary['cached']} cached, "
        f"{summary['errors']} errors ({errors_path.name}), {summary['seconds']:.1f} s, "
        f"{summary['images_per_second']:.1f} images/s -> {result['path']}",
        file=sys.stderr,
    )
    return summary


def shard_of(image_id, num_shards):
    """The shard (0..num_shards-1) of an image id: a stable hash, the same in every process."""
    digest = hashlib.sha1(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def extract_to_cache(image_dir, image_ids, cache_path, encoder_config, seed=0, overwrite=False, encoder_model=None):
    """Adds the features of `image_ids` missing from `cache_path` (created if absent).

    image_dir: folder the ids are relative to. encoder_config: an EncoderConfig; its
        precision may be "auto" (resolved here, and recorded resolved in the cache).
    encoder_model: an already built encoder for these settings (tests, benchmarks), else
        one is built. Returns {"new", "cached", "failures": [{"image_id", "path",
        "reason"}], "extract_seconds", "path"}; extract_seconds counts the encoding loop,
        not the build of the encoder nor the tracing of its function.
    Raises ArtifactError (nothing written) if the cache holds other encoder settings
    and `overwrite` is false; also, when the first new row would join rows of the other
    encoder graph (`features.check_graph`: a version 1 cache of the plain Keras ResNet50).
    """
    import dataclasses

    cache_path = Path(cache_path)
    encoder_config = dataclasses.replace(
        encoder_config, precision=device.resolve_precision(encoder_config.precision)
    )
    cached_ids = set()
    cache_exists = cache_path.exists()
    if cache_exists and not overwrite:
        # Checked before the (slow) encoder build, so a wrong flag fails at once.
        attrs = features.read_attrs(cache_path)
        features.check_attrs(attrs, encoder_config, path=cache_path)
        with features.open_features(None, path=cache_path) as reader:
            cached_ids = set(reader.image_ids)
    pending = [image_id for image_id in image_ids if image_id not in cached_ids]
    if cache_exists and not overwrite and not pending:
        # Everything is cached: a rerun neither builds the encoder nor touches the file.
        return {"new": 0, "cached": len(image_ids), "failures": [], "extract_seconds": 0.0, "path": cache_path}
    # Reading and decoding need no encoder: start them now, so the first batches are ready
    # when the encoder is built, fingerprinted and traced instead of after.
    batches = _BatchStream(
        lambda: image_dataset(image_dir, pending, encoder_config.image_size,
                              device.extraction_batch_size(encoder_config.batch_size)))
    if encoder_model is None:
        encoder_model = encoder_loading.load_encoder(
            encoder_config.weights, encoder_config.image_size, seed=seed, precision=encoder_config.precision
        )
    else:
        _check_model_precision(encoder_model, encoder_config.precision)
    fingerprint = encoder_module.encoder_fingerprint(encoder_model)
    graph = encoder_module.encoder_graph(encoder_model)
    encode = encode_function(encoder_model, encoder_config.image_size)
    encode.get_concrete_function()  # traces now (once per model), outside the timed loop
    computed_on = device.device_record(encoder_config.precision)
    if cache_exists and not overwrite:
        features.check_attrs(attrs, encoder_config, fingerprint=fingerprint, path=cache_path)
        writer = feature_writer.FeatureWriter.append_to(cache_path, encoder_graph=graph)
        # Rows added on another machine: the attribute names every device the rows came from.
        devices = [name for name in str(attrs.get("device", "")).split("; ") if name]
        if computed_on not in devices:
            writer.set_attr("device", "; ".join(devices + [computed_on]))
    else:
        new_attrs = {**features.expected_attrs(encoder_config, fingerprint, graph), "device": computed_on}
        writer = feature_writer.FeatureWriter.create(cache_path, new_attrs)
    rows_before = writer.num_rows
    started = time.monotonic()
    with writer:
        written = _encode_files(batches, pending, writer, encode)
        failed = [image_id for image_id in pending if image_id not in written]
        failures = _recover(image_dir, failed, writer, encode, encoder_config.image_size)
    return {
        "new": writer.num_rows - rows_before,
        "cached": len(image_ids) - len(pending),
        "failures": failures,
        "extract_seconds": time.monotonic() - started,
        "path": cache_path,
    }


def _check_model_precision(encoder_model, precision):
    # A caller's model computing at another precision than the one the cache will record.
    policy = encoder_model.get_layer("resnet50").dtype_policy.name
    if policy != encoder_module.PRECISION_POLICIES[precision]:
        raise ValueError(f"encoder_model computes with dtype policy {policy!r}, but precision={precision!r} was asked")


def encode_function(encoder_model, image_size):
    """The encoder as a tf.function: float32 [B, S, S, 3] -> float32 [B, 2048], any B.

    One function per (model, S) for the life of the model, and the batch dimension is
    left unknown: the last short batch and single recovered images run the same graph
    (no padding, no retracing), and a second extraction with the same model (benchmarks,
    tests) skips the seconds of tracing and graph optimisation.
    """
    per_model = _ENCODE_FUNCTIONS.setdefault(encoder_model, {})
    if image_size not in per_model:
        # A weak reference, so the cache entry does not keep its own key alive.
        model_reference = weakref.ref(encoder_model)

        @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)])
        def encode(images):
            return model_reference()(images, training=False)

        per_model[image_size] = encode
    return per_model[image_size]


def image_dataset(image_dir, image_ids, image_size, batch_size):
    """tf.data of (ids tf.string [b], images float32 [b, S, S, 3]) in the order of `image_ids`.

    b is batch_size except in the last batch. Elements whose file cannot be read or
    decoded are dropped.
    """
    paths = [os.path.join(str(image_dir), image_id) for image_id in image_ids]
    read_and_decode = _read_and_decode_function(image_size)

    def load(image_id, path):
        return image_id, read_and_decode(path)

    data = tf.data.Dataset.from_tensor_slices((tf.constant(image_ids, tf.string), tf.constant(paths, tf.string)))
    # Order is kept (deterministic) so two runs write the same file; decoding still runs
    # in parallel, one image per core, on tf.data's threads while the encoder computes,
    # and prefetch keeps whole batches ready so the encoder never waits for a slow image.
    data = data.map(load, num_parallel_calls=tf_data.cpu_count(), deterministic=True)
    data = data.ignore_errors()
    data = data.batch(batch_size)
    # One thread per image op: parallelism across images (num_parallel_calls) costs no
    # synchronisation, whereas splitting one resize over cores steals them from the encoder.
    options = tf_data.untuned_options(max_intra_op_parallelism=1)
    return data.with_options(options).prefetch(PREFETCH_BATCHES)


def _read_and_decode_function(image_size):
    """tf.function: file path tf.string [] -> float32 [S, S, 3] (`image_decoding.decode_image`), traced once per S.

    Tracing `decode_image` (its header checks included) takes ~0.25 s; a dataset's map
    function that calls this one only adds a call to the traced graph, so a second
    extraction in one process (benchmarks, tests, a shard loop) does not pay it again.
    """
    if image_size not in _READ_AND_DECODE_FUNCTIONS:
        @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
        def read_and_decode(path):
            return image_decoding.decode_image(tf.io.read_file(path), image_size)

        _READ_AND_DECODE_FUNCTIONS[image_size] = read_and_decode
    return _READ_AND_DECODE_FUNCTIONS[image_size]


class _BatchStream:
    """Iterates the `tf.data` dataset `make_dataset()`, built and first fetched on a thread from the start.

    tf.data starts its parallel map and prefetch only on the first `next()`; building the
    dataset and calling it on a thread lets reading and decoding run while the caller
    still builds, fingerprints and traces the encoder.
    """

    def __init__(self, make_dataset):
        self._iterator = None
        self._first = None
        self._error = None
        self._thread = threading.Thread(target=self._fetch_first, args=(make_dataset,), name="first-batch", daemon=True)
        self._thread.start()

    def _fetch_first(self, make_dataset):
        try:
            self._iterator = iter(make_dataset())
            self._first = next(self._iterator, None)
        except Exception as error:  # re-raised in the consuming thread
            self._error = error

    def __iter__(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is not None:
            yield self._first
            yield from self._iterator


def _encode_files(batches, image_ids, writer, encode):
    """Encodes the batches of `image_ids` (a _BatchStream of (ids, images)); returns the set of ids written."""
    written = set()
    if not image_ids:
        return written
    # Order is deterministic, so when a batch lands every id before its last one is
    # decided (written or dropped as bad): progress counts those too.
    positions = {image_id: position for position, image_id in enumerate(image_ids)}
    with progress.Progress(total=len(image_ids), label="extract", unit="images") as reporter:
        with BackgroundWriter(writer) as background:
            for ids, images in batches:
                vectors = encode(images).numpy()
                batch_ids = [value.decode("utf-8") for value in ids.numpy()]
                background.append(batch_ids, vectors)
                written.update(batch_ids)
                reporter.update(positions[batch_ids[-1]] + 1 - reporter.done)
        reporter.update(len(image_ids) - reporter.done)
    return written


class BackgroundWriter:
    """Appends batches to a `feature_writer.FeatureWriter` on a thread, so the encoder never waits for the disk.

    `append(image_ids, vectors float32 [b, 2048])` queues a batch, blocking only while
    `max_batches` batches already wait. Batches are written in order, each by
    `FeatureWriter.append`, so the cache's crash safety is unchanged. A write error is
    raised by the next `append` or by `close`; `close` (or leaving the `with` block)
    writes every queued batch and joins the thread.
    """

    _END = object()

    def __init__(self, writer, max_batches=WRITE_QUEUE_BATCHES):
        self._writer = writer
        self._queue = queue.Queue(maxsize=max_batches)
        self._error = None
        self._error_raised = False
        self._thread = threading.Thread(target=self._run, name="feature-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if self._error is not None:
                continue  # after a failure nothing more is written, but producers never block
            try:
                self._writer.append(*item)
            except BaseException as error:  # handed to the producer's thread
                self._error = error

    def append(self, image_ids, vectors):
        self._raise_error()
        self._queue.put((image_ids, vectors))

    def close(self):
        if self._thread.is_alive():
            self._queue.put(self._END)
            self._thread.join()
        self._raise_error()

    def _raise_error(self):
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


def _recover(image_dir, image_ids, writer, encode, image_size):
    """Diagnoses images the TF pipeline dropped; encodes those PIL can decode.

    Returns the failures: [{"image_id", "path", "reason"}].
    """
    failures = []
    for image_id in image_ids:
        path = Path(image_dir) / image_id
        pixels, reason = _decode_fallback(path)
        if pixels is None:
            failures.append({"image_id": image_id, "path": str(path), "reason": reason})
            continue
        image = image_decoding.resize_image(tf.constant(pixels), image_size)
        writer.append([image_id], encode(image[tf.newaxis]).numpy())
    return failures


def _decode_fallback(path):
    """(uint8 [H, W, 3] RGB or None, reason) for an image TF did not decode."""
    if not path.exists():
        return None, "missing: no such file"
    if not path.is_file():
        return None, "unreadable: not a regular file"
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, f"unreadable: {error.strerror or error}"
    if not data:
        return None, "empty: the file has 0 bytes"
    too_large = f"too large: over the limit of {image_decoding.MAX_IMAGE_PIXELS // 1_000_000} megapixels"
    try:
        # The same header check and decode as the pipeline's, eagerly, for the reason.
        image_decoding.decode_image(tf.constant(data), 8)
        tf_reason = "TensorFlow dropped it while reading"
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, tf.errors.UnimplementedError) as error:
        tf_reason = errors.op_error_reason(error)
        if "megapixels" in tf_reason:
            return None, f"{too_large} (the header declares {_declared_megapixels(data)})"
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > image_decoding.MAX_IMAGE_PIXELS:
                return None, f"{too_large} ({image.width} x {image.height})"
            image.load()  # decodes fully: a truncated file raises here, not later
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return pixels, None
    except Image.UnidentifiedImageError:
        return None, f"not an image: {tf_reason}"
    except Exception as error:  # PIL raises many types for damaged data
        return None, f"undecodable (truncated or corrupt): {tf_reason}; PIL: {error}"


def _declared_megapixels(data):
    try:
        return f"{int(image_decoding.declared_pixels(tf.constant(data))) / 1e6:.0f} megapixels"
    except tf.errors.OpError:
        return "an unreadable size"
