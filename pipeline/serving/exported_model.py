"""The exported SavedModel as a library: loading it, its signature and metadata names, image checks.

`ExportedCaptioner` is the one place that loads an export and calls its signatures
(`serving_default`: encoded image bytes; `caption_features`: cached 2048-d features); the
`caption` and `serve` stages use it. `header_problem`, `image_problem` and `declared_pixels`
decide, from an image's bytes, whether it may reach the model, so a bad file gets a reason
of its own instead of failing its whole batch.

The signature names and the `assets.extra/captioner.json` metadata location are defined
here once: `pipeline.export` writes them, everything that reads an export imports them.
"""

import json
import struct
from pathlib import Path

import tensorflow as tf

from models import image_decoding
from pipeline.core import errors

SERVING_SIGNATURE = "serving_default"  # images: tf.string [None] -> captions, scores
FEATURES_SIGNATURE = "caption_features"  # features: tf.float32 [None, 2048] -> captions, scores
# Written by `pipeline.export` beside the SavedModel's own files (TF Serving's folder for files
# beside, not inside, the graph), so a served model says which vocabulary, decoding settings
# and encoder produced it.
METADATA_DIR = "assets.extra"
METADATA_FILE = "captioner.json"
SAVED_MODEL_PROTO = "saved_model.pb"  # TensorFlow's name for the graph and its signature defs
# Most pixels an image may declare (a GIF's frames summed). Decoding allocates the
# whole image before it is shrunk to the encoder's size: 3 bytes a pixel, and 4 more per
# channel once the model casts it to float32 (measured here: a 630-byte JPEG whose header
# says 12000 x 12000 takes 2.2 GB to decode). So the header is read first, and a 50 MP
# photo, the largest a phone camera takes, still passes.
MAX_IMAGE_PIXELS = image_decoding.MAX_IMAGE_PIXELS
# Declared pixels decoded by one SavedModel call: bigger batches are split, because the
# graph decodes up to 10 images of a batch at once (tf.map_fn's parallel iterations).
MAX_BATCH_PIXELS = MAX_IMAGE_PIXELS


def check_model_dir(model_dir):
    """Raises PipelineError unless `model_dir` holds a SavedModel; returns it as a Path."""
    model_dir = Path(model_dir)
    if not (model_dir / SAVED_MODEL_PROTO).is_file():
        state = f"has no {SAVED_MODEL_PROTO}" if model_dir.is_dir() else "does not exist"
        raise errors.PipelineError(
            f"{model_dir}: no exported SavedModel here (the folder {state}); create one with "
            f"`python run_pipeline.py export --out OUT` (the model is then OUT/saved_model), or run "
            f"`python run_pipeline.py` to make the demo export in artifacts/demo/saved_model"
        )
    return model_dir


def read_signature_defs(model_dir):
    """{name: SignatureDef proto} of a SavedModel, sorted by name, read from its saved_model.pb.

    The export's own signature defs (dtypes, shapes, tensor names), as `saved_model_cli show`
    and TF Serving's metadata see them; `__saved_model_init_op` included.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((Path(model_dir) / SAVED_MODEL_PROTO).read_bytes())
    signature_defs = saved_model.meta_graphs[0].signature_def
    return {name: signature_defs[name] for name in sorted(signature_defs)}


def header_problem(image_bytes):
    """Why `image_bytes` (bytes) must not reach the model, read from its header alone; None if it may.

    Empty bytes, a JPEG header libjpeg cannot parse, and images declaring more than
    MAX_IMAGE_PIXELS are refused without decoding. What passes may still fail to decode:
    callers then find the culprit with `image_problem`. Checking only headers up front keeps
    the common case, a batch of good images, at one decode per image (the model's).
    """
    if not image_bytes:
        return "empty file"
    try:
        pixels = declared_pixels(image_bytes)
    except tf.errors.InvalidArgumentError as error:  # a JPEG header libjpeg cannot parse
        return f"not a readable JPEG, PNG, GIF or BMP image ({errors.op_error_reason(error)})"
    if pixels is not None and pixels > MAX_IMAGE_PIXELS:
        return (f"the image declares {pixels / 1e6:.1f} megapixels, over the limit of "
                f"{MAX_IMAGE_PIXELS / 1e6:g} megapixels (refused before decoding)")
    return None


def image_problem(image_bytes):
    """Returns why `image_bytes` (bytes) cannot be captioned, or None if it decodes as an image.

    `header_problem`, then a full decode: one file at a time, to name the file of a batch
    the model refused.
    """
    problem = header_problem(image_bytes)
    if problem:
        return problem
    try:
        # expand_animations=False: the model uses a GIF's first frame, so only that must decode.
        tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
        return f"not a readable JPEG, PNG, GIF or BMP image ({errors.op_error_reason(error)})"
    return None


def declared_pixels(image_bytes):
    """Pixels (int) the header of a JPEG, PNG, GIF, BMP or WebP file says decoding will produce.

    Read without decoding, the way TensorFlow's decoders read it (format by magic bytes,
    as `tf.io.decode_image` chooses): PNG IHDR, GIF frames (the sum over all of them, each
    of which TF decodes), BMP info header, WebP VP8/VP8L/VP8X header, JPEG frame header
    (through libjpeg, `tf.image.extract_jpeg_shape`, which raises InvalidArgumentError if
    it cannot parse it). None when the bytes are none of these formats or the header is
    cut short: the decoder then refuses them by itself.
    """
    data = bytes(image_bytes)
    try:
        if data.startswith(b"\xff\xd8\xff"):
            height, width, _ = tf.image.extract_jpeg_shape(data).numpy().tolist()
            return height * width
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            width, height = struct.unpack_from(">II", data, 16)
            return width * height
        if data.startswith(b"GIF8"):
            return _gif_pixels(data)
        if data.startswith(b"BM"):
            width, height = struct.unpack_from("<ii", data, 18)
            return abs(width) * abs(height)
        if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            return _webp_pixels(data)
    except struct.error:
        return None  # shorter than its header
    return None


def _gif_pixels(data):
    """The canvas's area or, if larger, the sum of every frame's area (int): TF decodes each frame.

    None for a GIF without a frame: the decoder refuses it without allocating anything.
    """
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    total = frames = 0
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while position < len(data):
        block = data[position]
        if block == 0x2C:  # image descriptor: one frame
            frame_width, frame_height, frame_flags = struct.unpack_from("<HHB", data, position + 5)
            total += frame_width * frame_height
            frames += 1
            position += 10 + (3 << ((frame_flags & 7) + 1) if frame_flags & 0x80 else 0) + 1
        elif block == 0x21:  # extension: introducer and label, then data sub-blocks
            position += 2
        else:  # trailer or damage: the decoder stops here too
            break
        while position < len(data):  # data sub-blocks, up to an empty one
            size = data[position]
            position += 1 + size
            if size == 0:
                break
    return max(total, width * height) if frames else None


def _webp_pixels(data):
    """Width times height (int) from a WebP's VP8X, VP8L or VP8 header; None for another chunk."""
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width * height
    if chunk == b"VP8L":
        bits = struct.unpack_from("<I", data, 21)[0]
        return ((bits & 0x3FFF) + 1) * (((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8 ":
        width, height = struct.unpack_from("<HH", data, 26)
        return (width & 0x3FFF) * (height & 0x3FFF)
    return None


class ExportedCaptioner:
    """An exported SavedModel, loaded once: image bytes in, captions and scores out.

    Loading needs only TensorFlow (the SavedModel holds the encoder, the decoder and the
    beam search as graphs), so this works with any export, from any run.
    """

    def __init__(self, model_dir):
        self.model_dir = check_model_dir(model_dir)
        try:
            self._loaded = tf.saved_model.load(str(self.model_dir))
        except (OSError, ValueError, tf.errors.OpError) as error:
            raise errors.ArtifactError(f"{self.model_dir}: cannot load the SavedModel ({error})") from None
        signatures = dict(self._loaded.signatures)
        if SERVING_SIGNATURE not in signatures:
            raise errors.ArtifactError(
                f"{self.model_dir}: the SavedModel has no {SERVING_SIGNATURE!r} signature "
                f"(it has {sorted(signatures)}); re-export it with `python run_pipeline.py export`"
            )
        self._serving = signatures[SERVING_SIGNATURE]
        self._features = signatures.get(FEATURES_SIGNATURE)
        self.metadata = self._read_metadata()

    def _read_metadata(self):
        """The export's assets.extra/captioner.json (dict); {} when it is absent or unreadable."""
        path = self.model_dir / METADATA_DIR / METADATA_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}  # descriptive only: a damaged file must not stop serving a loadable model

    @property
    def signature_names(self):
        """Names of the SavedModel's signatures, sorted (list of str)."""
        return sorted(self._loaded.signatures)

    def caption_images(self, images):
        """Captions encoded images.

        Args:
          images: list of bytes, each a whole JPEG/PNG/GIF/BMP file, already checked with
            `header_problem` (an item that does not decode makes the whole call raise
            `tf.errors.InvalidArgumentError`; `image_problem` then says which and why).

        Returns:
          (captions, scores): list of str and list of float, one per image, in order.
        """
        captions, scores = [], []
        for batch in _pixel_batches(images):
            batch_captions, batch_scores = _as_lists(self._serving(images=tf.constant(batch, dtype=tf.string)))
            captions += batch_captions
            scores += batch_scores
        return captions, scores

    def caption_features(self, features):
        """Captions cached image features: `features` float32 array-like [N, 2048] -> (captions, scores)."""
        if self._features is None:
            raise errors.ArtifactError(f"{self.model_dir}: the SavedModel has no {FEATURES_SIGNATURE!r} signature")
        outputs = self._features(features=tf.convert_to_tensor(features, dtype=tf.float32))
        return _as_lists(outputs)


def _pixel_batches(images):
    """Splits `images` (list of bytes), in order, into lists of at most MAX_BATCH_PIXELS declared pixels.

    An image over the limit (unchecked input) goes alone; one whose size is unknown counts
    as the whole budget, so it goes alone too.
    """
    batch, batch_pixels = [], 0
    for image_bytes in images:
        try:
            pixels = declared_pixels(image_bytes)
        except tf.errors.InvalidArgumentError:
            pixels = None
        pixels = MAX_BATCH_PIXELS if pixels is None else pixels
        if batch and batch_pixels + pixels > MAX_BATCH_PIXELS:
            yield batch
            batch, batch_pixels = [], 0
        batch.append(image_bytes)
        batch_pixels += pixels
    if batch:
        yield batch


def _as_lists(outputs):
    """(captions list of str, scores list of float) from a signature's outputs (string [N], float32 [N])."""
    captions = [caption.decode("utf-8") for caption in outputs["captions"].numpy().tolist()]
    scores = [float(score) for score in outputs["scores"].numpy().tolist()]
    return captions, scores
