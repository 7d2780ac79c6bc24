"""Training memory against feature-cache size: a 20x larger cache must not cost 20x memory.

    python -m benchmarks.bench_memory [--quick] [--json FILE] [--keep DIR]

Two synthetic run folders are written with the pipeline's own artifact writers
(`workloads.write_run_folder`):

* small: a 10,000-vector cache;
* large: a 200,000-vector cache (float16 storage: 200,000 x 2048 x 2 B = 0.8 GB on disk,
  1.6 GB as float32), written in chunks.

Both have the same captions.json: the same captioned images (train and val) with the same
captions, so the training data is identical and only the cache grows. In the large cache
the captioned images are spread evenly over the 200,000 rows (every 20th row); the other
rows are images of the cache that captions.json does not mention (as when one cache serves
several caption sets). What grows with a larger *caption set* (captions.json, the encoded
token arrays, the row indices) is not what this compares.

Each measurement is one `pipeline.train.run_train` (1 epoch, small decoder) in a fresh
Python process that reports its own peak resident set size (`getrusage(RUSAGE_SELF)
.ru_maxrss`) and its resident size after importing TensorFlow and Keras (the fixed cost):

* small_in_memory: the small cache under `--max-cache-memory-gb` 0.5: loaded whole;
* small_streamed / large_streamed: the cache read from HDF5 batch by batch
  (`--max-cache-memory-gb` far below both caches).

`train_peak_rss_ratio` = large streamed / small in memory (the configuration a user gets
with one memory limit for both: target < 1.3); `streamed_peak_rss_ratio` compares the two
streamed runs; `*_above_import_mb` subtracts the import cost.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import workloads
from pipeline.core import io_utils

SMALL_VECTORS = 10_000
LARGE_VECTORS = 200_000
FEATURE_DIM = workloads.FEATURE_DIM
CAPTIONED_IMAGES = 10_000  # train + val, identical in both run folders
VAL_IMAGES = 1_000
VOCAB_WORDS = 500
IN_MEMORY_LIMIT_GB = 0.5  # the small cache (78 MiB as float32) fits, the large (1.5 GiB) does not
STREAMED_LIMIT_GB = 0.001
TRAIN_OVERRIDES = {
    "train.epochs": 1,
    "train.batch_size": 64,
    "decoder.units": 64,
    "decoder.embedding_dim": 32,
    "decoder.dropout": 0.0,
}

CHILD_SCRIPT = r"""
import json, os, resource, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import psutil
import keras
import tensorflow
from pipeline import train

import_rss_mb = psutil.Process().memory_info().rss / 2**20
summary = train.run_train(sys.argv[1], json.loads(sys.argv[2]))
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
print(json.dumps({"peak_rss_mb": peak_mb, "import_rss_mb": import_rss_mb, "summary": summary}))
"""


def write_run_folder(out_dir, num_vectors, captions, seed=0):
    """Writes a trainable OUT folder with a `num_vectors`-row float16 cache
    (`workloads.write_run_folder`); returns its path.

    captions: list of caption-string lists, one an image (the first VAL_IMAGES are val).
    The captioned images are rows 0, k, 2k, ... (k = num_vectors // len(captions)).
    """
    return workloads.write_run_folder(out_dir, {"val": captions[:VAL_IMAGES], "train": captions[VAL_IMAGES:]},
                                      num_vectors, feature_dtype="float16", seed=seed)


def measure(out_dir, max_cache_memory_gb):
    """One training run in a fresh process: dict peak_rss_mb, import_rss_mb, summary, seconds."""
    repo = Path(__file__).resolve().parents[1]
    overrides = dict(TRAIN_OVERRIDES, **{"train.max_cache_memory_gb": max_cache_memory_gb})
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", CHILD_SCRIPT, str(out_dir), json.dumps(overrides)], cwd=repo,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    if result.returncode != 0:
        raise RuntimeError(f"training run on {out_dir} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    measured["seconds"] = round(time.monotonic() - started, 1)
    # Cross-check: the largest of all finished children so far, which includes this one.
    measured["children_max_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return measured


def run(quick, keep_dir=None):
    """Writes both run folders, trains on each in a fresh process, returns the figures.

    quick: 1 caption per captioned image (9,000 train captions) instead of 5 (45,000).
    keep_dir: write the run folders there and keep them; None uses a temporary folder.
    Returns a dict with `train_peak_rss_mb_small`, `train_peak_rss_mb_large`,
    `train_peak_rss_ratio` (large streamed / small in memory), `streamed_peak_rss_ratio`,
    and each run's details under `runs`.
    """
    captions_per_image = 1 if quick else 5
    work = Path(keep_dir) if keep_dir else Path(tempfile.mkdtemp(prefix="bench_memory_"))
    need_gb = LARGE_VECTORS * FEATURE_DIM * 2 / 2**30 * 1.05
    free_gb = shutil.disk_usage(work if work.exists() else work.parent).free / 2**30
    if free_gb < need_gb + 1:
        raise RuntimeError(f"{work}: {free_gb:.1f} GiB free, the large cache needs {need_gb:.1f} GiB")
    captions = workloads.synthetic_captions(CAPTIONED_IMAGES, captions_per_image, VOCAB_WORDS)
    runs = {}
    try:
        started = time.monotonic()
        small = write_run_folder(work / "small", SMALL_VECTORS, captions)
        large = write_run_folder(work / "large", LARGE_VECTORS, captions)
        write_seconds = round(time.monotonic() - started, 1)
        print(f"wrote {SMALL_VECTORS:,} and {LARGE_VECTORS:,}-vector caches (float16) in {write_seconds} s; "
              f"{CAPTIONED_IMAGES:,} captioned images x {captions_per_image} captions in both", file=sys.stderr)
        for name, out_dir, limit in (("small_in_memory", small, IN_MEMORY_LIMIT_GB),
                                     ("small_streamed", small, STREAMED_LIMIT_GB),
                                     ("large_streamed", large, STREAMED_LIMIT_GB)):
            runs[name] = measure(out_dir, limit)
            print(f"{name}: peak {runs[name]['peak_rss_mb']:.0f} MB ({runs[name]['seconds']} s)", file=sys.stderr)
    finally:
        if not keep_dir:
            shutil.rmtree(work, ignore_errors=True)
    for name, expected in (("small_in_memory", True), ("small_streamed", False), ("large_streamed", False)):
        assert runs[name]["summary"]["features_in_memory"] is expected, (name, runs[name]["summary"])
    small_peak = runs["small_in_memory"]["peak_rss_mb"]
    large_peak = runs["large_streamed"]["peak_rss_mb"]

    def above_import(name):
        return runs[name]["peak_rss_mb"] - runs[name]["import_rss_mb"]

    return {
        "mode": "quick" if quick else "full",
        "train_captions": runs["large_streamed"]["summary"]["train_captions"],
        "cache_vectors_small": SMALL_VECTORS,
        "cache_vectors_large": LARGE_VECTORS,
        "train_peak_rss_mb_small": round(small_peak, 1),
        "train_peak_rss_mb_large": round(large_peak, 1),
        "train_peak_rss_ratio": round(large_peak / small_peak, 3),
        "streamed_peak_rss_ratio": round(large_peak / runs["small_streamed"]["peak_rss_mb"], 3),
        "train_peak_above_import_mb_small": round(above_import("small_in_memory"), 1),
        "train_peak_above_import_mb_large": round(above_import("large_streamed"), 1),
        "write_seconds": write_seconds,
        "runs": runs,
    }


def print_table(results):
    print(f"{'run':<18}{'cache rows':>12}{'features':>10}{'peak RSS MB':>13}{'after imports MB':>18}"
          f"{'train captions':>16}{'seconds':>9}")
    for name, run_result in results["runs"].items():
        rows = results["cache_vectors_large"] if name.startswith("large") else results["cache_vectors_small"]
        where = "memory" if run_result["summary"]["features_in_memory"] else "HDF5"
        print(f"{name:<18}{rows:>12,}{where:>10}{run_result['peak_rss_mb']:>13.0f}{run_result['import_rss_mb']:>18.0f}"
              f"{run_result['summary']['train_captions']:>16,}{run_result['seconds']:>9.1f}")
    print(f"peak ratio large streamed / small in memory: {results['train_peak_rss_ratio']:.2f} (target < 1.3); "
          f"large / small, both streamed: {results['streamed_peak_rss_ratio']:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 caption per image instead of 5")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--keep", help="write the run folders into this folder and keep them")
    args = parser.parse_args(argv)
    results = run(args.quick, keep_dir=args.keep)
    print_table(results)
    if args.json:
        io_utils.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
