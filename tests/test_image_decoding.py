"""models.image_decoding: encoded image bytes -> the encoder's float32 [S, S, 3] input, as PIL sees them."""

import io
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from models import image_decoding
from tests.helpers import image_bytes


def _pil_reference(data, image_size):
    """PIL's decoding of `data`, resized by our own resize: what decode_image must give."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    return image_decoding.resize_image(pixels, image_size).numpy()


@pytest.mark.parametrize(
    "name, make, tolerance",
    [
        ("rgb png", lambda rgb: image_bytes(rgb, "PNG"), 1e-3),
        ("grayscale png", lambda rgb: image_bytes(rgb[..., 0], "PNG"), 1e-3),
        ("palette png", None, 1e-3),
        ("16-bit png", lambda rgb: image_bytes((rgb[..., 0].astype(np.uint16) * 257), "PNG"), 1.0),
        ("bmp", lambda rgb: image_bytes(rgb, "BMP"), 1e-3),
        ("jpeg", lambda rgb: image_bytes(rgb, "JPEG", quality=95), 4.0),
        ("cmyk jpeg", None, 4.0),
        ("gif first frame", None, 1e-3),
    ],
)
def test_decode_image_matches_pil(name, make, tolerance):
    rng = np.random.default_rng(2)
    # Smooth content, so JPEG decoders that differ in rounding stay close.
    gradient = np.linspace(0, 255, 90, dtype=np.float32)
    rgb = np.stack(
        [np.add.outer(np.linspace(0, 80, 60), gradient * 0.6), np.tile(gradient, (60, 1)),
         np.full((60, 90), 60.0) + rng.random((60, 90)) * 4], axis=-1
    ).clip(0, 255).astype(np.uint8)
    if name == "palette png":
        data = image_bytes(Image.fromarray(rgb).quantize(colors=16), "PNG")
    elif name == "cmyk jpeg":
        data = image_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    elif name == "gif first frame":
        frames = [Image.fromarray(rgb).quantize(colors=32), Image.fromarray(255 - rgb).quantize(colors=32)]
        data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    else:
        data = make(rgb)
    decoded = image_decoding.decode_image(data, 32).numpy()
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.float32
    assert 0.0 <= decoded.min() and decoded.max() <= 255.0
    if name == "16-bit png":
        # PIL clips 16-bit values to 255 when converting to RGB; TF scales them (v / 257).
        expected = image_decoding.resize_image(np.repeat(rgb[..., :1], 3, axis=-1), 32).numpy()
    else:
        expected = _pil_reference(data, 32)
    assert np.abs(decoded - expected).mean() <= tolerance, name


def test_decode_image_squashes_without_keeping_aspect_ratio():
    # Left half black, right half white: a squash keeps the split in the middle column.
    wide = np.zeros((40, 400, 3), np.uint8)
    wide[:, 200:] = 255
    decoded = image_decoding.decode_image(image_bytes(wide, "PNG"), 20).numpy()
    assert decoded.shape == (20, 20, 3)
    assert decoded[:, :9].max() < 1.0 and decoded[:, 11:].min() > 254.0


def test_decode_image_rejects_what_is_not_a_whole_image():
    jpeg = image_bytes((np.random.default_rng(3).random((80, 80, 3)) * 255).astype(np.uint8), "JPEG")
    for data in (b"", b"plain text, not an image", jpeg[: len(jpeg) // 2]):
        with pytest.raises(tf.errors.InvalidArgumentError):
            image_decoding.decode_image(data, 32)


def test_decode_image_refuses_a_header_that_declares_too_many_pixels():
    """A tiny PNG whose IHDR declares 20000 x 20000 is refused before decoding (graph-side)."""
    bomb = bytearray(image_bytes(Image.new("RGB", (10, 10), (1, 2, 3)), "PNG"))
    bomb[16:24] = struct.pack(">II", 20000, 20000)
    assert int(image_decoding.declared_pixels(tf.constant(bytes(bomb)))) == 20000 * 20000
    decode = tf.function(lambda data: image_decoding.decode_image(data, 8), input_signature=[tf.TensorSpec([], tf.string)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="megapixels"):
        decode(tf.constant(bytes(bomb)))
    for image_format, mode in (("JPEG", "RGB"), ("PNG", "RGB"), ("GIF", "P"), ("BMP", "RGB")):
        data = image_bytes(Image.new(mode, (37, 23)), image_format)
        assert int(image_decoding.declared_pixels(tf.constant(data))) == 37 * 23, image_format
        assert decode(tf.constant(data)).shape == (8, 8, 3)
    assert int(image_decoding.declared_pixels(tf.constant(b"abc"))) == 0
