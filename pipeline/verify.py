"""`run_pipeline.py verify --out OUT`: checks the artifacts of a run against each other.

Every problem is reported on one line (`problem: ...`); checks that pass print `ok: ...`.
Exit code 0 when everything present is consistent, 2 otherwise. A stage's artifacts that
are simply not there yet (no decoder before `train`) are reported as `skip:` lines, so
verify can run after any stage.
"""

import json
import sys
from pathlib import Path

from pipeline import config as config_module
from pipeline import errors


class _Report:
    def __init__(self, stream):
        self.stream = stream
        self.problems = 0

    def ok(self, message):
        print(f"ok: {message}", file=self.stream)

    def skip(self, message):
        print(f"skip: {message}", file=self.stream)

    def problem(self, message):
        self.problems += 1
        print(f"problem: {message}", file=self.stream)


def _check(report, what, function):
    """Runs one check; a PipelineError or a damaged file becomes one problem line."""
    try:
        return function()
    except errors.PipelineError as error:
        report.problem(f"{what}: {error}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        report.problem(f"{what}: {type(error).__name__}: {error}")
    return None


def run_verify(out_dir, stream=None):
    """Checks OUT/; returns the exit code (0 consistent, 2 problems found)."""
    from pipeline import datasets, features, text

    stream = stream or sys.stdout
    out_dir = Path(out_dir)
    report = _Report(stream)
    if not out_dir.is_dir():
        raise errors.PipelineError(f"{out_dir}: no such folder")

    config = _check(report, "config.json", lambda: config_module.PipelineConfig.load(out_dir))
    if config is not None:
        report.ok("config.json loads")

    dataset = _check(report, "captions.json", lambda: datasets.read_captions_json(out_dir))
    if dataset is not None:
        report.ok(f"captions.json: {len(dataset.images)} images")

    vocabulary = _check(report, "vocab.json", lambda: text.Vocabulary.load(out_dir / "vocab.json"))
    if vocabulary is not None:
        report.ok(f"vocab.json: {len(vocabulary)} words")

    cache = _check(report, "features.h5", lambda: features.read_features(out_dir))
    if cache is not None:
        report.ok(f"features.h5: {len(cache.image_ids)} rows of {cache.features.shape[1]} values")
        _check_features(report, out_dir, config, dataset, cache)

    decoder_path = out_dir / "decoder.keras"
    if decoder_path.exists():
        _check(report, "decoder.keras", lambda: _check_decoder(report, decoder_path, config, vocabulary))
    else:
        report.skip("decoder.keras is not there yet (run `train`)")

    saved_model = out_dir / "saved_model"
    if saved_model.exists():
        _check(report, "saved_model", lambda: _check_saved_model(report, saved_model, cache, vocabulary))
    else:
        report.skip("saved_model/ is not there yet (run `export`)")

    if report.problems:
        print(f"{report.problems} problem(s) in {out_dir}", file=stream)
        return 2
    print(f"{out_dir}: artifacts are consistent", file=stream)
    return 0


def _check_features(report, out_dir, config, dataset, cache):
    import numpy

    from pipeline import features

    if config is not None:
        _check(report, "features.h5 attributes", lambda: features.check_attrs(cache.attrs, config.encoder))
        if cache.features.shape[1] != config.encoder.feature_dim:
            report.problem(
                f"features.h5: rows have {cache.features.shape[1]} values, config.json says "
                f"encoder.feature_dim = {config.encoder.feature_dim}"
            )
    if not numpy.isfinite(cache.features).all():
        bad = int((~numpy.isfinite(cache.features)).any(axis=1).sum())
        report.problem(f"features.h5: {bad} row(s) hold NaN or infinite values")
    if len(set(cache.image_ids)) != len(cache.image_ids):
        report.problem("features.h5: image_ids holds duplicates")
    if dataset is None:
        return
    failed = set()
    errors_path = Path(out_dir) / "extract_errors.json"
    if errors_path.exists():
        try:
            failed = {entry["image_id"] for entry in json.loads(errors_path.read_text(encoding="utf-8"))}
        except (ValueError, KeyError, TypeError) as error:
            report.problem(f"extract_errors.json: damaged ({error})")
    expected = {record.image_id for record in dataset.images} - failed
    cached = set(cache.image_ids)
    missing = sorted(expected - cached)
    foreign = sorted(cached - {record.image_id for record in dataset.images})
    if missing:
        report.problem(f"features.h5 lacks {len(missing)} image(s) of captions.json, e.g. {missing[0]!r} (rerun `extract`)")
    if foreign:
        report.problem(f"features.h5 holds {len(foreign)} image(s) not in captions.json, e.g. {foreign[0]!r}: a cache of another dataset?")
    if not missing and not foreign:
        report.ok("every image of captions.json has a feature row")


def _check_decoder(report, decoder_path, config, vocabulary):
    import keras

    model = keras.saving.load_model(decoder_path, compile=False)
    output_size = int(model.outputs[0].shape[-1])
    if vocabulary is not None and output_size != len(vocabulary):
        report.problem(
            f"decoder.keras writes {output_size} different tokens but vocab.json has {len(vocabulary)}: "
            "the vocabulary of another run?"
        )
    else:
        report.ok(f"decoder.keras: {output_size} output tokens")
    if config is not None and config.decoder.vocab_size and config.decoder.vocab_size != output_size:
        report.problem(f"config.json says decoder.vocab_size = {config.decoder.vocab_size}, decoder.keras has {output_size}")


def _check_saved_model(report, saved_model, cache, vocabulary):
    import numpy
    import tensorflow

    loaded = tensorflow.saved_model.load(str(saved_model))
    missing = {"serving_default", "caption_features"} - set(loaded.signatures)
    if missing:
        report.problem(f"saved_model: signature(s) {', '.join(sorted(missing))} missing")
        return
    if cache is not None and len(cache.image_ids):
        vector = cache.features[:1].astype(numpy.float32)
    else:
        vector = numpy.zeros((1, 2048), numpy.float32)
    result = loaded.signatures["caption_features"](features=tensorflow.constant(vector))
    caption = result["captions"].numpy()[0].decode("utf-8")
    if vocabulary is not None:
        unknown = [word for word in caption.split() if word not in set(vocabulary.words)]
        if unknown:
            report.problem(f"saved_model writes words not in vocab.json ({unknown[:3]}): exported from another run?")
            return
    report.ok(f"saved_model loads and captions one vector: {caption!r}")
