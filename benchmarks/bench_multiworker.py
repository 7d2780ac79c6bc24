"""Two-worker `train` and `finetune --strategy multiworker` on loopback beside one process.

    python -m benchmarks.bench_multiworker [--quick] [--json FILE]

One synthetic run folder (`bench_memory.write_run_folder`: 3,000 vectors, 2,000 train
images x 2 captions = 4,000 train captions, 2,000 val captions, a 500-word vocabulary) is
trained for 3 epochs (batch 128, embedding 64, units 128, dropout 0, seed 0), alternately:

* one process, the default strategy;
* two `run_pipeline.py train --strategy multiworker` processes on 127.0.0.1, each with its
  own copy of the folder (two machines without shared storage), `TF_CONFIG` per worker.

Figures: the median seconds of epochs 2..3 (from history.json: no tracing), the wall time
of the whole command (process start to exit; for two workers, the later one), their
ratios two-worker / one-process, and the largest absolute difference between the final
weights of the two runs. Fine-tuning needs captions whose samples earn CIDEr-D (on the
random captions above every reward is 0 and nothing moves), so `finetune_*` figures come
from a small demo run instead (240 generated scenes, random encoder, the demo's training
settings, made once in this process), fine-tuned for 2 epochs both ways (each worker on
its own copy): epoch 2's seconds from finetune_history.json, the wall times, and the
largest difference between the weights of the last checkpoints (after the last step,
whichever epoch validation picked), beside how far fine-tuning moved them
(`finetune_weight_change`). On one 2-core machine the two workers share the CPU that one
process had to itself and talk through gRPC at every step, so the two-worker run is
slower here: what this shows is what the collectives cost and that the runs agree, not
a speedup, which needs workers on separate machines. `--quick`: one round instead of two.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import bench_memory, workloads
from pipeline.core import io_utils

NUM_VECTORS = 3000
CAPTIONED_IMAGES = 3000  # bench_memory.VAL_IMAGES (1,000) of them are val
CAPTIONS_PER_IMAGE = 2
# 4,000 captions at batch 128: 32 steps an epoch, validated after each (one period an epoch).
FLAGS = ["--epochs", "3", "--validate-every-steps", "32", "--batch-size", "128", "--embedding-dim", "64",
         "--units", "128", "--dropout", "0", "--seed", "0"]
FINETUNE_SCENES = 240
FINETUNE_FLAGS = ["--epochs", "2", "--batch-size", "16"]
WORKER_SECONDS = 1800


def free_ports(count):
    """`count` TCP ports (ints) free on 127.0.0.1 a moment ago, for a loopback cluster."""
    sockets = [socket.socket() for _ in range(count)]
    for each in sockets:
        each.bind(("127.0.0.1", 0))
    ports = [each.getsockname()[1] for each in sockets]
    for each in sockets:
        each.close()
    return ports


def worker_tf_config(addresses, index):
    """The TF_CONFIG (str) of worker `index` of a cluster of workers at `addresses` ("host:port")."""
    return json.dumps({"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}})


def _run_stage(outs, stage="train", flags=FLAGS):
    """Runs `stage` on each OUT (one process, or one worker per OUT); returns the wall seconds."""
    repo = Path(__file__).resolve().parents[1]
    addresses = [f"127.0.0.1:{port}" for port in free_ports(len(outs))]
    started = time.monotonic()
    processes = []
    for index, out in enumerate(outs):
        environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        command = [sys.executable, "run_pipeline.py", stage, "--out", str(out), *flags]
        if len(outs) > 1:
            environment["TF_CONFIG"] = worker_tf_config(addresses, index)
            command += ["--strategy", "multiworker"]
        processes.append(subprocess.Popen(command, cwd=repo, env=environment, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=WORKER_SECONDS)
        if process.returncode != 0:
            raise RuntimeError(f"{stage} failed (exit code {process.returncode}):\n{stderr[-3000:]}")
    return time.monotonic() - started


def _steady_epoch_seconds(out):
    from pipeline.data import run_folder

    return statistics.median(entry["seconds"] for entry in run_folder.read_training_history(out)[1:])


def _finetune_epoch_seconds(out):
    from pipeline.data import run_folder

    return run_folder.read_finetune_history(out)["epochs"][-1]["seconds"]


def _finetuned_weights(out):
    """The decoder's weights in OUT's last fine-tuning checkpoint (list of arrays)."""
    import tensorflow as tf

    from pipeline.data import run_folder

    model = run_folder.load_decoder(out, run_folder.XE_DECODER_FILE)
    latest = tf.train.latest_checkpoint(str(Path(out) / run_folder.FINETUNE_CHECKPOINT_DIR))
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return model.get_weights()


def run(quick):
    """Returns a dict: `multiworker_epoch_seconds`, `one_process_epoch_seconds`,
    `multiworker_epoch_ratio`, `multiworker_wall_seconds`, `one_process_wall_seconds`,
    `multiworker_wall_ratio`, `multiworker_weight_difference`, the same with a `finetune_`
    prefix, and every round under `rounds`."""
    work = Path(tempfile.mkdtemp(prefix="bench_multiworker_"))
    rounds = []
    try:
        captions = workloads.synthetic_captions(CAPTIONED_IMAGES, CAPTIONS_PER_IMAGE, bench_memory.VOCAB_WORDS)
        cache = bench_memory.write_run_folder(work / "cache", NUM_VECTORS, captions)
        scenes = workloads.trained_demo_run(work / "scenes", FINETUNE_SCENES)
        for number in range(1 if quick else 2):
            measured = {}
            for kind, count in (("one_process", 1), ("multiworker", 2)):
                outs = [work / f"{kind}{index}" for index in range(count)]
                for out in outs:
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.copytree(cache, out)
                measured[f"{kind}_wall_seconds"] = round(_run_stage(outs), 2)
                measured[f"{kind}_epoch_seconds"] = round(_steady_epoch_seconds(outs[0]), 3)
            measured["multiworker_weight_difference"] = workloads.largest_difference(
                workloads.decoder_weights(work / "one_process0"), workloads.decoder_weights(work / "multiworker0"))
            for kind, count in (("one_process", 1), ("multiworker", 2)):
                outs = [work / f"finetune_{kind}{index}" for index in range(count)]
                for out in outs:  # every run starts from the same trained decoder
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.copytree(scenes, out)
                measured[f"finetune_{kind}_wall_seconds"] = round(_run_stage(outs, "finetune", FINETUNE_FLAGS), 2)
                measured[f"finetune_{kind}_epoch_seconds"] = round(_finetune_epoch_seconds(outs[0]), 3)
            # The weights after the last step (the last checkpoint): on random data validation
            # CIDEr-D may never beat the start, and decoder.keras would stay the XE decoder.
            one, two = (_finetuned_weights(work / name) for name in ("finetune_one_process0", "finetune_multiworker0"))
            measured["finetune_multiworker_weight_difference"] = workloads.largest_difference(one, two)
            # How far fine-tuning moved the weights: the difference above is only worth as much.
            measured["finetune_weight_change"] = workloads.largest_difference(one, workloads.decoder_weights(scenes))
            print(f"round {number + 1}: {measured}", file=sys.stderr)
            rounds.append(measured)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {key: statistics.median(entry[key] for entry in rounds) for key in rounds[0]}
    for prefix in ("", "finetune_"):
        results[f"{prefix}multiworker_weight_difference"] = max(
            entry[f"{prefix}multiworker_weight_difference"] for entry in rounds)
        for kind in ("epoch", "wall"):
            results[f"{prefix}multiworker_{kind}_ratio"] = round(
                results[f"{prefix}multiworker_{kind}_seconds"] / results[f"{prefix}one_process_{kind}_seconds"], 3)
    results["train_captions"] = (CAPTIONED_IMAGES - bench_memory.VAL_IMAGES) * CAPTIONS_PER_IMAGE
    results["rounds"] = rounds
    results["load_average"] = os.getloadavg()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of two")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = run(args.quick)
    for key, value in results.items():
        if key != "rounds":
            print(f"{key:<34} {value}")
    if args.json:
        io_utils.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
