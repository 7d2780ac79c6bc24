"""pipeline.core.console: TensorFlow's C++ log lines filtered from stderr, our own text untouched.

The filter runs on real pipes here; tests/test_caption.py checks a real `run_pipeline.py`
subprocess's stderr at the default level and at TF_CPP_MIN_LOG_LEVEL=0.
"""

import os
import threading

import pytest

from pipeline.core import console

ONEDNN = b"I0000 00:00:1796158589.190822    7065 port.cc:153] oneDNN custom operations are on.\n"
WARNING = b"W1201 20:51:39.123456   42 loop.cc:9] Local rendezvous is aborting\n"
CUINIT = b"E0000 00:00:1796158592.700844    7351 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n"
EIGEN = (b"E0000 00:00:1796164136.522441     498 util.cc:131] oneDNN supports DT_UINT8 only on platforms with "
         b"AVX-512. Falling back to the default Eigen-based implementation if present.\n")
REAL_ERROR = b"E1201 20:51:40.000001   42 kernel.cc:77] Out of memory while allocating 8 GiB\n"
FATAL = b"F1201 20:51:41.000001   42 check.cc:3] Check failed: x != null\n"
NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"


@pytest.mark.parametrize("level, user_set, kept", [
    (2, False, [REAL_ERROR, FATAL]),  # the default: no INFO, no WARNING, no "error" that reports none
    (2, True, [CUINIT, EIGEN, REAL_ERROR, FATAL]),  # the user's own 2: errors as TensorFlow defines them
    (1, True, [WARNING, CUINIT, EIGEN, REAL_ERROR, FATAL]),
    (3, True, [FATAL]),
    (0, True, [NOTICE, ONEDNN, WARNING, CUINIT, EIGEN, REAL_ERROR, FATAL]),
])
def test_keep_line_follows_the_level(level, user_set, kept):
    lines = [NOTICE, ONEDNN, WARNING, CUINIT, EIGEN, REAL_ERROR, FATAL]
    assert [line for line in lines if console.keep_line(line, level, user_set)] == kept


def test_our_lines_pass_whatever_the_level():
    for line in (b"error: photo.jpg: no such file\n", b"Traceback (most recent call last):\n",
                 b"I love captions\n", b"E0000 is not a log line without the rest\n", b"\n"):
        assert console.keep_line(line, 3, True)


def _filtered(chunks, level=2, user_set=False, gpu_machine=False):
    """Writes `chunks` (bytes) one by one into a real pipe through filter_stream; returns what comes out."""
    source_read, source_write = os.pipe()
    target_read, target_write = os.pipe()
    worker = threading.Thread(target=console.filter_stream,
                              args=(source_read, target_write, level, user_set, gpu_machine))
    worker.start()
    for chunk in chunks:
        os.write(source_write, chunk)
    os.close(source_write)
    worker.join(timeout=10)
    os.close(target_write)
    output = b""
    while chunk := os.read(target_read, 65536):
        output += chunk
    os.close(source_read)
    os.close(target_read)
    return output


def test_filter_stream_drops_log_lines_split_across_writes_and_keeps_the_rest():
    progress = b"extract 8/16 images (50%) 12.1 images/s ETA 1s\rextract 16/16 images (100%)"
    chunks = [NOTICE[:20], NOTICE[20:] + ONEDNN[:30], ONEDNN[30:], b"train: 240 captions\n",
              CUINIT, progress, b"\n", REAL_ERROR[:10], REAL_ERROR[10:], b"no newline at the end"]
    assert _filtered(chunks) == b"train: 240 captions\n" + progress + b"\n" + REAL_ERROR + b"no newline at the end"


def test_a_partial_line_that_cannot_be_a_log_line_is_forwarded_before_its_newline():
    source_read, source_write = os.pipe()
    target_read, target_write = os.pipe()
    worker = threading.Thread(target=console.filter_stream, args=(source_read, target_write, 2, False), daemon=True)
    worker.start()
    os.write(source_write, b"extract 3/16 images")
    assert os.read(target_read, 100) == b"extract 3/16 images"  # a progress bar does not wait for "\n"
    os.close(source_write)
    worker.join(timeout=10)
    for descriptor in (source_read, target_read, target_write):
        os.close(descriptor)


def test_log_level_reads_the_users_setting():
    assert console.log_level({}) == console.DEFAULT_LEVEL == 2
    assert console.log_level({"TF_CPP_MIN_LOG_LEVEL": "0"}) == 0
    assert console.log_level({"TF_CPP_MIN_LOG_LEVEL": " 3 "}) == 3
    assert console.log_level({"TF_CPP_MIN_LOG_LEVEL": "verbose"}) == 2


DLOPEN = (b"W0000 00:00:1796158592.712000    7351 gpu_device.cc:2344] Cannot dlopen some GPU libraries. Please make "
          b"sure the missing libraries mentioned above are installed properly if you would like to use GPU.\n")
SKIPPING = b"Skipping registering GPU devices...\n"  # the same message's second line, without a log prefix


def _fake_nvidia_machine(root, models):
    """A /proc tree under `root` with one driver directory per GPU model (None: no information file)."""
    for index, model in enumerate(models):
        gpu_dir = root / "proc/driver/nvidia/gpus" / f"0000:0{index + 1}:00.0"
        gpu_dir.mkdir(parents=True)
        if model is not None:
            (gpu_dir / "information").write_text(f"Model: \t\t {model}\nIRQ:   \t\t 42\nBus Type: \t PCIe\n")


def test_machine_nvidia_gpus_reads_the_driver_tree_then_the_path(tmp_path):
    assert console.machine_nvidia_gpus(tmp_path, search_path="") == []  # no driver, no nvidia-smi: no GPU
    _fake_nvidia_machine(tmp_path / "two", ["NVIDIA A100-SXM4-40GB", None])
    assert console.machine_nvidia_gpus(tmp_path / "two", search_path="") == ["NVIDIA A100-SXM4-40GB", "NVIDIA GPU"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 1\n")  # never run, only found
    (bin_dir / "nvidia-smi").chmod(0o755)
    assert console.machine_nvidia_gpus(tmp_path, search_path=str(bin_dir)) == ["NVIDIA GPU"]


@pytest.mark.parametrize("level, user_set, gpu_machine, kept", [
    (2, False, False, [SKIPPING, REAL_ERROR]),  # no GPU: today's quiet console (the prefix-less line is never ours to drop)
    (2, False, True, [DLOPEN, SKIPPING, CUINIT, REAL_ERROR]),  # a GPU TensorFlow cannot use: say why
    (1, True, True, [WARNING, DLOPEN, SKIPPING, CUINIT, REAL_ERROR]),
    (3, True, True, [SKIPPING]),  # the user asked for fatal errors only
])
def test_gpu_setup_lines_show_only_on_a_machine_with_an_nvidia_gpu(level, user_set, gpu_machine, kept):
    lines = [ONEDNN, WARNING, DLOPEN, SKIPPING, CUINIT, REAL_ERROR]
    assert [line for line in lines if console.keep_line(line, level, user_set, gpu_machine)] == kept
    assert _filtered(lines, level, user_set, gpu_machine) == b"".join(kept)
