"""The cost of validation during training, on a Flickr8k-sized synthetic run folder.

    python -m benchmarks.bench_validation [--json FILE] [--quick] [--validate-every-steps N] [--validation-images N]

Builds OUT in a temporary folder as `extract` would leave it for Flickr8k
(`workloads.write_run_folder`): 6,000 train, 1,000 val and 1,000 test images of random
non-negative 2048-d vectors, 5 captions each of ~12 words drawn Zipf-like from a
~3,000-word vocabulary, then runs the real `train` stage
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

from benchmarks import workloads
from pipeline.core import io_utils

TRAIN_IMAGES = workloads.FLICKR8K_SPLITS["train"]
CAPTIONS_PER_IMAGE = workloads.CAPTIONS_PER_IMAGE


def build_run_folder(out_dir, seed=0):
    """Writes OUT of a synthetic Flickr8k-sized run (`workloads.write_run_folder`): every
    split at Flickr8k's size, CAPTIONS_PER_IMAGE Zipf-like captions an image."""
    captions_by_split = {split: workloads.synthetic_captions(count, CAPTIONS_PER_IMAGE, seed=seed + index)
                         for index, (split, count) in enumerate(workloads.FLICKR8K_SPLITS.items())}
    workloads.write_run_folder(out_dir, captions_by_split, seed=seed)


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
