"""Faults: real SIGKILLs of real `run_pipeline.py` processes, a full disk (RLIMIT_FSIZE)
and an output folder the user cannot write (an unprivileged effective uid).

Every fault must leave artifacts that are either complete or recognisably incomplete,
and the command line must answer with one `error:` line and exit code 2. Runs that may
leave HDF5 with a failed write are subprocesses, so a crash at exit shows as their code.
"""

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import run_pipeline
from pipeline import train
from pipeline.data import feature_writer, features, run_folder
from pipeline.training import periods

REPOSITORY = Path(__file__).resolve().parents[1]
from tests.conftest import SMALL_EXTRACT_FLAGS as EXTRACT_FLAGS  # noqa: E402
from tests.conftest import SMALL_NUM_IMAGES as NUM_IMAGES  # noqa: E402
from tests.helpers import checkpoint_epoch, wait_for  # noqa: E402
SMALL_DECODER = {"decoder.units": 32, "decoder.embedding_dim": 16, "decoder.dropout": 0.0, "train.precision": "fp32"}
CHILD_SECONDS = 600  # the longest wait for a child: a hung one fails the test, never the suite


def _start(arguments):
    return subprocess.Popen([sys.executable, "run_pipeline.py", *arguments], cwd=REPOSITORY,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(process, condition, what):
    wait_for(condition, what, [process], CHILD_SECONDS, output=lambda: process.stderr.read()[-2000:])


def _kill(process, delay):
    time.sleep(delay)
    still_running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert still_running and process.returncode == -signal.SIGKILL, "finished before the kill: lower the delays"


def _check_prefix(cache, reference):
    """A cache is the reference's first rows (extraction appends in sorted id order)."""
    count = len(cache.image_ids)
    assert cache.image_ids == reference.image_ids[:count]
    np.testing.assert_allclose(cache.features, reference.features[:count], rtol=0, atol=1e-5)


def test_extract_killed_at_random_moments_resumes_to_the_uninterrupted_cache(small_data, reference_cache, tmp_path,
                                                                           capsys):
    out = tmp_path / "out"
    cache_path = out / features.FEATURES_FILE
    generator = random.Random(1234)
    rows_after_kills = []
    for _ in range(5):
        before = cache_path.stat().st_mtime_ns if cache_path.exists() else None
        process = _start(["extract", "--data", str(small_data), "--out", str(out), *EXTRACT_FLAGS])
        # The cache is touched once the encoder is built and writing starts (created, or
        # reopened and cut back to num_rows): kill at a random moment from there.
        _wait_for(process, lambda: cache_path.exists() and cache_path.stat().st_mtime_ns != before,
                  "it started writing features.h5")
        _kill(process, generator.uniform(0.0, 0.3))
        partial = features.read_features(out)  # readable after every kill, whatever the moment
        _check_prefix(partial, reference_cache)
        rows_after_kills.append(len(partial.image_ids))
    assert rows_after_kills == sorted(rows_after_kills) and rows_after_kills[-1] < NUM_IMAGES, rows_after_kills
    # The completing run in-process: a subprocess would only add a TensorFlow import.
    capsys.readouterr()
    assert run_pipeline.main(["extract", "--data", str(small_data), "--out", str(out), *EXTRACT_FLAGS]) == 0
    assert f"{NUM_IMAGES - rows_after_kills[-1]} new, {rows_after_kills[-1]} cached" in capsys.readouterr().err
    final = features.read_features(out)
    assert final.image_ids == reference_cache.image_ids
    np.testing.assert_allclose(final.features, reference_cache.features, rtol=0, atol=1e-5)


def _history(out):
    return run_folder.read_training_history(out)


def test_train_killed_mid_epoch_resumes_with_the_stopping_state_to_the_uninterrupted_result(extracted_out, copy_run):
    epochs = 3
    # batch size 1 makes an epoch last long enough (~180 steps) to be killed inside it;
    # validation every 90 steps puts every other checkpoint mid-epoch, and a patience of
    # 180 steps lets early stopping end the run (or not) from the resumed counter.
    settings = {**SMALL_DECODER, "train.epochs": epochs, "train.batch_size": 1, "train.validate_every_steps": 90,
                "train.patience_steps": 180}
    flags = ["--epochs", str(epochs), "--batch-size", "1", "--units", "32", "--embedding-dim", "16", "--dropout", "0",
             "--validate-every-steps", "90", "--patience-steps", "180", "--precision", "fp32"]
    killed = copy_run(extracted_out)
    unkilled = Path(shutil.copytree(killed, killed.parent / "unkilled"))

    process = _start(["train", "--out", str(killed), *flags])
    _wait_for(process, lambda: (checkpoint_epoch(killed) or 0) >= 1, "the first checkpoint")
    _kill(process, random.Random(99).uniform(0.0, 0.3))
    finished = periods.checkpoint_epoch(killed / run_folder.CHECKPOINT_DIR)
    assert finished >= 1

    resumed = train.run_train(killed, {}, resume=True)
    reference = train.run_train(unkilled, settings)
    assert resumed["initial_period"] == finished
    for name in ("steps", "periods_total", "stopped_by", "best_step", "best_score"):
        assert resumed[name] == reference[name], name
    assert [entry["period"] for entry in _history(killed)] == list(range(1, reference["periods_total"] + 1))
    # train.py keys each epoch's order to (seed, epoch) and enters it at the checkpoint's
    # step, BackupAndRestore brings back the weights and optimizer state, and stopping.json
    # the stopper's best and counter, so the resumed periods are the unkilled run's: the
    # same losses, up to float reordering (they come out bit-equal on one machine), the same
    # validation scores and decisions. A resume that replayed the first epoch's order, or
    # lost the optimizer state, differs by percents.
    for name in ("loss", "val_loss", "val_cider", "learning_rate"):
        resumed_values = [entry[name] for entry in _history(killed)]
        expected_values = [entry[name] for entry in _history(unkilled)]
        assert resumed_values == pytest.approx(expected_values, rel=1e-5), (name, resumed_values, expected_values)
    assert [entry["best"] for entry in _history(killed)] == [entry["best"] for entry in _history(unkilled)]
    last = str(reference["periods_total"])
    state, expected_state = _stopping_state(killed)[last], _stopping_state(unkilled)[last]
    assert state["stopper"].pop("best") == pytest.approx(expected_state["stopper"].pop("best"), rel=1e-5)
    assert state == expected_state  # best step, steps since, rate cuts, stopped


def _stopping_state(out):
    return json.loads((out / run_folder.CHECKPOINT_DIR / run_folder.STOPPING_FILE).read_text())["periods"]


def _run_with_file_size_limit(arguments, limit_bytes):
    """Runs the CLI with writes past `limit_bytes` in any one file failing with EFBIG, as on a
    full disk. A subprocess: its exit code shows whether HDF5 crashed when the process ended."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "run_pipeline.py", *arguments], cwd=REPOSITORY, preexec_fn=limit,
                          capture_output=True, text=True, check=False)


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_full_disk_during_extract_is_one_line_and_a_rerun_completes(small_data, reference_cache, tmp_path):
    out = tmp_path / "out"
    arguments = ["extract", "--data", str(small_data), "--out", str(out), *EXTRACT_FLAGS]
    # 512 KiB: the JSON files and the empty cache fit, the cache's first 512 KiB chunk does not.
    completed = _run_with_file_size_limit(arguments, 512 * 1024)
    assert completed.returncode == 2, completed.stderr[-3000:]
    line = _one_error_line(completed.stderr)
    assert line.startswith(f"error: {out / 'features.h5'}: file size limit reached: need 0.8 MB more but the limit "
                           "(ulimit -f, 0.5 MB) leaves 0.5 MB; the 0 rows written so far are kept"), line
    # Stopped before HDF5 wrote a byte of the batch: the file opens, and counts no row.
    partial = features.read_features(out)
    assert partial.image_ids == [] and partial.attrs["weights"] == "random"
    assert run_pipeline.main(arguments) == 0
    final = features.read_features(out)
    assert final.image_ids == reference_cache.image_ids
    np.testing.assert_allclose(final.features, reference_cache.features, rtol=0, atol=1e-5)


def _run_python_with_file_size_limit(code, limit_bytes, *arguments):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "-c", code, *map(str, arguments)], cwd=REPOSITORY, preexec_fn=limit,
                          capture_output=True, text=True, check=False)


_APPEND_UNTIL_FULL = """
import sys
import numpy as np
from pipeline.core import errors
from pipeline.data import feature_writer, features

attrs = {"format": features.FEATURES_FORMAT, "version": features.FEATURES_VERSION, "feature_dim": 2048,
         "dtype": "float32"}
with feature_writer.FeatureWriter.create(sys.argv[1], attrs) as writer:
    try:
        for start in range(0, 1000, 10):
            rows = np.arange(start, start + 10, dtype=np.float32)
            writer.append([f"image_{row:04d}.jpg" for row in range(start, start + 10)],
                          np.repeat(rows[:, None], 2048, axis=1))
    except errors.ArtifactError as error:
        print(writer.num_rows)
        print(error)
"""


def _rows(start, stop):
    rows = np.arange(start, stop, dtype=np.float32)
    return [f"image_{row:04d}.jpg" for row in range(start, stop)], np.repeat(rows[:, None], 2048, axis=1)


def test_feature_writer_stops_before_the_file_size_limit_and_keeps_every_counted_row(tmp_path):
    path = tmp_path / "features.h5"
    # 2 MiB: three 512 KiB chunks (192 rows) and the margin fit, a fourth chunk does not.
    completed = _run_python_with_file_size_limit(_APPEND_UNTIL_FULL, 2 * 1024 * 1024, path)
    assert completed.returncode == 0, completed.stderr[-3000:]  # no crash when HDF5 shuts down
    num_rows, message = completed.stdout.splitlines()
    assert int(num_rows) == 190, completed.stdout  # batches of 10: the 20th would open the fourth chunk
    assert message.startswith(f"{path}: file size limit reached: need ") and message.endswith(
        "; the 190 rows written so far are kept and a rerun of `extract` continues from them"), message
    assert path.stat().st_size <= 2 * 1024 * 1024
    partial = features.read_features(None, path=path)
    expected_ids, expected_features = _rows(0, 190)
    assert partial.image_ids == expected_ids
    np.testing.assert_array_equal(partial.features, expected_features)
    # With room again, the same file takes the rest.
    with feature_writer.FeatureWriter.append_to(path) as writer:
        assert writer.num_rows == 190
        writer.append(*_rows(190, 300))
    final = features.read_features(None, path=path)
    expected_ids, expected_features = _rows(0, 300)
    assert final.image_ids == expected_ids
    np.testing.assert_array_equal(final.features, expected_features)


_FAIL_INSIDE_HDF5 = """
import resource, sys
import h5py
import numpy as np
from pipeline.data import feature_writer

guarded = feature_writer._GuardedFile(sys.argv[1], "w+b")
handle = h5py.File(guarded, "w")
handle.create_dataset("features", shape=(64, 2048), dtype="float32", chunks=(64, 2048))
handle.flush()
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
try:
    handle["features"][:] = 1.0
    handle.flush()
except (OSError, RuntimeError):
    print(guarded.failure.strerror)
guarded.close_after_failure(handle)
print("closed" if not handle.id.valid and guarded.closed else "still open")
"""


def test_a_write_hdf5_sees_fail_leaves_a_file_that_closes_without_crashing(tmp_path):
    # The disk can fill between the room check and the write: HDF5 then cannot close the
    # file, and used to crash at process exit (a segfault after the error line).
    completed = _run_python_with_file_size_limit(_FAIL_INSIDE_HDF5, 1 << 30, tmp_path / "features.h5")
    assert completed.returncode == 0, (completed.returncode, completed.stderr[-3000:])
    assert completed.stdout.splitlines() == ["File too large", "closed"], completed.stdout


@contextlib.contextmanager
def _file_size_limit(limit_bytes):
    """RLIMIT_FSIZE for this process, for the block only (the hard limit stays, so it can be lifted)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_full_disk_during_export_keeps_the_previous_saved_model(trained_out, copy_run, capsys):
    from pipeline import export  # noqa: F401  (TensorFlow and the stage imported before the file size limit)

    out = copy_run(trained_out)
    previous = out / run_folder.SAVED_MODEL_DIR
    (previous / "variables").mkdir(parents=True)
    (previous / "saved_model.pb").write_bytes(b"the previous export")
    # 1 MiB: the SavedModel's variables (ResNet50's 90 MB) do not fit. In-process (no second
    # TensorFlow import): TensorFlow, unlike HDF5, is left sound by a failed write.
    capsys.readouterr()
    with _file_size_limit(1024 * 1024):
        code = run_pipeline.main(["export", "--out", str(out)])
    assert code == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: {previous}: cannot write the SavedModel (File too large)"
    assert sorted(path.name for path in previous.iterdir()) == ["saved_model.pb", "variables"]
    assert (previous / "saved_model.pb").read_bytes() == b"the previous export"
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]
    assert not (out / "serving").exists()


def test_full_disk_during_train_keeps_the_previous_decoder_whole(trained_out, copy_run):
    out = copy_run(trained_out)
    decoder_bytes = (out / run_folder.DECODER_FILE).read_bytes()
    # 256 KiB: the JSON files fit, the checkpoint weights and the decoder do not.
    completed = _run_with_file_size_limit(["train", "--out", str(out), "--epochs", "1"], 256 * 1024)
    assert completed.returncode == 2, completed.stderr[-3000:]
    line = _one_error_line(completed.stderr)
    assert line == f"error: {out}: cannot write the training checkpoints (File too large); " \
                   "`train --resume` continues from the last complete checkpoint", line
    # decoder.keras is written to a temporary name and renamed: never half a file.
    assert (out / run_folder.DECODER_FILE).read_bytes() == decoder_bytes
    assert not list(out.glob(".decoder.keras*"))


def _as_nobody():
    """Effective uid/gid `nobody` (root can write anywhere); restored on exit."""
    @contextlib.contextmanager
    def context():
        os.setegid(65534)
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)
    return context()


def test_unwritable_out_is_one_line_and_changes_nothing(extracted_out, capsys):
    # In-process: the seteuid is undone afterwards, and the first write that fails is a JSON one.
    assert os.geteuid() == 0, "runs as root, which the permission check would not stop"
    # Under /tmp (world-traversable), not pytest's private tmp_path: nobody must be able to read OUT.
    out = Path(tempfile.mkdtemp(prefix="captioner-readonly-", dir="/tmp")) / "out"
    try:
        shutil.copytree(extracted_out, out)
        for path in [out.parent, out, *out.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
        with _as_nobody():
            code = run_pipeline.main(["train", "--out", str(out), "--epochs", "1", "--units", "32"])
        assert code == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {out}") and "Permission denied" in line, line
        assert sorted(path.name for path in out.iterdir()) == sorted(before)
        assert all((out / name).read_bytes() == content for name, content in before.items())
    finally:
        shutil.rmtree(out.parent)
