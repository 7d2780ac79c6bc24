"""The encoder as the user names it: `--weights imagenet|random|FILE.h5` and `--precision`, built.

`models.encoder.build_encoder` takes resolved arguments and touches nothing outside the
process; this module does what it leaves out: resolves the precision for this machine
(`device.resolve_precision`), fetches the ImageNet weights with a network timeout, reads a
weights file, and turns every failure into a one-line PipelineError that says what to do.
Extraction and export build their encoder here, so both read `--weights` the same way.
"""

import contextlib
import socket
from pathlib import Path

import h5py

from models import encoder
from pipeline.core import device, errors

DOWNLOAD_TIMEOUT_SECONDS = 60  # per socket operation, not for the whole 94 MB
IMAGENET_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


def load_encoder(weights="imagenet", image_size=224, seed=0, precision="fp32", folded=True):
    """Builds the encoder of `--weights`, `--precision` and `encoder.image_size`.

    Args:
        weights: "imagenet" (Keras' download, or its cached copy), "random" (seeded He
            initialisation, the same in every process for one seed) or the path of an .h5
            file holding ResNet50 "notop" weights: Keras 2's HDF5 layout (the file Keras
            downloads) or Keras 3's `.weights.h5`.
        image_size: side S of the square input, an int >= 32.
        seed: seed of the "random" weights.
        precision: "fp32", "bf16", "fp16" or "auto" (this machine's choice).
        folded: True: BatchNormalization folded into the convolutions (extraction,
            export); False: the plain Keras model (tests, benchmarks).

    Returns:
        `models.encoder.build_encoder`'s keras.Model "encoder": float32 [B, S, S, 3] RGB
        pixel values in 0..255 -> float32 [B, 2048].

    Raises:
        PipelineError: a bad image size or precision, ImageNet weights that cannot be
            fetched (naming `--weights FILE.h5` and `--weights random`), a weights file
            that is missing or not ResNet50 notop weights (naming the file).
    """
    try:
        encoder.check_image_size(image_size)
    except ValueError as error:
        raise errors.PipelineError(str(error)) from None
    precision = device.resolve_precision(precision)
    if weights == "random":
        return encoder.build_encoder(None, image_size, seed=seed, precision=precision, folded=folded)
    if weights == "imagenet":
        return _imagenet_encoder(image_size, precision, folded)
    return encoder.build_encoder(_weights_file_loader(weights), image_size, precision=precision, folded=folded)


def _imagenet_encoder(image_size, precision, folded):
    """The ImageNet encoder; PipelineError naming the alternatives if Keras cannot fetch the weights."""
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_SECONDS):
            return encoder.build_encoder("imagenet", image_size, precision=precision, folded=folded)
    except Exception as error:  # Keras raises a bare Exception for a failed URL fetch
        raise errors.PipelineError(
            "the ImageNet weights of ResNet50 could not be downloaded "
            f"({type(error).__name__}: {error}); pass --weights FILE.h5 with a local copy of "
            f"{IMAGENET_NOTOP_FILE}, or --weights random for "
            "untrained, seeded weights (tests and smoke runs only)"
        ) from None


@contextlib.contextmanager
def _socket_timeout(seconds):
    """The process's default socket timeout set to `seconds` inside the block, restored after it.

    Keras fetches with urllib and no timeout: a network that drops packets silently would
    hang the run forever instead of failing with the advice of `_imagenet_encoder`.
    """
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _weights_file_loader(weights):
    """A `load(backbone)` for `build_encoder` that fills ResNet50 from the file `weights`.

    The file's existence and HDF5 signature are checked here, before the seconds-long
    build of the network the weights would fill; PipelineError naming the file otherwise.
    """
    path = Path(weights)
    if not path.is_file():
        raise errors.PipelineError(
            f"encoder weights {weights!r}: no such file (use --weights imagenet, --weights random "
            "or the path of a ResNet50 notop .h5 weights file)"
        )
    if not h5py.is_hdf5(path):
        raise errors.PipelineError(f"{path}: not ResNet50 notop weights (not an HDF5 file)")

    def load(backbone):
        try:
            # Keras reads both layouts: its own `.weights.h5`, and Keras 2's HDF5 weights
            # (`layer_names`, per-layer `weight_names`), the layout of the ImageNet download.
            backbone.load_weights(str(path))
        except Exception as error:  # h5py, Keras and OS errors alike mean "not these weights"
            message = str(error).splitlines()[0] if str(error) else ""
            raise errors.PipelineError(
                f"{path}: not ResNet50 notop weights ({type(error).__name__}: {message})"
            ) from None

    return load
