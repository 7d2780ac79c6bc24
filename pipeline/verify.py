"""`run_pipeline.py verify --out OUT`: checks the artifacts of a run against each other.

Each check prints one line: `ok: ...` when it passes, `problem: ...` when it does not,
`skip: ...` when the artifact it needs is not there yet (no decoder before `train`), so
verify can run after any stage. What is checked:

    config.json     loads as a PipelineConfig
    captions.json   loads; vocab.json loads
    features.h5     readable, schema valid, attributes match config.json's encoder,
                    finite rows, unique ids, exactly the ids of captions.json minus
                    those listed in extract_errors.json
    decoder.keras   loads; output size = vocabulary size = config's decoder.vocab_size;
                    image input size = the cache's feature_dim
    saved_model/    loads with TensorFlow alone, has both signatures, captions one cached
                    vector with words of vocab.json; its self-description names the same
                    vocabulary and encoder fingerprint as the run

Exit code 0 when everything present is consistent, 2 otherwise. Nothing is written.
"""

import dataclasses
import sys
from pathlib import Path

from pipeline.core import errors
from pipeline.data import run_folder

# Rows checked per read of features.h5 (16 MiB of float32 2048-d rows): verify's memory stays
# this block, not the cache.
CHECK_BLOCK_ROWS = 2048


@dataclasses.dataclass
class _CacheSummary:
    """What verify needs of features.h5, read block by block.

    image_ids: list of N str; attrs: dict; feature_dim: int; nonfinite_rows: int, rows holding
    NaN or inf; first_nonfinite: the image id of the first of them, or None; first_vector:
    float32 [1, feature_dim], row 0 (None for an empty cache).
    """

    image_ids: list
    attrs: dict
    feature_dim: int
    nonfinite_rows: int
    first_nonfinite: str
    first_vector: object


def _read_cache_summary(out_dir):
    import numpy

    with run_folder.open_feature_cache(out_dir) as reader:
        nonfinite_rows, first_nonfinite, first_vector = 0, None, None
        for image_ids, block in reader.batches(CHECK_BLOCK_ROWS):
            if first_vector is None:
                first_vector = block[:1].copy()
            finite = numpy.isfinite(block).all(axis=1)
            if not finite.all():
                first_nonfinite = first_nonfinite or image_ids[int(numpy.argmin(finite))]
                nonfinite_rows += int((~finite).sum())
        return _CacheSummary(reader.image_ids, dict(reader.attrs), int(reader.attrs["feature_dim"]), nonfinite_rows,
                             first_nonfinite, first_vector)


class _Report:
    def __init__(self, stream):
        self.stream = stream
        self.problems = 0

    def _line(self, kind, message):
        # One line per finding, whatever the message (HDF5 and TF errors span several).
        print(f"{kind}: {' '.join(str(message).split())}", file=self.stream, flush=True)

    def ok(self, message):
        self._line("ok", message)

    def skip(self, message):
        self._line("skip", message)

    def problem(self, message):
        self.problems += 1
        self._line("problem", message)


def _check(report, what, function):
    """Runs one check and returns its value; any failure becomes one problem line and None.

    Verify exists to examine damaged artifacts, and loaders of foreign files fail in many
    ways (h5py RuntimeError, zipfile.BadZipFile, tf.errors.*, protobuf DecodeError), so
    every Exception is reported rather than let through as a traceback.
    """
    try:
        return function()
    except errors.PipelineError as error:
        report.problem(f"{what}: {error}")
    except Exception as error:  # noqa: BLE001 (see the docstring)
        report.problem(f"{what}: cannot load ({type(error).__name__}: {error})")
    return None


def run_verify(out_dir, stream=None):
    """Checks OUT/ and prints one line per check to `stream` (stdout by default).

    Returns the exit code: 0 when the artifacts present are consistent, 2 otherwise.
    Raises PipelineError if `out_dir` is not a folder.
    """
    stream = stream or sys.stdout
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise errors.PipelineError(f"{out_dir}: no such folder")
    report = _Report(stream)

    config = _check(report, run_folder.CONFIG_FILE, lambda: run_folder.read_config(out_dir, requires="`extract`"))
    if config is not None:
        report.ok(f"{run_folder.CONFIG_FILE} loads")

    dataset = _check(report, run_folder.CAPTIONS_FILE, lambda: run_folder.read_captions(out_dir))
    if dataset is not None:
        report.ok(f"{run_folder.CAPTIONS_FILE}: {len(dataset.images)} images")

    vocabulary = _check(report, run_folder.VOCAB_FILE, lambda: run_folder.read_vocabulary(out_dir))
    if vocabulary is not None:
        report.ok(f"{run_folder.VOCAB_FILE}: {len(vocabulary)} words")

    # Unchecked here: _check_features reports a mismatch with config.json as its own problem.
    cache = _check(report, run_folder.FEATURES_FILE, lambda: _read_cache_summary(out_dir))
    if cache is not None:
        report.ok(f"{run_folder.FEATURES_FILE}: {len(cache.image_ids)} rows of {cache.feature_dim} values")
        _check_features(report, out_dir, config, dataset, cache)

    if (out_dir / run_folder.DECODER_FILE).exists():
        _check(report, run_folder.DECODER_FILE, lambda: _check_decoder(report, out_dir, config, vocabulary, cache))
    else:
        report.skip(f"{run_folder.DECODER_FILE} is not there yet (run `train`)")

    saved_model = out_dir / run_folder.SAVED_MODEL_DIR
    if saved_model.exists():
        _check(report, saved_model.name, lambda: _check_saved_model(report, saved_model, cache, vocabulary))
    else:
        report.skip(f"{saved_model.name}/ is not there yet (run `export`)")

    if report.problems:
        print(f"{report.problems} problem(s) in {out_dir}", file=stream)
        return 2
    print(f"{out_dir}: artifacts are consistent", file=stream)
    return 0


def _check_features(report, out_dir, config, dataset, cache):
    name = run_folder.FEATURES_FILE
    if config is not None:
        attributes_match = _check(
            report, f"{name} against {run_folder.CONFIG_FILE}",
            lambda: run_folder.check_feature_cache(cache.attrs, config.encoder, name) or True,
        )
        if attributes_match:
            report.ok(f"{name} attributes match config.json's encoder settings")
    if cache.nonfinite_rows:
        report.problem(f"{name}: {cache.nonfinite_rows} row(s) hold NaN or infinite values, "
                       f"e.g. {cache.first_nonfinite!r}")
    if len(set(cache.image_ids)) != len(cache.image_ids):
        report.problem(f"{name}: image_ids holds duplicates")
    if dataset is None:
        return
    failed = _check(report, run_folder.EXTRACT_ERRORS_FILE, lambda: run_folder.failed_image_ids(out_dir))
    listed = {record.image_id for record in dataset.images}
    expected = listed - (failed or set())
    cached = set(cache.image_ids)
    missing = sorted(expected - cached)
    foreign = sorted(cached - listed)
    if missing:
        report.problem(f"{name} lacks {len(missing)} image(s) of captions.json not listed in "
                       f"{run_folder.EXTRACT_ERRORS_FILE}, e.g. {missing[0]!r} (rerun `extract`)")
    if foreign:
        report.problem(f"{name} holds {len(foreign)} image(s) not in captions.json, e.g. {foreign[0]!r}: "
                       "a cache of another dataset?")
    if not missing and not foreign:
        report.ok(f"every usable image of captions.json has a row in {name}")


def _check_decoder(report, out_dir, config, vocabulary, cache):
    from models import decoder

    decoder_path = out_dir / run_folder.DECODER_FILE
    # Loaded without the vocabulary check: a mismatch is a problem line here, not an error.
    model = run_folder.load_decoder(out_dir)
    output_size = int(model.outputs[0].shape[-1])
    if vocabulary is not None and output_size != len(vocabulary):
        report.problem(
            f"{decoder_path.name} predicts {output_size} words but vocab.json has {len(vocabulary)}: "
            "the vocabulary of another run? (rerun `train`)"
        )
    else:
        report.ok(f"{decoder_path.name}: {output_size} output words")
    if config is not None and config.decoder.vocab_size and config.decoder.vocab_size != output_size:
        report.problem(f"config.json says decoder.vocab_size = {config.decoder.vocab_size}, "
                       f"{decoder_path.name} predicts {output_size} words")
    input_sizes = {tensor.name: tensor.shape[-1] for tensor in model.inputs}
    image_size = input_sizes.get(decoder.IMAGE_FEATURES_INPUT)
    if cache is not None and image_size is not None and int(image_size) != cache.feature_dim:
        report.problem(f"{decoder_path.name} takes {int(image_size)}-d image vectors but features.h5 holds "
                       f"{cache.feature_dim}-d ones")


def _check_saved_model(report, saved_model, cache, vocabulary):
    import json

    import numpy
    import tensorflow

    from pipeline.serving import exported_model

    loaded = tensorflow.saved_model.load(str(saved_model))
    signatures = (exported_model.SERVING_SIGNATURE, exported_model.FEATURES_SIGNATURE)
    missing = sorted(set(signatures) - set(loaded.signatures))
    if missing:
        report.problem(f"saved_model: signature(s) {', '.join(missing)} missing")
        return
    if cache is not None and cache.first_vector is not None and len(cache.first_vector):
        vector = cache.first_vector
    else:
        vector = numpy.zeros((1, 2048), numpy.float32)
    by_features = loaded.signatures[exported_model.FEATURES_SIGNATURE]
    result = by_features(features=tensorflow.constant(vector, tensorflow.float32))
    caption = result["captions"].numpy()[0].decode("utf-8")
    unknown = []
    if vocabulary is not None:
        known = set(vocabulary.words)
        unknown = [word for word in caption.split() if word not in known]
        if unknown:
            report.problem(f"saved_model writes words not in vocab.json ({unknown[:3]}): exported from another run?")
    if vocabulary is None or not unknown:
        report.ok(f"saved_model loads and captions one vector: {caption!r}")

    # The export's self-description (assets.extra/) must name this run's vocabulary and encoder.
    metadata_path = saved_model / exported_model.METADATA_DIR / exported_model.METADATA_FILE
    if not metadata_path.is_file():
        report.skip(f"saved_model has no {exported_model.METADATA_DIR}/{exported_model.METADATA_FILE} to compare")
        return
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    exported_size = metadata.get("vocabulary_size")
    if vocabulary is not None and exported_size != len(vocabulary):
        report.problem(f"saved_model was exported with {exported_size} words but vocab.json has "
                       f"{len(vocabulary)}: rerun `export`")
    exported_fingerprint = (metadata.get("encoder") or {}).get("encoder_fingerprint")
    cached_fingerprint = cache.attrs.get("encoder_fingerprint") if cache is not None else None
    if exported_fingerprint and cached_fingerprint and exported_fingerprint != cached_fingerprint:
        report.problem(f"saved_model's encoder (fingerprint {exported_fingerprint}) is not the one that made "
                       f"features.h5 ({cached_fingerprint}): rerun `export`")
