"""Evaluation on the test split: captions, metrics and the HTML report.

Reads `OUT/decoder.keras`, `OUT/vocab.json`, `OUT/captions.json` and `OUT/features.h5`,
captions every test image from its cached vector with `models.captioner.FeatureCaptioner`
(the same in-graph decoding the SavedModel exports), scores the captions against all
references, and writes:

    OUT/metrics.json        bleu_1..bleu_4, cider, meteor (when Java works), n_images,
                            beam_size, distinct_captions, shuffled_bleu_4, the caption
                            shape (bad_endings, immediate_repeats, mean_length,
                            vocabulary_used: `metrics.caption_shape`), objective ("xe" or
                            "scst": which training produced decoder.keras) and, after
                            `finetune`, "xe": the same figures of the XE decoder
    OUT/metrics_xe.json     after `finetune`: every metric of OUT/decoder_xe.keras
    OUT/captions_test.json  per test image: id, generated caption, score, references
    OUT/report.html         metrics, training curves, gallery (`pipeline.evaluation.report`)

`shuffled_bleu_4` is the grounding control: the same model captions each test image from
another test image's vector (a fixed derangement), scored against the original image's
references. A decoder that ignores the image scores the same either way; a grounded one
loses BLEU when fed the wrong picture.
"""

import sys
import time
from pathlib import Path

import numpy as np

from pipeline.core import device, errors, io_utils, progress
from pipeline.data import run_folder, text
from pipeline.evaluation import metrics, report

# Copied from metrics_xe.json into metrics.json's "xe", so one file holds both sides.
XE_SUMMARY_KEYS = ("bleu_4", "cider", "shuffled_bleu_4", "bad_endings", "immediate_repeats", "mean_length",
                   "vocabulary_used")
TEST_CAPTIONS_FORMAT = "captioner.test_captions"
CAPTION_BATCH_SIZE = 64
# The derangement of the grounding control is fixed per run: seeded from config.seed plus
# this offset so it does not coincide with other uses of the seed.
SHUFFLE_SEED_OFFSET = 1


def load_feature_captioner(out_dir, config, vocabulary, decoder_file=run_folder.DECODER_FILE):
    """The trained decoder of OUT (`decoder_file`) wrapped in a FeatureCaptioner with `config.decode`.

    Raises ArtifactError if the decoder is missing, unreadable, or from another vocabulary.
    """
    from models import captioner

    model = run_folder.load_decoder(out_dir, decoder_file, vocabulary_size=len(vocabulary))
    try:
        return captioner.FeatureCaptioner(
            model, vocabulary.words, config.decode,
            start_id=text.START_ID, end_id=text.END_ID, unk_id=text.UNK_ID, pad_id=text.PAD_ID,
        )
    except ValueError as error:
        raise errors.ArtifactError(
            f"{Path(out_dir) / decoder_file}: {error}; run `train` again after `extract`") from None


def caption_rows(feature_captioner, image_features, batch_size=CAPTION_BATCH_SIZE, label="caption"):
    """Captions image vectors in batches, reporting progress.

    Args:
        feature_captioner: a `models.captioner.FeatureCaptioner`.
        image_features: np.ndarray float32 [N, feature_dim].
        batch_size: int.
    Returns:
        (list[str] of N captions, np.ndarray float32 [N] scores).
    """
    captions, scores = [], []
    with progress.Progress(len(image_features), label=label, unit="images") as reporter:
        for start in range(0, len(image_features), batch_size):
            batch = image_features[start:start + batch_size]
            result = feature_captioner.caption_features(batch)
            captions.extend(value.decode("utf-8") for value in result["captions"].numpy())
            scores.append(result["scores"].numpy())
            reporter.update(len(batch))
    return captions, np.concatenate(scores).astype(np.float32) if scores else np.zeros((0,), np.float32)


def _test_images(out_dir, config):
    """The usable test images (`run_folder.UsableImages`) and float32 [N, D] their vectors."""
    with run_folder.open_feature_cache(out_dir, config.encoder) as reader:
        images = run_folder.usable_images(out_dir, "test", reader.image_ids)
        if len(images) < 2:
            raise errors.PipelineError(
                f"{Path(out_dir) / run_folder.CAPTIONS_FILE}: the test split has {len(images)} usable image(s); "
                "evaluation needs at least 2 (the grounding control swaps images)"
            )
        return images, reader.read(images.rows)


def _devices(out_dir, config, finetune_history):
    """What computed the run, for the report: (stage, device line) str pairs, from the cache's
    `device` attribute, config.json's train.device and the fine-tuning history's settings."""
    with run_folder.open_feature_cache(out_dir) as reader:
        extracted = reader.attrs.get("device") or f"not recorded ({reader.attrs.get('precision', 'fp32')})"
    devices = [("features (extract)", extracted), ("decoder (train)", config.train.device or "not recorded")]
    if finetune_history:
        devices.append(("fine-tuning (finetune)", finetune_history.get("settings", {}).get("device") or "not recorded"))
    return devices


def _score_decoder(out_dir, config, vocabulary, decoder_file, image_features, references, label="evaluate"):
    """Captions and metrics of one decoder of OUT on the test images.

    Returns:
        (metrics dict, list[str] captions, np.ndarray float32 [N] scores, list[str] notes).
    """
    feature_captioner = load_feature_captioner(out_dir, config, vocabulary, decoder_file)
    generated, scores = caption_rows(feature_captioner, image_features, label=label)
    permutation = metrics.derangement(len(image_features), seed=config.seed + SHUFFLE_SEED_OFFSET)
    shuffled, _ = caption_rows(feature_captioner, image_features[permutation], label=f"{label}: grounding control")
    hypotheses = [caption.split() for caption in generated]
    scored, notes = metrics.caption_metrics(references, hypotheses)
    result = dict(scored)
    result.update({
        "n_images": len(image_features),
        "beam_size": config.decode.beam_size,
        "distinct_captions": metrics.distinct_captions(generated),
        "shuffled_bleu_4": metrics.bleu_scores(references, [caption.split() for caption in shuffled])["bleu_4"],
    })
    result.update(metrics.caption_shape(hypotheses))
    if notes:
        result["notes"] = notes
    return result, generated, scores, notes


def run_evaluate(out_dir, overrides):
    """Captions the test split, scores it and writes metrics.json, captions_test.json and report.html.

    Args:
        out_dir: str or Path, a run folder after `train`.
        overrides: {"decode.field": value}, e.g. {"decode.beam_size": 5} (None values ignored).
    Returns:
        dict, the content of OUT/metrics.json.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    config = run_folder.read_config(out_dir, requires="`extract` and `train`").replace(overrides)
    config.check("decode")
    device.announce("evaluate", "fp32")  # decoder.keras is float32 whatever it was trained in
    vocabulary = run_folder.read_vocabulary(out_dir)
    images, image_features = _test_images(out_dir, config)
    records, references = images.records, images.references
    objective = run_folder.decoder_objective(out_dir)
    result, generated, scores, notes = _score_decoder(
        out_dir, config, vocabulary, run_folder.DECODER_FILE, image_features, references)
    result["objective"] = objective
    compared = None
    if objective == "scst":
        # The cross-entropy decoder fine-tuning started from, scored the same way beside it.
        xe_result, xe_generated, _, _ = _score_decoder(
            out_dir, config, vocabulary, run_folder.XE_DECODER_FILE, image_features, references, label="evaluate (xe)")
        xe_result["objective"] = "xe"
        io_utils.write_json(out_dir / run_folder.XE_METRICS_FILE, xe_result)
        compared = {"label": "cross-entropy decoder", "metrics": xe_result, "captions": xe_generated}
        result["xe"] = {key: xe_result[key] for key in XE_SUMMARY_KEYS if key in xe_result}
    else:
        (out_dir / run_folder.XE_METRICS_FILE).unlink(missing_ok=True)
    io_utils.write_json(out_dir / run_folder.METRICS_FILE, result)

    caption_entries = [
        {"image_id": record.image_id, "caption": caption, "score": float(score), "references": list(record.captions)}
        for record, caption, score in zip(records, generated, scores)
    ]
    if compared:
        for entry, caption in zip(caption_entries, compared["captions"]):
            entry["caption_xe"] = caption
    io_utils.write_json(out_dir / run_folder.TEST_CAPTIONS_FILE, {
        "format": TEST_CAPTIONS_FORMAT, "version": 1, "decode": vars(config.decode).copy(),
        "captions": caption_entries,
    })
    title = f"Captioner report: {out_dir.name} (beam size {config.decode.beam_size})"
    finetune_history = run_folder.read_finetune_history(out_dir)
    report_path = report.write_report(
        out_dir, title, result, caption_entries, run_folder.read_training_history(out_dir), config.data.image_dir,
        notes=notes,
        compared_metrics=compared["metrics"] if compared else None,
        finetune_history=finetune_history["epochs"] if finetune_history else None,
        devices=_devices(out_dir, config, finetune_history),
    )
    config.save(out_dir)

    for note in notes:
        print(f"evaluate: {note}", file=sys.stderr)
    skipped = images.failed + images.wordless
    meteor = f", METEOR {result['meteor']:.3f}" if "meteor" in result else ""
    print(
        f"evaluate: {len(records)} test images"
        + (f" ({skipped} skipped: extraction failed or no words)" if skipped else "")
        + f", BLEU-1 {result['bleu_1']:.3f}, BLEU-4 {result['bleu_4']:.3f}, CIDEr-D {result['cider']:.3f}{meteor}, "
        f"distinct {result['distinct_captions']:.2f}, shuffled BLEU-4 {result['shuffled_bleu_4']:.3f}, "
        f"bad endings {result['bad_endings']:.2f}, repeats {result['immediate_repeats']:.2f} ({objective} decoder"
        + (f"; XE: CIDEr-D {compared['metrics']['cider']:.3f}, bad endings {compared['metrics']['bad_endings']:.2f}, "
           f"repeats {compared['metrics']['immediate_repeats']:.2f}" if compared else "")
        + "), "
        f"{time.monotonic() - started:.1f} s -> {out_dir / run_folder.METRICS_FILE}, {report_path}",
        file=sys.stderr,
    )
    return result
