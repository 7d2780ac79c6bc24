"""Image bytes -> the encoder's input, in TF ops only: header checks, decoding, EXIF, resize.

Feature extraction and the exported SavedModel both call `decode_image`, so cached
features and served captions see exactly the same pixels; being TF ops, it runs inside
the SavedModel too (TF Serving decodes as extraction did).
"""

import tensorflow as tf

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
