"""Helpers the tests share: waiting for what another thread or process finishes, reading a
run folder's checkpoint, decoder weights and in-Python captions, parsing the server's
metrics, encoding a test image, and ageing a feature cache.

A run's images, the decoder's weights and their largest difference are the benchmarks' own
(`benchmarks.workloads`), so a test and a benchmark read and compare runs alike.
"""

import json
import time
from pathlib import Path

import pytest

from benchmarks.workloads import decoder_weights, largest_difference, run_images  # noqa: F401  (re-exported)

POLL_SECONDS = 0.005  # a kill meant to land just after a checkpoint lands within a few ms of it


def wait_until(condition, seconds=10.0, processes=()):
    """Polls `condition()` until it is true, `seconds` pass or one of `processes`
    (subprocess.Popen) has ended; returns its last value.

    For what another thread or process finishes just after the client has its answer,
    such as the server's log line, written once the response is sent.
    """
    deadline = time.monotonic() + seconds
    while True:
        # Whether a process has ended is read first: one that made the condition true
        # just before ending still counts as on time.
        ended = any(process.poll() is not None for process in processes)
        value = condition()
        if value or ended or time.monotonic() > deadline:
            return value
        time.sleep(POLL_SECONDS)


def wait_for(condition, what, processes, seconds, output=lambda: ""):
    """Polls `condition()` as `wait_until` does; unless it comes true, kills every process of
    `processes` and fails the test, naming `what` and showing `output()` (their stderr).

    Every wait is bounded: a hung child fails its test, never the suite.
    """
    if wait_until(condition, seconds, processes):
        return
    ended = [process for process in processes if process.poll() is not None]
    for process in processes:
        process.kill()
        process.wait()
    if ended:
        pytest.fail(f"a process ended (code {ended[0].returncode}) before {what}: {output()}")
    pytest.fail(f"{what} did not happen within {seconds} s: {output()}")


def metric_samples(server):
    """{(sample name, sorted label items): value} of a live server's Prometheus page, parsed by prometheus_client."""
    import http.client

    from prometheus_client import parser

    from pipeline.serving.server import METRICS_PATH

    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        connection.request("GET", METRICS_PATH)
        response = connection.getresponse()
        text = response.read().decode("utf-8")
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/plain")
    finally:
        connection.close()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in parser.text_string_to_metric_families(text) for sample in family.samples}


def metric_change(before, after, name, **labels):
    """How much the sample `name{labels}` grew between two `metric_samples` reads."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def image_bytes(image, file_format, **options):
    """The encoded file (bytes) of `image` (a PIL Image, or a uint8 array [H, W] or [H, W, 3])
    in `file_format` ("JPEG", "PNG", ...), `options` passed to PIL's `save` (quality, exif, ...)."""
    import io

    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=file_format, **options)
    return buffer.getvalue()


def as_version_1(cache_path):
    """Rewrites a cache's attributes as Captioner wrote them before BatchNorm folding:
    version 1, no `encoder_graph` (its rows came from the plain Keras ResNet50)."""
    import h5py

    with h5py.File(cache_path, "a") as handle:
        handle.attrs["version"] = 1
        del handle.attrs["encoder_graph"]


def checkpoint_epoch(out):
    """Periods (Keras epochs) finished according to OUT's training checkpoint (int), or
    None while it is absent or caught mid-write."""
    from pipeline.data import run_folder

    try:
        return json.loads((Path(out) / run_folder.CHECKPOINT_DIR / "training_metadata.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return None


def python_captions(out_dir, feature_rows, beam_size=None):
    """(captions list[str], scores list[float]) of float32 [N, 2048] feature rows by the run's
    decoder in Python (`FeatureCaptioner`, the run's decode settings): the reference the
    exported SavedModel is held to."""
    from models import captioner
    from pipeline.core import config as config_module
    from pipeline.data import run_folder, text

    config = config_module.PipelineConfig.load(out_dir)
    if beam_size is not None:
        config = config.replace({"decode.beam_size": beam_size})
    vocabulary = run_folder.read_vocabulary(out_dir)
    feature_captioner = captioner.FeatureCaptioner(
        run_folder.load_decoder(out_dir), vocabulary.words, config.decode,
        start_id=text.START_ID, end_id=text.END_ID, unk_id=text.UNK_ID, pad_id=text.PAD_ID)
    outputs = feature_captioner.caption_features(feature_rows)
    return [caption.decode() for caption in outputs["captions"].numpy().tolist()], outputs["scores"].numpy().tolist()
