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


def _filtered(chunks, level=2, user_set=False):
    """Writes `chunks` (bytes) one by one into a real pipe through filter_stream; returns what comes out."""
    source_read, source_write = os.pipe()
    target_read, target_write = os.pipe()
    worker = threading.Thread(target=console.filter_stream, args=(source_read, target_write, level, user_set))
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
