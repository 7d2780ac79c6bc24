"""Stage costs against dataset size: per-item cost, start-up and peak memory of every stage.

    python -m benchmarks.bench_scale [--sizes N [N ...]] [--quick] [--json FILE] [--keep DIR] [--stages S ...] [--read-all-rows]
    python -m benchmarks.bench_scale --reward-setup [--sizes N ...] [--baseline-revision REV] [--json FILE]
    python -m benchmarks [--quick] --only bench_scale     (QUICK_SIZES, or SUITE_SIZES)

Default sizes 7,700, 30,800 and 123,287 images (~7k, 28k and 113k training images): about
40 minutes on 2 shared cores, 18 of them at COCO size.

For each size (images in all), a Karpathy-format dataset is generated: `dataset_coco.json`
and `images/{train2014,val2014}/*.jpg` (32 px JPEGs of random colour blocks), split in COCO's
Karpathy proportions (82,783 train, 30,504 restval, 5,000 val, 5,000 test of 123,287), five
captions of 8-16 words an image, words drawn from ZIPF_TYPES types with probability
proportional to rank ** -ZIPF_EXPONENT: at COCO size ~24.5k types occur and ~9.6k of them
occur 5 times or more in the training split, COCO's figures. Each stage then runs as
`python run_pipeline.py STAGE --out OUT` in a child process of its own:

    extract    --weights random at encoder.image_size 32 (written to OUT/config.json first)
    train      default settings, stopped (SIGINT) when period TRAIN_PERIODS + 1 begins
    evaluate   default settings
    verify
    finetune   default settings, stopped once its progress lines span FINETUNE_SECONDS

Figures per stage and size:
    per_item_ms   extract, evaluate: (exit - first progress line) per image (all images, test
                  images); verify: wall time per image; train: the last finished validation
                  period's wall time (steps, val loss, CIDEr-D pass) per training caption it
                  trained on (OUT/history.json); finetune: between its first and last progress
                  lines, per sampled caption
    startup_s     from the child's start to its first progress line (train: Keras' "Epoch 1/",
                  printed before the first step); verify prints none
    peak_rss_mb   the stage process's own peak resident set size (its VmHWM, read every 0.1 s)
    cache_map_mb, peak_all_rows_mb  for a stage that maps features.h5 (train, finetune): the
                  largest resident part of that map, and the peak had every row it holds
                  been read: its largest resident set without the map (sampled every 0.5 s)
                  plus those rows (held_rows_mb, from the stage's own line), or peak_rss_mb
                  if that is larger. Rows join the resident set as they are first read; a
                  short run reads only part of them.
    tree_peak_rss_mb  the largest peak of the stage and the processes it started (`os.wait4`'s
                  ru_maxrss): above peak_rss_mb only when a child outgrew the stage, as
                  evaluate's METEOR 1.5 JVM (pycocoevalcap's `java -Xmx2G`) does
and, as its own row, the CIDEr-D reward set-up (`CiderD(...)` on the training split's
captions as token ids, in a child process): per_item_ms per training image, peak_rss_mb the
child's resident growth during the set-up (sampled every millisecond).

With `--read-all-rows`, train and finetune read every feature row they hold before their first
step (they map the rows, which otherwise join their resident set as batches first read them),
so peak_rss_mb is the peak a whole epoch reaches, measured; their start-up includes that read.

With `--keep DIR`, the datasets and run folders stay in DIR/coco_SIZE/{data,out}, and a later
run with the same DIR reuses a dataset already there (and its cache: extract then only checks
it); `--stages` runs only the stages named (reward_setup extract train evaluate verify finetune),
e.g. `--keep /tmp/scale_data --stages train` to time training again on a kept COCO-sized cache.

A stage whose per-item cost at the largest size is more than 20% above the smallest's is
flagged "GROWS". `--reward-setup` measures the reward set-up alone; with
`--baseline-revision REV` it also measures the CiderD of git revision REV, alternately with
the current one, so their ratio comes from one run on one machine state.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks import workloads

REPO = Path(__file__).resolve().parents[1]
COCO_SPLITS = {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000}
COCO_IMAGES = sum(COCO_SPLITS.values())  # 123,287
SPLIT_FOLDERS = {"train": "train2014", "restval": "val2014", "val": "val2014", "test": "val2014"}
CAPTIONS_PER_IMAGE = 5
SHORTEST_CAPTION, LONGEST_CAPTION = 8, 16  # words
ZIPF_TYPES, ZIPF_EXPONENT = 27_500, 1.445
MIN_WORD_COUNT = 5  # the pipeline's text.min_word_count, for the reward's vocabulary
IMAGE_SIZE = 32
SPECIAL_TOKENS = 4  # <pad> <start> <end> <unk>: ids 0-3, as in pipeline.data.text
END_ID, UNK_ID = 2, 3
SIZES = (7_700, 30_800, COCO_IMAGES)  # ~7k, 28k and 113k training images
QUICK_SIZES = (200, 400)
SUITE_SIZES = SIZES[:2]  # the suite's full form; COCO size on the command line (~20 minutes more)
REWARD_SIZES = (7_000, 28_000, 113_287)  # training images
TRAIN_PERIODS, QUICK_PERIOD_STEPS = 2, 10
FINETUNE_SECONDS, QUICK_FINETUNE_SECONDS = 60.0, 10.0
GROWTH_LIMIT = 1.2
REWARD_BATCHES = 50  # fine-tuning steps' scoring timed after the reward set-up
STOP_GRACE_SECONDS = 120.0
SMAPS_EVERY = 5  # of the 0.1 s samples of a stage's memory: /proc/PID/smaps every 0.5 s
SMAPS_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")  # a mapping's first line in /proc/PID/smaps
DATASET_INFO = "bench_scale_dataset.json"  # write_dataset's summary, beside a kept dataset
STAGES = ("reward_setup", "extract", "train", "evaluate", "verify", "finetune")
PROGRESS_LINE = re.compile(r"^(?P<label>.*?) ?(?P<done>\d+)/(?P<total>\d+) (?P<unit>[a-z]+)\b.* ETA ")
# train's and finetune's console line on the rows they map (`InMemoryFeatures.describe`).
HELD_ROWS = re.compile(r"^(?:train|finetune): .*features in memory \((?P<rows>[\d,]+) rows, (?P<mib>\d+) MiB, mapped")
KERAS_EPOCH = re.compile(r"^Epoch (?P<epoch>\d+)/\d+")


def zipf_captions(rng, num_captions):
    """(word ranks int32 [W], words per caption int64 [num_captions]), Zipf-like over ZIPF_TYPES."""
    lengths = rng.integers(SHORTEST_CAPTION, LONGEST_CAPTION + 1, size=num_captions)
    return workloads.zipf_word_ids(rng, lengths, ZIPF_TYPES, ZIPF_EXPONENT), lengths


def split_sizes(num_images):
    """{split: images} in COCO's Karpathy proportions (largest remainder; val and test >= 1)."""
    shares = {split: count * num_images / COCO_IMAGES for split, count in COCO_SPLITS.items()}
    sizes = {split: int(share) for split, share in shares.items()}
    for split in sorted(shares, key=lambda name: sizes[name] - shares[name])[:num_images - sum(sizes.values())]:
        sizes[split] += 1
    for split in ("val", "test"):
        if sizes[split] == 0:
            sizes[split], sizes["train"] = 1, sizes["train"] - 1
    return sizes


def write_dataset(folder, num_images, seed=0):
    """Writes folder/dataset_coco.json and folder/images/; returns {splits, captions, word_types}."""
    folder = Path(folder)
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = split_sizes(num_images)
    splits = np.repeat(list(sizes), list(sizes.values()))
    ranks, lengths = zipf_captions(rng, num_images * CAPTIONS_PER_IMAGE)
    words = [workloads.word(rank) for rank in range(ZIPF_TYPES)]
    caption_words = np.split(np.asarray(words, dtype=object)[ranks], np.cumsum(lengths)[:-1])
    for split_folder in set(SPLIT_FOLDERS.values()):
        (folder / "images" / split_folder).mkdir(parents=True, exist_ok=True)
    with open(folder / "dataset_coco.json", "w") as stream:
        stream.write('{"dataset": "coco", "images": [')
        for image in range(num_images):
            split_folder = SPLIT_FOLDERS[splits[image]]
            sentences = [{"tokens": list(tokens), "raw": " ".join(tokens) + ".", "imgid": image, "sentid": sentence}
                         for sentence in range(image * CAPTIONS_PER_IMAGE, (image + 1) * CAPTIONS_PER_IMAGE)
                         for tokens in [caption_words[sentence]]]
            entry = {"filepath": split_folder, "filename": f"COCO_{split_folder}_{image:012d}.jpg", "imgid": image,
                     "split": str(splits[image]), "sentids": [s["sentid"] for s in sentences], "cocoid": image,
                     "sentences": sentences}
            stream.write(("," if image else "") + json.dumps(entry))
        stream.write("]}")
    # Blocks of 4x4 random colours: tiny, cheap JPEGs that still differ from image to image.
    for start in range(0, num_images, 4096):
        stop = min(start + 4096, num_images)
        blocks = rng.integers(0, 256, size=(stop - start, 4, 4, 3), dtype=np.uint8)
        pixels = blocks.repeat(IMAGE_SIZE // 4, axis=1).repeat(IMAGE_SIZE // 4, axis=2)
        for offset, image_pixels in enumerate(pixels):
            split_folder = SPLIT_FOLDERS[splits[start + offset]]
            Image.fromarray(image_pixels).save(
                folder / "images" / split_folder / f"COCO_{split_folder}_{start + offset:012d}.jpg", quality=90)
    return {"splits": sizes, "captions": int(len(lengths)), "word_types": int(len(np.unique(ranks)))}


def reward_references(num_images, seed=0):
    """Training captions as token ids for the reward: (list over images of 5 int32 arrays ending
    in `<end>`, vocabulary size), words seen MIN_WORD_COUNT times or more numbered by rank."""
    ranks, lengths = zipf_captions(np.random.default_rng(seed), num_images * CAPTIONS_PER_IMAGE)
    counts = np.bincount(ranks, minlength=ZIPF_TYPES)
    kept = counts >= MIN_WORD_COUNT
    ids = np.where(kept, np.cumsum(kept) - 1 + SPECIAL_TOKENS, UNK_ID).astype(np.int32)
    captions = [np.append(caption, END_ID).astype(np.int32) for caption in np.split(ids[ranks], np.cumsum(lengths)[:-1])]
    references = [captions[image * CAPTIONS_PER_IMAGE:(image + 1) * CAPTIONS_PER_IMAGE] for image in range(num_images)]
    return references, int(kept.sum()) + SPECIAL_TOKENS


def _cider_class(revision):
    """CiderD of the working tree (revision None) or of git revision `revision`."""
    if revision is None:
        from pipeline.training.cider_reward import CiderD

        return CiderD
    import importlib.util

    for path in ("pipeline/training/cider_reward.py", "pipeline/cider_reward.py"):
        shown = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=REPO, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"bench_scale: no cider_reward.py at git revision {revision}")
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as folder:
        module_path = Path(folder) / "cider_reward_baseline.py"
        module_path.write_text(shown.stdout)
        spec = importlib.util.spec_from_file_location("cider_reward_baseline", module_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.CiderD


def source_revision():
    """`git describe --always --dirty` of the code measured, or None outside a git checkout."""
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    return described.stdout.strip() or None if described.returncode == 0 else None


def reward_setup_child(num_images, revision, repeats):
    """In a child process: {seconds (best of `repeats`), peak_rss_growth_mb, held_rss_mb, vocabulary_size}."""
    import gc

    import psutil

    CiderD = _cider_class(revision)
    references, vocabulary_size = reward_references(num_images)
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    peak, running = [before], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    scorer = CiderD(references, vocabulary_size)
    times = [time.perf_counter() - started]
    running[0] = False
    sampler.join()
    held = process.memory_info().rss - before
    # A fine-tuning step's scoring: 32 images x 5 samples, candidates of other images' captions.
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(REWARD_BATCHES):
        images = rng.integers(0, num_images, size=32).repeat(5)
        candidates = [references[image][0] for image in rng.integers(0, num_images, size=len(images))]
        token_ids = np.zeros((len(candidates), LONGEST_CAPTION + 1), dtype=np.int32)
        for row, caption in enumerate(candidates):
            token_ids[row, :len(caption)] = caption
        batches.append((token_ids, np.asarray([len(caption) for caption in candidates]), images))
    started = time.perf_counter()
    for batch in batches:
        scorer.scores(*batch)
    scores_seconds = (time.perf_counter() - started) / REWARD_BATCHES
    del scorer
    for _ in range(repeats - 1):
        started = time.perf_counter()
        CiderD(references, vocabulary_size)
        times.append(time.perf_counter() - started)
    return {"seconds": min(times), "peak_rss_growth_mb": (peak[0] - before) / 2**20, "held_rss_mb": held / 2**20,
            "vocabulary_size": vocabulary_size, "scores_ms_per_step": 1000 * scores_seconds}


def measure_reward_setup(num_images, revision=None, repeats=2):
    """Runs `reward_setup_child` in a fresh process; its result with per_item_ms (per image) added."""
    command = [sys.executable, "-m", "benchmarks.bench_scale", "--reward-child", str(num_images),
               "--repeats", str(repeats)] + (["--baseline-revision", revision] if revision else [])
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"bench_scale: reward set-up child failed:\n{completed.stderr[-2000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result.update(images=num_images, revision=revision or "working tree",
                  per_item_ms=1000 * result["seconds"] / num_images)
    return result


def _status_mb(pid, field):
    """Field `field` ("VmHWM": the peak resident set size so far, "VmRSS": the current one) of
    process `pid`, in MiB; 0.0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else 0.0


def _cache_map_mb(pid):
    """The resident part of process `pid`'s memory maps of features.h5, in MiB (0.0 once it is
    gone). Training maps the cache (`features.MappedRows`): its rows join the resident set as
    they are first read, the page cache's pages, not new memory."""
    try:
        maps = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return 0.0
    mapped_kb, in_cache_map = 0, False
    for line in maps.splitlines():
        if SMAPS_HEADER.match(line):
            in_cache_map = line.endswith("/features.h5")
        elif in_cache_map and line.startswith("Rss:"):
            mapped_kb += int(line.split()[1])
    return mapped_kb / 1024


def _all_rows(figures):
    """", N MiB with its R MiB of rows read (M MiB read)" for a stage that maps the cache, else ""."""
    if "peak_all_rows_mb" not in figures:
        return ""
    return (f", {figures['peak_all_rows_mb']:.0f} MiB with its {figures['held_rows_mb']} MiB of rows read "
            f"({figures['cache_map_mb']:.0f} MiB read)")


def _child_peak(own_mb, tree_mb):
    """" (a child N MiB)" when a child process of the stage peaked above the stage itself, else ""."""
    return f" (a child {tree_mb:.0f} MiB)" if tree_mb > own_mb + 1 else ""


class StageRun:
    """One `run_pipeline.py` child: its output lines with times, stopped by `stop(run)` if given.

    Attributes after `run()`: lines (list of (seconds since start, stream name, text)),
    exit_code (int; 130 after a stop by SIGINT), stopped (bool), seconds (float, wall),
    peak_rss_mb (float: the stage process's own peak), tree_peak_rss_mb (float: the largest
    peak of it and its children), cache_map_mb (float: the largest resident part of its maps
    of features.h5) and unmapped_peak_mb (float: its largest resident set without them), the
    last two sampled every SMAPS_EVERY / 10 s.
    """

    def __init__(self, command, stop=None):
        self.command, self.stop = command, stop
        self.lines, self.stopped, self.stop_time = [], False, None

    def run(self, environment):
        self.started = time.monotonic()
        # SIGINT back to its default in the child: a shell starting this benchmark in the
        # background (`&`) ignores it, the child would inherit that, and a stop would wait for SIGTERM.
        process = subprocess.Popen(self.command, cwd=REPO, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, bufsize=1,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                   for stream, name in ((process.stdout, "stdout"), (process.stderr, "stderr"))]
        for reader in readers:
            reader.start()
        signals = [(0.0, signal.SIGINT), (STOP_GRACE_SECONDS, signal.SIGTERM), (2 * STOP_GRACE_SECONDS, signal.SIGKILL)]
        self.peak_rss_mb = self.cache_map_mb = self.unmapped_peak_mb = 0.0
        samples = 0
        while True:
            # wait4, not Popen.wait: its ru_maxrss is the peak of the child and of its children.
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            self.peak_rss_mb = max(self.peak_rss_mb, _status_mb(process.pid, "VmHWM"))
            samples += 1
            if samples % SMAPS_EVERY == 0:  # reading smaps costs ~40 ms
                mapped = _cache_map_mb(process.pid)
                self.cache_map_mb = max(self.cache_map_mb, mapped)
                self.unmapped_peak_mb = max(self.unmapped_peak_mb, _status_mb(process.pid, "VmRSS") - mapped)
            if not self.stopped and self.stop is not None and self.stop(self):
                self.stopped, self.stop_time = True, time.monotonic()
            if self.stopped and signals and time.monotonic() - self.stop_time >= signals[0][0]:
                process.send_signal(signals.pop(0)[1])
            time.sleep(0.1)
        self.seconds = time.monotonic() - self.started
        process.returncode = self.exit_code = os.waitstatus_to_exitcode(status)
        for reader in readers:
            reader.join()
        self.tree_peak_rss_mb = usage.ru_maxrss / 1024  # Linux: KiB
        return self

    def _read(self, stream, name):
        for text in stream:
            self.lines.append((time.monotonic() - self.started, name, text.rstrip("\n")))

    def first(self, pattern):
        """(seconds, match) of the first line matching `pattern`, or (None, None)."""
        return next(((seconds, found) for seconds, _, text in list(self.lines)
                     for found in [pattern.match(text)] if found), (None, None))

    def progress(self, label_prefix):
        """[(seconds, done)] of the progress lines whose label starts with `label_prefix`."""
        return [(seconds, int(found["done"])) for seconds, _, text in list(self.lines)
                for found in [PROGRESS_LINE.match(text)] if found and found["label"].startswith(label_prefix)]

    def failure(self):
        """The last stderr lines, when the child failed without being stopped; else None."""
        if self.exit_code == 0 or (self.stopped and self.exit_code in (130, -signal.SIGINT)):
            return None
        return "\n".join(text for _, name, text in self.lines[-15:] if name == "stderr")


# `--read-all-rows`: train and finetune run through this, which reads every feature row they
# hold right after `load_training_data`, so their peak is the one a whole epoch reaches.
READ_ALL_ROWS = """
import sys
import numpy as np
import run_pipeline
from pipeline.core import console
from pipeline.training import inputs

load_training_data = inputs.load_training_data

def load_and_read_every_row(*args, **kwargs):
    data = load_training_data(*args, **kwargs)
    held = len(data.feature_rows.array) if data.in_memory else 0
    for start in range(0, held, 4096):
        data.feature_rows.read(np.arange(start, min(start + 4096, held)))
    return data

inputs.load_training_data = load_and_read_every_row
console.quiet_tensorflow_logs()
sys.exit(run_pipeline.main(sys.argv[1:]))
"""


def _pipeline(stage, out, *arguments, read_all_rows=False):
    program = ["-c", READ_ALL_ROWS] if read_all_rows else ["run_pipeline.py"]
    return [sys.executable, *program, stage, "--out", str(out), *arguments]


def run_stages(data_dir, out, sizes_info, period_steps=None, finetune_seconds=FINETUNE_SECONDS, log=print,
               stages=STAGES, read_all_rows=False):
    """Runs extract, train, evaluate, verify and finetune (those of `stages`) on one dataset; {stage: figures}.
    read_all_rows: train and finetune read every row they hold before their first step (READ_ALL_ROWS)."""
    from pipeline.core import config as config_module

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.json").exists():
        config_module.PipelineConfig().replace({"encoder.image_size": IMAGE_SIZE}).save(out)
    environment = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    images = sum(sizes_info.values())
    results = {}

    def record(name, run, items, unit, per_item_seconds, startup, **extra):
        failure = run.failure()
        results[name] = {"items": items, "unit": unit, "exit_code": run.exit_code, "stopped": run.stopped,
                         "wall_seconds": round(run.seconds, 2), "startup_s": startup,
                         "per_item_ms": None if per_item_seconds is None else 1000 * per_item_seconds,
                         "peak_rss_mb": round(run.peak_rss_mb, 1), "tree_peak_rss_mb": round(run.tree_peak_rss_mb, 1),
                         **extra}
        _, held = run.first(HELD_ROWS)
        if held:
            # Had every row it holds been read: the rest at its largest plus those rows.
            held_mb = int(held["mib"])
            results[name].update(held_rows_mb=held_mb, cache_map_mb=round(run.cache_map_mb, 1),
                                 peak_all_rows_mb=round(max(run.peak_rss_mb, run.unmapped_peak_mb + held_mb), 1))
        if failure:
            results[name]["error"] = failure
        log(f"   {name}: {run.seconds:.1f} s, exit {run.exit_code}{' (stopped)' if run.stopped else ''}, "
            f"peak {run.peak_rss_mb:.0f} MiB{_child_peak(run.peak_rss_mb, run.tree_peak_rss_mb)}{_all_rows(results[name])}"
            + (f"\n{failure}" if failure else ""))
        return failure is None

    def after_startup(run, items, label):
        startup, _ = run.first(PROGRESS_LINE)
        per_item = None if startup is None else (run.seconds - startup) / items
        record(label, run, items, "image", per_item, startup)

    if "extract" in stages:
        run = StageRun(_pipeline("extract", out, "--data", str(data_dir), "--weights", "random")).run(environment)
        after_startup(run, images, "extract")
        if run.failure():
            return results

    if "train" in stages:
        _train(out, environment, period_steps, record, read_all_rows)
    if not (out / "decoder.keras").exists():
        return results

    if "evaluate" in stages:
        run = StageRun(_pipeline("evaluate", out)).run(environment)
        after_startup(run, sizes_info["test"], "evaluate")
    if "verify" in stages:
        run = StageRun(_pipeline("verify", out)).run(environment)
        record("verify", run, images, "image", run.seconds / images, None)

    def finetune_has_run_long_enough(run):
        # Any epoch's lines: a small dataset's first epoch may end sooner.
        lines = run.progress("finetune epoch ")
        return len(lines) >= 2 and lines[-1][0] - lines[0][0] >= finetune_seconds

    if "finetune" in stages:
        run = StageRun(_pipeline("finetune", out, read_all_rows=read_all_rows),
                       stop=finetune_has_run_long_enough).run(environment)
        lines = run.progress("finetune epoch 1/")
        per_item = ((lines[-1][0] - lines[0][0]) / (lines[-1][1] - lines[0][1])
                    if len(lines) >= 2 and lines[-1][1] > lines[0][1] else None)
        record("finetune", run, lines[-1][1] if lines else 0, "caption", per_item, lines[0][0] if lines else None)
    return results


def _train(out, environment, period_steps, record, read_all_rows=False):
    """Runs `train` on OUT until period TRAIN_PERIODS + 1 begins and records its figures."""
    from pipeline.core import config as config_module

    train_arguments = ["--validate-every-steps", str(period_steps)] if period_steps else []
    next_period = re.compile(rf"^Epoch {TRAIN_PERIODS + 1}/")
    run = StageRun(_pipeline("train", out, *train_arguments, read_all_rows=read_all_rows),
                   stop=lambda run: run.first(next_period)[0] is not None).run(environment)
    startup, _ = run.first(KERAS_EPOCH)
    history_path = out / "history.json"
    periods = json.loads(history_path.read_text()).get("periods", []) if history_path.exists() else []
    config = config_module.PipelineConfig.load(out)
    if periods:
        last = periods[-1]
        captions = (last["step"] - (periods[-2]["step"] if len(periods) > 1 else 0)) * config.train.batch_size
        record("train", run, captions, "caption", last["seconds"] / captions, startup, periods=len(periods),
               period_seconds=last["seconds"], train_seconds=last.get("train_seconds"),
               val_loss_seconds=last.get("val_loss_seconds"), val_cider_seconds=last.get("val_seconds"),
               vocabulary_size=config.decoder.vocab_size)
    else:
        record("train", run, 0, "caption", None, startup)


def growth(runs):
    """{stage: per-item cost at the largest size / at the smallest} for stages measured at both."""
    first, last = runs[0]["stages"], runs[-1]["stages"]
    return {stage: last[stage]["per_item_ms"] / first[stage]["per_item_ms"] for stage in first
            if stage in last and first[stage].get("per_item_ms") and last[stage].get("per_item_ms")}


def format_table(runs, ratios):
    lines = [f"{'stage':<13} {'images':>8} {'per item':>16} {'start-up':>9} {'peak RSS':>10}"]
    for run in runs:
        for stage, figures in run["stages"].items():
            per_item = figures.get("per_item_ms")
            shown = "-" if per_item is None else f"{per_item:.4g} ms/{figures['unit']}"
            startup = "-" if figures.get("startup_s") is None else f"{figures['startup_s']:.1f} s"
            lines.append(f"{stage:<13} {run['images']:>8,} {shown:>16} {startup:>9} {figures['peak_rss_mb']:>6.0f} MiB"
                         + _child_peak(figures["peak_rss_mb"], figures.get("tree_peak_rss_mb", 0)) + _all_rows(figures))
    lines.append("")
    for stage, ratio in ratios.items():
        verdict = "GROWS" if ratio > GROWTH_LIMIT else "flat"
        lines.append(f"{stage:<13} per-item cost x{ratio:.2f} from {runs[0]['images']:,} to {runs[-1]['images']:,} "
                     f"images: {verdict}")
    return "\n".join(lines)


def measure(sizes, quick=False, keep=None, log=print, stages=STAGES, read_all_rows=False):
    """Every stage (of `stages`) and the reward set-up at each size; the report (see the module docstring)."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as scratch:
        for size in sizes:
            root = Path(keep or scratch) / f"coco_{size}"
            started = time.monotonic()
            if (root / "data" / DATASET_INFO).exists():
                dataset = json.loads((root / "data" / DATASET_INFO).read_text())
                log(f"== {size:,} images: the dataset kept in {root / 'data'}")
            else:
                dataset = write_dataset(root / "data", size)
                (root / "data" / DATASET_INFO).write_text(json.dumps(dataset))
                log(f"== {size:,} images: dataset written in {time.monotonic() - started:.1f} s")
            log(f"   {dataset['captions']:,} captions, {dataset['word_types']:,} word types, splits {dataset['splits']}")
            stages_figures = {}
            if "reward_setup" in stages:
                # Best of 3: at a few hundred images one set-up takes milliseconds, the first one more.
                reward = measure_reward_setup(dataset["splits"]["train"] + dataset["splits"]["restval"], repeats=3)
                stages_figures["reward_setup"] = {
                    "items": reward["images"], "unit": "image", "per_item_ms": reward["per_item_ms"], "startup_s": None,
                    "peak_rss_mb": reward["peak_rss_growth_mb"], "vocabulary_size": reward["vocabulary_size"],
                    "scores_ms_per_step": reward["scores_ms_per_step"]}
                log(f"   reward_setup: {reward['seconds']:.2f} s")
            stages_figures.update(run_stages(root / "data", root / "out", dataset["splits"],
                                             period_steps=QUICK_PERIOD_STEPS if quick else None,
                                             finetune_seconds=QUICK_FINETUNE_SECONDS if quick else FINETUNE_SECONDS,
                                             log=log, stages=stages, read_all_rows=read_all_rows))
            runs.append({"images": size, "dataset": dataset, "stages": stages_figures})
            if not keep:
                import shutil

                shutil.rmtree(root, ignore_errors=True)
    ratios = growth(runs) if len(runs) > 1 else {}
    return {"runs": runs, "growth": ratios, "grows": sorted(stage for stage, ratio in ratios.items() if ratio > GROWTH_LIMIT),
            "settings": {"train_periods": TRAIN_PERIODS, "period_steps": QUICK_PERIOD_STEPS if quick else "default",
                         "finetune_seconds": QUICK_FINETUNE_SECONDS if quick else FINETUNE_SECONDS,
                         "image_size": IMAGE_SIZE, "growth_limit": GROWTH_LIMIT, "read_all_rows": read_all_rows},
            "revision": source_revision(), "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()}


def measure_reward_comparison(sizes, revision, repeats=2, log=print):
    """The reward set-up at each size, the working tree's and (if `revision`) that revision's, alternately."""
    rows = []
    for size in sizes:
        for current in (revision, None) if revision else (None,):
            row = measure_reward_setup(size, current, repeats)
            log(f"   {size:>8,} images  {row['revision']:<14} {1000 * row['per_item_ms']:8.1f} us/image "
                f"({row['seconds']:.2f} s), peak +{row['peak_rss_growth_mb']:.0f} MiB, holds {row['held_rss_mb']:.0f} MiB; "
                f"scoring {row['scores_ms_per_step']:.1f} ms/step")
            rows.append(row)
    report = {"reward_setup": rows, "revision": source_revision(), "cpu_count": os.cpu_count()}
    if revision:
        by = {(row["images"], row["revision"]): row for row in rows}
        report["speedup"] = {size: by[size, revision]["seconds"] / by[size, "working tree"]["seconds"] for size in sizes}
    report["growth"] = {}
    for name in ("working tree",) + ((revision,) if revision else ()):
        measured = [row for row in rows if row["revision"] == name]
        report["growth"][name] = measured[-1]["per_item_ms"] / measured[0]["per_item_ms"]
    return report


def run(quick):
    """The suite's entry (`python -m benchmarks`): the stages at QUICK_SIZES, or SUITE_SIZES;
    {scale_STAGE_growth: per-item cost ratio, scale_stages_growing: count, report: the report}."""
    report = measure(QUICK_SIZES if quick else SUITE_SIZES, quick=quick)
    figures = {f"scale_{stage}_growth": round(ratio, 3) for stage, ratio in report["growth"].items()}
    figures["scale_stages_growing"] = len(report["grows"])
    return {**figures, "report": report}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="images in all per size (with --reward-setup: training images)")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, short training and fine-tuning")
    parser.add_argument("--keep", help="write the datasets and run folders here and keep them")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES, help="the stages to run (default: all)")
    parser.add_argument("--read-all-rows", action="store_true",
                        help="train and finetune read every feature row they hold before their first step")
    parser.add_argument("--reward-setup", action="store_true", help="measure only the CIDEr-D reward set-up")
    parser.add_argument("--baseline-revision", help="with --reward-setup: also the CiderD of this git revision")
    parser.add_argument("--repeats", type=int, default=2, help="with --reward-setup: timed set-ups per child (best)")
    parser.add_argument("--reward-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reward_child:
        print(json.dumps(reward_setup_child(args.reward_child, args.baseline_revision, args.repeats)))
        return 0
    if args.reward_setup:
        report = measure_reward_comparison(args.sizes or REWARD_SIZES, args.baseline_revision, args.repeats)
    else:
        report = measure(args.sizes or (QUICK_SIZES if args.quick else SIZES), quick=args.quick, keep=args.keep,
                         stages=args.stages, read_all_rows=args.read_all_rows)
        print()
        print(format_table(report["runs"], report["growth"]))
    if args.json:
        from pipeline.core import io_utils

        io_utils.write_json(args.json, report, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
