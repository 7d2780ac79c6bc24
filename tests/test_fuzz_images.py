"""Fuzzed image bytes: damaged JPEG/PNG/GIF/BMP files, random bytes and decompression bombs.

Through `models.image_decoding.decode_image` (as extraction and the SavedModel use it), the
exported SavedModel's `serving_default` behind `exported_model.image_problem` (as `caption`
and `serve` call it), the server's predict endpoint, and extraction. The property: a caption
or a decoded tensor, or a refusal with a reason; never a crash, never a huge allocation.
"""

import base64
import http.client
import io
import json
import struct
import threading
import zlib

import hypothesis
import numpy as np
import psutil
import pytest
import tensorflow as tf
from hypothesis import strategies as st
from PIL import Image

from models import image_decoding
from pipeline import extract
from pipeline.core import config, errors
from pipeline.serving import exported_model, server as http_server
from tests.helpers import image_bytes

IMAGE_SIZE = 224
# Far below the ~10 GB a 60000 x 60000 image would take, far above one small decode.
MAX_RSS_RISE_BYTES = 1 << 30
FUZZ = hypothesis.settings(derandomize=True, deadline=None, database=None,
                           suppress_health_check=list(hypothesis.HealthCheck))


def _seed(image_format, mode="RGB"):
    pixels = np.arange(24 * 16 * 3, dtype=np.uint8).reshape(16, 24, 3)
    return image_bytes(Image.fromarray(pixels).convert(mode), image_format)


SEEDS = [_seed("JPEG"), _seed("PNG"), _seed("GIF", "P"), _seed("BMP"), _seed("PNG", "L")]


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width, height):
    """A ~200-byte PNG whose header declares width x height RGB pixels (two rows of data)."""
    rows = (b"\x00" * (1 + 3 * min(width, 4096))) * 2
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(rows, 9)) + _png_chunk(b"IEND", b""))


def gif_bomb(width, height):
    """A 35-byte GIF declaring a width x height canvas and frame."""
    return (b"GIF89a" + struct.pack("<HH", width, height) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
            + b"\x2c" + struct.pack("<HHHH", 0, 0, width, height) + b"\x00\x02\x02\x44\x01\x00\x3b")


def jpeg_bomb(width, height):
    """A ~630-byte JPEG: a 24x16 image whose frame header is rewritten to width x height.

    libjpeg decodes it as a mostly grey image of the declared size; TF accepts it up to
    ~2^27 pixels (measured: 12000 x 12000 decodes, with 2.2 GB of peak memory).
    """
    data = SEEDS[0]
    start = data.index(b"\xff\xc0")
    return data[:start + 5] + struct.pack(">HH", height, width) + data[start + 9:]


def bmp_bomb(width, height):
    header = struct.pack("<2sIHHI", b"BM", 70, 0, 0, 54)
    return header + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0) + bytes(16)


BOMBS = [png_bomb, gif_bomb, jpeg_bomb, bmp_bomb]


@st.composite
def mutated_images(draw):
    """Seed images with byte flips, truncations or inserted chunks; or random bytes."""
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "random"]))
    if kind == "random":
        return draw(st.binary(min_size=0, max_size=300))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    else:
        position = draw(st.integers(0, len(data)))
        data[position:position] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def huge_images():
    """Bombs declaring 60000 x 60000 (TF refuses) to 12000 x 12000 (TF would decode) pixels."""
    return st.builds(lambda make, side: make(side, side), st.sampled_from(BOMBS),
                     st.sampled_from([60000, 30000, 12000, 7100]))


class PeakRss:
    """Samples this process's RSS every 10 ms while in the `with` block; `.rise` is the peak's rise in bytes."""

    def __enter__(self):
        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.rise = self.peak - self.start
        return False


@pytest.fixture(scope="module")
def decode():
    return tf.function(lambda image_bytes: image_decoding.decode_image(image_bytes, IMAGE_SIZE),
                       input_signature=[tf.TensorSpec([], tf.string)])


def test_decode_image_decodes_or_refuses_damaged_bytes(decode):
    @hypothesis.settings(FUZZ, max_examples=150)
    @hypothesis.given(mutated_images())
    def check(image_bytes):
        try:
            pixels = exported_model.declared_pixels(image_bytes)
        except tf.errors.InvalidArgumentError:
            pixels = None  # a JPEG header libjpeg cannot parse: the decoder refuses it too
        # decode_image itself has no size guard (see the report): only what TF caps by itself.
        hypothesis.assume(pixels is None or pixels <= exported_model.MAX_IMAGE_PIXELS)
        try:
            image = decode(tf.constant(image_bytes)).numpy()
        except tf.errors.InvalidArgumentError as error:
            assert errors.op_error_reason(error)
            return
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.float32
        assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 255.0

    with PeakRss() as memory:
        check()
    assert memory.rise < MAX_RSS_RISE_BYTES


@pytest.mark.parametrize("make", BOMBS, ids=[make.__name__ for make in BOMBS])
def test_decode_image_refuses_60000_square_declared_sizes(decode, make):
    with PeakRss() as memory, pytest.raises(tf.errors.InvalidArgumentError):
        decode(tf.constant(make(60000, 60000)))
    assert memory.rise < MAX_RSS_RISE_BYTES


@pytest.fixture(scope="module")
def captioner(exported_out):
    return exported_model.ExportedCaptioner(exported_out / "saved_model")


def test_bombs_are_refused_from_the_header_before_decoding(captioner):
    @hypothesis.settings(FUZZ, max_examples=16)
    @hypothesis.given(huge_images())
    def check(image_bytes):
        problem = exported_model.image_problem(image_bytes)
        assert problem is not None and "over the limit of 50 megapixels" in problem, problem

    with PeakRss() as memory:
        check()
    assert memory.rise < MAX_RSS_RISE_BYTES


def test_declared_pixels_match_the_decoded_image():
    for image_bytes in SEEDS + [_seed("WEBP")]:
        decoded = tf.io.decode_image(image_bytes, expand_animations=False)
        assert exported_model.declared_pixels(image_bytes) == decoded.shape[0] * decoded.shape[1]
    single = gif_bomb(30, 20)
    frame = single[19:-1]  # image descriptor, LZW code size, data sub-blocks
    five_frames = single[:19] + b"\x21\xf9\x04\x00\x00\x00\x00\x00" + frame * 5 + b"\x3b"
    assert exported_model.declared_pixels(single) == 30 * 20
    assert exported_model.declared_pixels(five_frames) == 5 * 30 * 20  # TF decodes every frame
    assert exported_model.declared_pixels(b"not an image") is None


def test_saved_model_captions_or_refuses_fuzzed_images(captioner):
    @hypothesis.settings(FUZZ, max_examples=30)
    @hypothesis.given(st.one_of(mutated_images(), huge_images()))
    def check(image_bytes):
        problem = exported_model.image_problem(image_bytes)
        if problem is not None:
            assert isinstance(problem, str) and problem
            return
        try:
            (text,), (score,) = captioner.caption_images([image_bytes])
        except tf.errors.InvalidArgumentError as error:  # run_caption turns it into a message
            assert errors.op_error_reason(error)
            return
        assert isinstance(text, str) and isinstance(score, float)

    with PeakRss() as memory:
        check()
    assert memory.rise < MAX_RSS_RISE_BYTES


def test_server_answers_fuzzed_images_with_a_caption_or_a_400(exported_captioner):
    server = http_server.CaptionServer(exported_captioner, http_server.ServeSettings(port=0),
                                       log_stream=io.StringIO()).start()
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=120)

    @hypothesis.settings(FUZZ, max_examples=30)
    @hypothesis.given(st.one_of(mutated_images(), huge_images()))
    def check(image_bytes):
        body = json.dumps({"instances": [{"b64": base64.b64encode(image_bytes).decode()}]})
        connection.request("POST", "/v1/models/captioner:predict", body=body)
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status == 200:
            assert isinstance(answer["predictions"][0]["caption"], str)
        else:
            assert response.status == 400 and set(answer) == {"error"} and answer["error"], answer

    try:
        with PeakRss() as memory:
            check()
        connection.request("GET", "/v1/models/captioner")
        assert connection.getresponse().status == 200  # still serving
    finally:
        connection.close()
        server.stop()
    assert memory.rise < MAX_RSS_RISE_BYTES


def test_extraction_skips_fuzzed_files_with_a_reason(tmp_path):
    files = {
        "good.png": SEEDS[1],
        "truncated.jpg": SEEDS[0][: len(SEEDS[0]) // 2],
        "random.png": bytes(range(256)) * 3,
        "empty.gif": b"",
        "bomb.png": png_bomb(60000, 60000),
        "bomb.gif": gif_bomb(60000, 60000),
        "bomb.bmp": bmp_bomb(60000, 60000),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    settings = config.PipelineConfig().replace({"encoder.weights": "random", "encoder.batch_size": 4}).encoder
    with PeakRss() as memory:
        result = extract.extract_to_cache(tmp_path, sorted(files), tmp_path / "features.h5", settings)
    assert memory.rise < 2 * MAX_RSS_RISE_BYTES  # ResNet50 itself takes a few hundred MB
    assert result["new"] == 1
    reasons = {failure["image_id"]: failure["reason"] for failure in result["failures"]}
    assert sorted(reasons) == sorted(set(files) - {"good.png"})
    assert all(reasons.values()), reasons
    assert reasons["empty.gif"].startswith("empty")
