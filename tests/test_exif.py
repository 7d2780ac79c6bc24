"""EXIF orientation in `models.image_decoding.decode_image`: photos come out upright, as PIL's
`ImageOps.exif_transpose` shows them, in TF ops (so the SavedModel does it too)."""

import io
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from models import image_decoding
from tests.helpers import image_bytes

IMAGE_SIZE = 40


def _scene(height=32, width=48):
    """A non-square, asymmetric RGB image (uint8 [H, W, 3]): every flip and rotation of it differs."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :, 0] = (np.arange(width) * (255 // width))[None, :]
    pixels[:, :, 1] = (np.arange(height) * (255 // height))[:, None]
    pixels[: height // 4, : width // 4, 2] = 255  # a corner marker
    return pixels


def _jpeg(pixels, orientation=None, quality=95):
    """JPEG bytes of `pixels`, with an EXIF block (PIL's `Image.Exif`) holding `orientation` if given."""
    options = {"quality": quality}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif
    return image_bytes(pixels, "JPEG", **options)


def _with_app1(jpeg_bytes, payload):
    """`jpeg_bytes` with an APP1 segment holding `payload` (bytes) inserted right after SOI."""
    return jpeg_bytes[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg_bytes[2:]


def _big_endian_exif(orientation, entry_type=3, count=1):
    """An APP1 payload: "Exif" and a big-endian ("MM") TIFF with one IFD0 entry, the orientation."""
    value = struct.pack(">HH", orientation, 0) if entry_type == 3 else struct.pack(">I", orientation)
    entry = struct.pack(">HHI", 0x0112, entry_type, count) + value
    return b"Exif\0\0" + b"MM\0\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 0)


def _tf_orientation(image_bytes):
    return int(image_decoding.exif_orientation(tf.constant(image_bytes)))


def _pil_upright_of_tf_pixels(image_bytes):
    """TF's decode of `image_bytes` turned upright by PIL's `ImageOps.exif_transpose` (uint8 array).

    The same pixels go in on both sides, so TF's orientation must match PIL's exactly.
    """
    stored = Image.fromarray(tf.io.decode_jpeg(image_bytes, channels=3).numpy())
    exif = Image.open(io.BytesIO(image_bytes)).info.get("exif")
    if exif is not None:
        stored.info["exif"] = exif
    return np.asarray(ImageOps.exif_transpose(stored))


@pytest.fixture(scope="module")
def graph_decode():
    """decode_image inside one tf.function (traced once for the module), as extraction and the SavedModel run it."""
    return tf.function(lambda data: image_decoding.decode_image(data, IMAGE_SIZE))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pil_exif_transpose(orientation, graph_decode):
    image_bytes = _jpeg(_scene(), orientation)
    assert _tf_orientation(image_bytes) == orientation == Image.open(io.BytesIO(image_bytes)).getexif()[0x0112]
    stored = tf.io.decode_jpeg(image_bytes, channels=3)
    upright = image_decoding.apply_exif_orientation(stored, image_decoding.exif_orientation(tf.constant(image_bytes))).numpy()
    expected = _pil_upright_of_tf_pixels(image_bytes)
    assert upright.shape == expected.shape == ((32, 48, 3) if orientation <= 4 else (48, 32, 3))
    np.testing.assert_array_equal(upright, expected)
    # PIL's own decode, turned by PIL, agrees too (two JPEG decoders: within a few levels).
    pil_upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(image_bytes))).convert("RGB"))
    assert np.abs(upright.astype(int) - pil_upright.astype(int)).mean() < 2
    # decode_image turns it before the resize, inside one graph function.
    np.testing.assert_allclose(graph_decode(tf.constant(image_bytes)).numpy(),
                               image_decoding.resize_image(expected, IMAGE_SIZE).numpy(), atol=1e-4)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_big_endian_exif_and_long_values_are_read(orientation):
    plain = _jpeg(_scene())
    for payload in (_big_endian_exif(orientation), _big_endian_exif(orientation, entry_type=4)):
        image_bytes = _with_app1(plain, payload)
        assert Image.open(io.BytesIO(image_bytes)).getexif()[0x0112] == orientation
        assert _tf_orientation(image_bytes) == orientation
        np.testing.assert_array_equal(
            image_decoding.apply_exif_orientation(tf.io.decode_jpeg(image_bytes, channels=3),
                                           image_decoding.exif_orientation(tf.constant(image_bytes))).numpy(),
            _pil_upright_of_tf_pixels(image_bytes))


def _tiff_with_entries(little_endian, entries):
    """An APP1 payload: "Exif" and a TIFF whose IFD0 holds `entries` [(tag, type, count, value)], in that order."""
    order = "<" if little_endian else ">"
    body = b"".join(struct.pack(order + "HHI", tag, entry_type, count)
                    + (struct.pack(order + "HH", value, 0) if entry_type == 3 else struct.pack(order + "I", value))
                    for tag, entry_type, count, value in entries)
    header = (b"II\x2a\x00" if little_endian else b"MM\x00\x2a") + struct.pack(order + "I", 8)
    return b"Exif\0\0" + header + struct.pack(order + "H", len(entries)) + body + struct.pack(order + "I", 0)


def test_orientation_among_other_tags_in_either_byte_order_reads_as_pil_reads_it():
    """IFD0 with up to 18 tags before the orientation and 20 after it (sorted by tag, as
    TIFF wants), SHORT and LONG, either byte order, behind a JFIF APP0 or not: TF reads
    the orientation PIL reads."""
    plain = _jpeg(_scene())
    rng = np.random.default_rng(7)
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
    seen = set()
    for _ in range(40):
        orientation = int(rng.integers(1, 9))
        before = rng.choice(np.arange(0x00FE, 0x0112), int(rng.integers(0, 19)), replace=False)
        after = rng.choice(np.arange(0x0113, 0x8000), int(rng.integers(0, 21)), replace=False)
        entries = sorted([(int(tag), int(rng.choice([3, 4])), 1, int(rng.integers(0, 2**16)))
                          for tag in [*before, *after]] + [(0x0112, int(rng.choice([3, 4])), 1, orientation)])
        little_endian = bool(rng.integers(0, 2))
        image_bytes = _with_app1(plain, _tiff_with_entries(little_endian, entries))
        if rng.integers(0, 2):  # the Exif segment after a JFIF APP0 segment instead of first
            image_bytes = image_bytes[:2] + app0 + image_bytes[2:]
        assert Image.open(io.BytesIO(image_bytes)).getexif().get(0x0112) == orientation
        assert _tf_orientation(image_bytes) == orientation, (little_endian, len(before), len(entries))
        seen.add((little_endian, len(before) > 9))
    assert len(seen) == 4  # both byte orders, the orientation both near the start and far in


def _damaged_variants():
    """(name, JPEG bytes whose EXIF is damaged or useless): each must decode as if it had none."""
    tagged = _jpeg(_scene(), 6)
    tiff = tagged.index(b"Exif\0\0") + 6
    segment_length = struct.unpack(">H", tagged[tiff - 8:tiff - 6])[0]
    payload_end = tiff - 8 + segment_length
    rng = np.random.default_rng(0)

    def replaced(start, new):
        return tagged[:start] + new + tagged[start + len(new):]

    plain = _jpeg(_scene())
    return [
        ("no-exif", plain),
        ("exif-without-orientation", _jpeg(_scene(), None)),
        ("garbage-tiff-header", replaced(tiff, b"XX\x2a\x00")),
        ("ifd-offset-past-the-segment", replaced(tiff + 4, struct.pack("<I", 0xFFFFFF00))),
        ("ifd-offset-into-the-header", replaced(tiff + 4, struct.pack("<I", 2))),
        ("garbage-payload", replaced(tiff, rng.integers(0, 256, payload_end - tiff, dtype=np.uint8).tobytes())),
        ("segment-ends-before-its-ifd", _with_app1(plain, b"Exif\0\0MM\0\x2a" + struct.pack(">I", 8))),
        ("app1-cut-after-exif", _with_app1(plain, b"Exif\0\0")),
        ("orientation-out-of-range", _with_app1(plain, _big_endian_exif(9))),
        ("orientation-zero", _with_app1(plain, _big_endian_exif(0))),
        ("orientation-as-ascii", _with_app1(plain, _big_endian_exif(6, entry_type=2))),
        ("orientation-with-two-values", _with_app1(plain, _big_endian_exif(6, count=2))),
        ("not-exif-app1", _with_app1(plain, b"http://ns.adobe.com/xap/1.0/\0" + b"<x/>" + _big_endian_exif(6)[6:])),
    ]


DAMAGED = _damaged_variants()


@pytest.mark.parametrize("name,image_bytes", DAMAGED, ids=[name for name, _ in DAMAGED])
def test_damaged_or_absent_exif_decodes_as_without_it(name, image_bytes):
    assert _tf_orientation(image_bytes) == 1
    decoded = image_decoding.decode_image(tf.constant(image_bytes), IMAGE_SIZE).numpy()
    as_stored = image_decoding.resize_image(tf.io.decode_jpeg(image_bytes, channels=3), IMAGE_SIZE).numpy()
    np.testing.assert_array_equal(decoded, as_stored)


def test_orientation_of_bytes_that_are_not_a_whole_jpeg_is_1():
    tagged = _jpeg(_scene(), 6)
    exif_at = tagged.index(b"Exif\0\0")
    for image_bytes in (b"", b"\xff", b"\xff\xd8", b"\xff\xd8\xff\xe1", tagged[:exif_at + 12],
                        b"\xff\xd8" + b"\xff" * 100, b"\x89PNG\r\n\x1a\n" + bytes(40), tagged[2:]):
        assert _tf_orientation(image_bytes) == 1


def test_savedmodel_sees_a_sideways_phone_photo_upright(exported_captioner):
    # A portrait photo as a phone stores it: pixels turned 90 degrees counter-clockwise, tagged 6.
    upright = _scene(48, 32)
    sideways = np.ascontiguousarray(np.rot90(upright, k=1))
    tagged_jpeg = _jpeg(sideways, 6, quality=100)
    untagged_jpeg = _jpeg(sideways, quality=100)
    # The pixels the model must see: TensorFlow's own decoding of the file (as inside the
    # graph) turned upright as orientation 6 says, stored losslessly. A JPEG of the upright
    # scene, or PIL's decoding, would differ by compression and IDCT noise, which the small
    # session decoder weighs about like the rotation itself.
    decoded = tf.io.decode_jpeg(tagged_jpeg, channels=3).numpy()
    upright_png = image_bytes(np.ascontiguousarray(np.rot90(decoded, k=-1)), "PNG")
    captions, scores = exported_captioner.caption_images([upright_png, tagged_jpeg, untagged_jpeg])
    assert captions[1] == captions[0]
    assert abs(scores[1] - scores[0]) < 0.1 * abs(scores[2] - scores[0]), scores
