"""`train` and `finetune --strategy multiworker` for real: two `run_pipeline.py` processes
on 127.0.0.1 forming a `MultiWorkerMirroredStrategy` cluster from their `TF_CONFIG`, each
with its own copy of the run folder (two machines without shared storage)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from benchmarks import bench_multiworker
from pipeline import train
from pipeline.core import config as config_module
from pipeline.data import run_folder
from pipeline.training import inputs as training_inputs
from tests.conftest import FINETUNE_SETTINGS
from tests.helpers import checkpoint_epoch, decoder_weights, largest_difference, wait_for

REPOSITORY = Path(__file__).resolve().parents[1]
# 180 training captions at batch 32: 6 steps an epoch, validated (val CIDEr-D) after each.
FLAGS = ["--epochs", "2", "--validate-every-steps", "6", "--batch-size", "32", "--units", "32",
         "--embedding-dim", "16", "--dropout", "0", "--precision", "fp32"]
OVERRIDES = {"train.epochs": 2, "train.validate_every_steps": 6, "train.batch_size": 32, "decoder.units": 32,
             "decoder.embedding_dim": 16, "decoder.dropout": 0.0, "train.precision": "fp32"}
# Every wait is bounded: a hung worker fails the test, never the suite.
WORKER_SECONDS = 240


def _start_workers(outs, log_dir, extra=(), command=("train", *FLAGS)):
    """One `COMMAND --strategy multiworker` process per OUT, worker i on the i-th free port.

    Returns [(process, path of its stderr log)]: a file, not a pipe nobody reads while
    the test polls, which could fill and stall a worker.
    """
    addresses = [f"127.0.0.1:{port}" for port in bench_multiworker.free_ports(len(outs))]
    workers = []
    for index, out in enumerate(outs):
        environment = {**os.environ, "TF_CONFIG": bench_multiworker.worker_tf_config(addresses, index),
                       "CUDA_VISIBLE_DEVICES": ""}
        log = Path(log_dir) / f"{command[0]}-worker{index}{'-resumed' if extra else ''}.log"
        with open(log, "w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "run_pipeline.py", command[0], "--out", str(out), "--strategy", "multiworker",
                 *command[1:], *extra],
                cwd=REPOSITORY, env=environment, stdout=subprocess.DEVNULL, stderr=stderr)
        workers.append((process, log))
    return workers


def _logs(workers):
    """The last lines of every worker's stderr log (str), for a failure message."""
    return "\n\n".join(log.read_text()[-3000:] for _, log in workers)


def _finish(workers):
    """[(returncode, stderr text)] of every worker, each given WORKER_SECONDS at most."""
    results = []
    for process, log in workers:
        try:
            process.wait(timeout=WORKER_SECONDS)
        except subprocess.TimeoutExpired:
            for each, _ in workers:
                each.kill()
                each.wait()
            pytest.fail(f"a worker did not end within {WORKER_SECONDS} s")
        results.append((process.returncode, log.read_text()))
    return results


def _history_epochs(out):
    """The validation periods (here one an epoch) in OUT/history.json, written atomically: whole or absent."""
    return [entry["period"] for entry in run_folder.read_training_history(out)]


def _listing(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_two_workers_killed_and_resumed_train_like_one_process(extracted_out, tmp_path):
    chief_out, worker_out = tmp_path / "machine0", tmp_path / "machine1"
    for out in (chief_out, worker_out):
        shutil.copytree(extracted_out, out)
    cache_listing = _listing(worker_out)
    scratch = worker_out / ".worker-worker-1.tmp"

    # Run 1: SIGKILL worker 1 inside epoch 2, once the chief has checkpointed epoch 1.
    workers = _start_workers([chief_out, worker_out], tmp_path)
    (chief, chief_log), (worker, _) = workers
    # history.json is written before the period's checkpoint (its stopping state first):
    # wait for both.
    wait_for(lambda: _history_epochs(chief_out) == [1] and checkpoint_epoch(chief_out) == 1, "epoch 1",
             [chief, worker], WORKER_SECONDS, output=lambda: chief_log.read_text()[-3000:])
    assert _history_epochs(chief_out) == [1] and checkpoint_epoch(chief_out) == 1, "epoch 1 was not recorded in time"
    assert scratch.is_dir()  # the non-chief's checkpoints and logs go there, not to its OUT
    worker.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    # The chief, blocked in a collective with the dead worker, must end by itself.
    (chief_code, chief_stderr), (worker_code, _) = _finish(workers)
    print(f"the chief ended {time.monotonic() - killed:.1f} s after the kill")
    assert worker_code == -signal.SIGKILL
    assert chief_code == 2, chief_stderr[-3000:]
    assert "lost a worker" in chief_stderr and "--resume" in chief_stderr, chief_stderr[-3000:]
    # Killed inside epoch 2: the chief's OUT still holds epoch 1, complete.
    assert checkpoint_epoch(chief_out) == 1 and _history_epochs(chief_out) == [1]

    # Run 2: both restarted with --resume; without shared storage the chief's checkpoint
    # is copied to the other machine first (docs/DISTRIBUTED.md, "When a worker dies").
    shutil.copytree(chief_out / run_folder.CHECKPOINT_DIR, worker_out / run_folder.CHECKPOINT_DIR)
    copied = {path: path.read_bytes() for path in (worker_out / run_folder.CHECKPOINT_DIR).iterdir()}
    results = _finish(_start_workers([chief_out, worker_out], tmp_path, ["--resume"]))
    for code, stderr in results:
        assert code == 0, "\n\n".join(stderr[-3000:] for _, stderr in results)
        assert "resuming after period 1 of 2" in stderr and "1 periods run, now step 12" in stderr
    assert _history_epochs(chief_out) == [1, 2] and checkpoint_epoch(chief_out) == 2
    # Worker 1 left its OUT as the cache plus the copied checkpoint, byte for byte, and removed its scratch folder.
    assert _listing(worker_out) == sorted(cache_listing + [run_folder.CHECKPOINT_DIR] + [
        f"{run_folder.CHECKPOINT_DIR}/{path.name}" for path in copied])
    assert all(path.read_bytes() == content for path, content in copied.items())
    # Nothing half-written in the chief's OUT: no temporary left, every artifact loads.
    assert not [path for path in chief_out.rglob("*") if ".tmp" in path.name]
    json.loads((chief_out / run_folder.HISTORY_FILE).read_text())
    for weights in (chief_out / run_folder.CHECKPOINT_DIR).glob("*.h5*"):
        h5py.File(weights, "r").close()

    # One process, same global batch and seed, two uninterrupted epochs: the same weights.
    reference_out = tmp_path / "one_process"
    shutil.copytree(extracted_out, reference_out)
    train.run_train(reference_out, dict(OVERRIDES))
    difference = largest_difference(decoder_weights(reference_out), decoder_weights(chief_out))
    print(f"largest weight difference from one process: {difference:.2e}")
    assert difference < 1e-5
    for name in ("loss", "val_loss", "val_cider"):
        values = [[entry[name] for entry in run_folder.read_training_history(out)]
                  for out in (reference_out, chief_out)]
        np.testing.assert_allclose(values[1], values[0], rtol=1e-5, atol=1e-7, err_msg=name)


def test_two_workers_stop_early_together(extracted_out, tmp_path):
    # A learning rate too small to change a greedy caption: validation CIDEr-D stays at its
    # first value, so with a patience of one period every worker must stop after period 2
    # of a cap of 4, on its own identical score, and none may wait for the others.
    outs = [tmp_path / "machine0", tmp_path / "machine1"]
    for out in outs:
        shutil.copytree(extracted_out, out)
    results = _finish(_start_workers(outs, tmp_path, ["--epochs", "4", "--patience-steps", "6",
                                                      "--learning-rate", "1e-12"]))
    for code, stderr in results:
        assert code == 0, "\n\n".join(stderr[-3000:] for _, stderr in results)
        assert "train: early stopping at step 12" in stderr and "stopped by early stopping" in stderr, stderr[-3000:]
    assert _history_epochs(outs[0]) == [1, 2]
    assert not (outs[1] / run_folder.HISTORY_FILE).exists() and not (outs[1] / ".worker-worker-1.tmp").exists()


def _fine_tuning_outs(trained_out, tmp_path, settings):
    """Two copies of the trained run (one per machine) set up for `finetune` with `settings`."""
    outs = [tmp_path / "machine0", tmp_path / "machine1"]
    for out in outs:
        shutil.copytree(trained_out, out)
        config_module.PipelineConfig.load(out).replace(settings).save(out)
    return outs


def _finetune_history(out):
    """(epochs, best_step) of OUT/finetune_history.json, written atomically: ([], None) while absent."""
    history = run_folder.read_finetune_history(out)
    return ([entry["epoch"] for entry in history["epochs"]], history["best_step"]) if history else ([], None)


def test_two_workers_fine_tune_killed_and_resumed_like_one_process(trained_out, finetuned, tmp_path):
    # A checkpoint after every step, so the kill lands mid-epoch just after one.
    chief_out, worker_out = _fine_tuning_outs(trained_out, tmp_path, {**FINETUNE_SETTINGS,
                                                                      "finetune.checkpoint_steps": 1})
    worker_listing = _listing(worker_out)
    reference_out, reference, _ = finetuned
    steps_per_epoch = reference["steps"] // 2
    kill_after = steps_per_epoch + 2  # two steps into epoch 2
    command = ("finetune",)

    # Run 1: SIGKILL worker 1 once the chief has checkpointed step `kill_after`.
    workers = _start_workers([chief_out, worker_out], tmp_path, command=command)
    state = chief_out / run_folder.FINETUNE_CHECKPOINT_DIR / f"state-{kill_after}.json"
    wait_for(state.exists, f"the chief's checkpoint of step {kill_after}", [process for process, _ in workers],
             WORKER_SECONDS, output=lambda: _logs(workers))
    assert (worker_out / ".worker-worker-1.tmp" / run_folder.FINETUNE_CHECKPOINT_DIR).is_dir()
    workers[1][0].send_signal(signal.SIGKILL)
    (chief_code, chief_stderr), (worker_code, _) = _finish(workers)
    assert worker_code == -signal.SIGKILL
    assert chief_code == 2, chief_stderr[-3000:]
    assert "finetune: the cluster of TF_CONFIG lost a worker" in chief_stderr, chief_stderr[-3000:]
    assert "restart every worker with `finetune --resume` to continue from step" in chief_stderr
    assert _finetune_history(chief_out)[0] == [1]  # killed inside epoch 2

    # Run 2: both with --resume, from the chief's checkpoints copied to the other machine.
    shutil.copytree(chief_out / run_folder.FINETUNE_CHECKPOINT_DIR, worker_out / run_folder.FINETUNE_CHECKPOINT_DIR)
    copied = {path: path.read_bytes() for path in (worker_out / run_folder.FINETUNE_CHECKPOINT_DIR).iterdir()}
    results = _finish(_start_workers([chief_out, worker_out], tmp_path, ["--resume"], command=command))
    for code, stderr in results:
        assert code == 0, "\n\n".join(stderr[-3000:] for _, stderr in results)
        assert "finetune: resuming at step" in stderr and "finetune: 2 epochs" in stderr, stderr[-3000:]
    assert "(the chief writes decoder.keras)" in results[1][1]
    # The chief's run equals the uninterrupted one-process run of the `finetuned` fixture.
    expected, history = run_folder.read_finetune_history(reference_out), run_folder.read_finetune_history(chief_out)
    for got, want in zip(history["epochs"], expected["epochs"], strict=True):
        for key in ("step", "mean_reward", "loss", "val_cider", "best"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert history["best_step"] == expected["best_step"]
    # decoder.keras: the best fine-tuned decoder of each, or the XE decoder of both if none was better.
    difference = largest_difference(decoder_weights(chief_out), decoder_weights(reference_out))
    print(f"largest weight difference from one process: {difference:.2e}")
    assert difference < 1e-5
    assert run_folder.decoder_objective(chief_out) == run_folder.decoder_objective(reference_out)
    # Worker 1 wrote nothing to its OUT: the run as it was plus the copied checkpoints, byte for byte.
    assert _listing(worker_out) == sorted(worker_listing + [run_folder.FINETUNE_CHECKPOINT_DIR] + [
        f"{run_folder.FINETUNE_CHECKPOINT_DIR}/{path.name}" for path in copied])
    assert all(path.read_bytes() == content for path, content in copied.items())
    assert not [path for path in chief_out.rglob("*") if ".tmp" in path.name]


def test_two_fine_tuning_workers_stop_early_together(trained_out, tmp_path):
    # A learning rate too small to change a greedy caption: validation CIDEr-D stays at the
    # starting decoder's, so with a patience of one epoch both workers must stop after
    # epoch 1 of 3 and keep the cross-entropy decoder.
    outs = _fine_tuning_outs(trained_out, tmp_path, {**FINETUNE_SETTINGS, "finetune.epochs": 3,
                                                     "finetune.early_stopping_patience": 1})
    results = _finish(_start_workers(outs, tmp_path, ["--learning-rate", "1e-12"], command=("finetune",)))
    for code, stderr in results:
        assert code == 0, "\n\n".join(stderr[-3000:] for _, stderr in results)
        assert "finetune: early stopping after epoch 1" in stderr and "finetune: 1 epochs" in stderr, stderr[-3000:]
    assert _finetune_history(outs[0]) == ([1], 0)
    kept_weights = decoder_weights(outs[0])
    for kept, trained in zip(kept_weights, decoder_weights(trained_out), strict=True):
        np.testing.assert_array_equal(kept, trained)
    assert not (outs[1] / run_folder.FINETUNE_HISTORY_FILE).exists()
    assert not (outs[1] / run_folder.XE_DECODER_FILE).exists()
    assert not (outs[1] / ".worker-worker-1.tmp").exists()


CHIEF_SCORES_SCRIPT = r"""
import json, math, os
from pipeline.training import distribution, validation
strategy = distribution.make_strategy("multiworker")
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
# Each worker's own scores differ; worker 1 has a NaN where the chief has a number.
scores = {"val_cider": 1.25 + task, "val_bleu_4": math.nan if task else 0.5, "val_seconds": 3.0 * (task + 1)}
print(json.dumps(validation.chief_scores(strategy, scores)))
"""


def test_every_worker_takes_the_chief_validation_scores(tmp_path):
    addresses = [f"127.0.0.1:{port}" for port in bench_multiworker.free_ports(2)]
    processes = [
        subprocess.Popen([sys.executable, "-c", CHIEF_SCORES_SCRIPT], cwd=REPOSITORY, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "TF_CONFIG": bench_multiworker.worker_tf_config(addresses, index),
                              "CUDA_VISIBLE_DEVICES": ""})
        for index in range(2)
    ]
    for process in processes:
        stdout, stderr = process.communicate(timeout=WORKER_SECONDS)
        assert process.returncode == 0, stderr[-3000:]
        assert json.loads(stdout.strip().splitlines()[-1]) == {"val_cider": 1.25, "val_bleu_4": 0.5,
                                                               "val_seconds": 3.0}


def test_each_replica_takes_its_padded_slice_of_every_global_batch():
    import tensorflow as tf

    split = training_inputs.CaptionSplit(np.arange(13, dtype=np.int32), [np.asarray([1, 4 + index % 5, 2], np.int32)
                                                               for index in range(13)], images=13)
    rows = training_inputs.InMemoryFeatures(np.arange(13, dtype=np.float32)[:, None])

    def batches(**options):
        return [(inputs["image_features"][:, 0].astype(int).tolist(), targets.tolist())
                for inputs, targets in training_inputs.make_caption_dataset(
                    split, rows, 5, shuffle_seed=3, epoch=1, sort_window_batches=2, **options).as_numpy_iterator()]

    whole = batches()
    # Two workers of two replicas each: worker w's elements are replicas 2w and 2w + 1 of each batch.
    workers = [batches(input_context=tf.distribute.InputContext(2, index, 4)) for index in (0, 1)]
    assert [len(elements) for elements in workers] == [2 * len(whole)] * 2
    for number, (batch_rows, batch_targets) in enumerate(whole):
        slices = workers[0][2 * number:2 * number + 2] + workers[1][2 * number:2 * number + 2]
        size = -(-len(batch_rows) // 4)
        assert all(len(slice_rows) == size for slice_rows, _ in slices)  # one shape on every replica
        real = [(row, target) for slice_rows, slice_targets in slices
                for row, target in zip(slice_rows, slice_targets) if any(target)]
        # In order, each caption once; the filling rows hold no target at all.
        assert real == list(zip(batch_rows, batch_targets))
