"""The cost of validation during training, on a Flickr8k-sized synthetic run folder.

    python -m benchmarks.bench_validation [--json FILE] [--quick] [--validate-every-steps N] [--validation-images N]

Builds OUT in a temporary folder as `extract` would leave it for Flickr8k: 6,000 train,
1,000 val and 1,000 test images of random non-negative 2048-d vectors, 5 captions each of
~12 words drawn Zipf-like from a ~3,000-word vocabulary, then runs the real `train` stage
(`pipeline.train.run_train`, default decoder and batch) for a few validation periods and
reads each period's timings from history.json: training steps, the Keras validation loss,
and the greedy captioning and CIDEr-D/BLEU-4 scoring of the val images. The share is
(val loss + captioning + scoring) / (the whole period), from the same run; the first
period also pays for tracing, so it is reported apart.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

from pipeline.core import io_utils

TRAIN_IMAGES = 6000
VAL_IMAGES = 1000
TEST_IMAGES = 1000
CAPTIONS_PER_IMAGE = 5
VOCAB_WORDS = 3000
FEATURE_DIM = 2048
MEAN_CAPTION_WORDS = 12
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(index):
    """A distinct lower-case alphabetic word per index (captions are split on non-letters)."""
    letters = []
    index += 26 * 26  # three letters at least
    while index:
        index, remainder = divmod(index, 26)
        letters.append(LETTERS[remainder])
    return "".join(reversed(letters))


def build_run_folder(out_dir, seed=0):
    """Writes config.json, captions.json, vocab.json and features.h5 of a synthetic Flickr8k-sized run."""
    from pipeline.core import config as config_module
    from pipeline.data import datasets, features, text

    generator = np.random.default_rng(seed)
    words = [_word(index) for index in range(VOCAB_WORDS)]
    probabilities = 1.0 / np.arange(1, VOCAB_WORDS + 1)
    probabilities /= probabilities.sum()
    records = []
    for split, count in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES), ("test", TEST_IMAGES)):
        for index in range(count):
            lengths = np.clip(np.rint(generator.normal(MEAN_CAPTION_WORDS, 3.5, size=CAPTIONS_PER_IMAGE)), 5, 30)
            captions = [" ".join(words[word] for word in generator.choice(VOCAB_WORDS, size=int(length), p=probabilities))
                        for length in lengths]
            records.append(datasets.ImageRecord(f"{split}_{index:05d}.jpg", split, captions))
    records.sort(key=lambda record: record.image_id)
    dataset = datasets.Dataset(layout="kaggle", image_dir=out_dir, images=records, missing=[], name="synthetic")
    config = config_module.PipelineConfig()
    config.encoder.weights = "random"
    config.text.min_word_count = 1
    config.save(out_dir)
    datasets.write_captions_json(out_dir, dataset)
    text.Vocabulary.from_dataset(dataset, min_count=1).save(out_dir / text.VOCAB_FILE)
    vectors = np.abs(generator.normal(size=(len(records), FEATURE_DIM))).astype(np.float32)
    with features.FeatureWriter.create(out_dir / features.FEATURES_FILE, features.expected_attrs(config.encoder)) as writer:
        writer.append([record.image_id for record in records], vectors)
    io_utils.write_json(out_dir / "extract_errors.json", [])


def _parser():
    from pipeline.core.config import TrainConfig

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--quick", action="store_true", help="two periods instead of three")
    parser.add_argument("--validate-every-steps", type=int, default=defaults.validate_every_steps)
    parser.add_argument("--validation-images", type=int, default=defaults.validation_images)
    return parser


def run(quick, args=None):
    """Trains a few periods on the synthetic run folder; returns the timings and shares (dict)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pathlib import Path

    from pipeline import train
    from pipeline.core.config import TrainConfig
    from pipeline.data import run_folder

    args = args if args is not None else _parser().parse_args([])
    periods = 2 if quick else 3
    with tempfile.TemporaryDirectory(prefix="captioner_bench_validation_") as folder:
        out_dir = Path(folder)
        build_run_folder(out_dir)
        steps_per_epoch = -(-TRAIN_IMAGES * CAPTIONS_PER_IMAGE // TrainConfig().batch_size)
        overrides = {
            "train.validate_every_steps": args.validate_every_steps,
            "train.validation_images": args.validation_images,
            # The cap (whole epochs, rounded up to whole periods) ends the run after
            # `periods` periods; early stopping must not.
            "train.epochs": max(1, periods * args.validate_every_steps // steps_per_epoch),
            "train.patience_steps": 10 * periods * args.validate_every_steps,
        }
        summary = train.run_train(out_dir, overrides)
        history = run_folder.read_training_history(out_dir)
    later = history[1:]

    def share(entries):
        validation = sum(entry["val_loss_seconds"] + entry["val_seconds"] for entry in entries)
        return validation / sum(entry["seconds"] for entry in entries)

    results = {
        "settings": {"validate_every_steps": args.validate_every_steps, "validation_images": args.validation_images,
                     "periods": periods},
        "periods": [{name: entry[name] for name in ("step", "seconds", "train_seconds", "val_loss_seconds",
                                                    "val_seconds", "val_cider")} for entry in history],
        "val_images_scored": summary["val_images_scored"],
        "validation_share_first_period": share(history[:1]),
        "validation_share": share(later),
        "validation_greedy_share": sum(entry["val_seconds"] for entry in later) / sum(entry["seconds"] for entry in later),
        "train_captions_per_s_in_run": summary["captions_per_second"],
    }
    print(f"validation every {args.validate_every_steps} steps on {results['val_images_scored']} val images: "
          f"{100 * results['validation_share']:.1f}% of the period (greedy captions + CIDEr-D "
          f"{100 * results['validation_greedy_share']:.1f}%), first period {100 * results['validation_share_first_period']:.1f}% "
          "(with tracing)", file=sys.stderr)
    return results


def main():
    args = _parser().parse_args()
    results = run(args.quick, args)
    if args.json:
        io_utils.write_json(args.json, results, default=float)


if __name__ == "__main__":
    main()
