"""A clean console: TensorFlow's C++ start-up lines are filtered out of stderr.

TensorFlow 2.21 logs through Abseil, and everything it logs before `absl::InitializeLog()`
(which the Python package never calls) goes to stderr whatever `TF_CPP_MIN_LOG_LEVEL`
says: "oneDNN custom operations are on", "Could not find cuda drivers", and, on every
machine without a GPU, an `E0000 ... failed call to cuInit` line that reads like a
failure. The only place left to honour the level is the stderr file descriptor itself, so
`quiet_tensorflow_logs()` puts a filter thread behind fd 2:

- lines in Abseil's C++ log format (`I1201 20:51:39.123456  4494 port.cc:153] ...`) are
  dropped when their severity is below the level (INFO 0, WARNING 1, ERROR 2, FATAL 3),
  as `TF_CPP_MIN_LOG_LEVEL` promises; so is Abseil's "All log messages before
  absl::InitializeLog()" notice when anything is filtered;
- at the default level (2, the user set nothing) the "errors" that report none are dropped
  too (`BENIGN_ERRORS`: this machine has no GPU, so TensorFlow runs on the CPU; oneDNN
  leaves a uint8 op to TensorFlow's own kernel);
- on a machine whose operating system shows an NVIDIA GPU (`machine_nvidia_gpus`), the
  lines in which TensorFlow explains why it cannot use it (`GPU_SETUP_LINES`: "Cannot dlopen
  some GPU libraries ... Skipping registering GPU devices", "failed call to cuInit") pass
  at every level but 3: there they are the one hint that the run is on the CPU. Without
  such a GPU they stay dropped at the default level, the same "no GPU here" noise as above;
- everything else (our messages, progress bars rewritten with `\\r`, Python tracebacks,
  real C++ errors) passes through unchanged, partial lines at once.

`TF_CPP_MIN_LOG_LEVEL=0` set by the user turns the filter off: every line shows.
"""

import atexit
import io
import os
import re
import shutil
import sys
from pathlib import Path

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LEVEL = 2
SEVERITIES = {"I": 0, "W": 1, "E": 2, "F": 3}
# Abseil's prefix: severity letter, MMDD, time, thread id, file:line, "]".
_LOG_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\s:\]]+:\d+\] ")
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# ERROR lines that report no error: "no GPU here, TensorFlow runs on the CPU", and oneDNN
# handing an op it has no kernel for (uint8 image ops) to TensorFlow's own implementation.
BENIGN_ERRORS = (b"failed call to cuInit", b"Unable to register cu", b"cuda_dnn", b"cuda_fft", b"cuda_blas",
                 b"Falling back to the default Eigen-based implementation")
# TensorFlow's lines saying why it registers no GPU (missing CUDA/cuDNN libraries, no
# usable driver). Noise where there is no GPU; the diagnosis where there is one.
GPU_SETUP_LINES = (b"Cannot dlopen some GPU libraries", b"Skipping registering GPU devices", b"failed call to cuInit",
                   b"Could not load dynamic library", b"Could not find cuda drivers")
# One directory per NVIDIA GPU the kernel driver has found (PCI address), relative to the root.
NVIDIA_PROC_GPUS = "proc/driver/nvidia/gpus"
# Longest text kept back while it might still become a log line (the prefix is ~50 bytes).
_PREFIX_PROBE = 64

_installed = None


def _user_level(environ):
    """The user's TF_CPP_MIN_LOG_LEVEL as an int 0-3, or None when unset or not a level."""
    raw = environ.get(LEVEL_VARIABLE, "").strip()
    return int(raw) if raw in ("0", "1", "2", "3") else None


def log_level(environ=None):
    """The level in force: the user's TF_CPP_MIN_LOG_LEVEL (0-3), else DEFAULT_LEVEL."""
    level = _user_level(os.environ if environ is None else environ)
    return DEFAULT_LEVEL if level is None else level


def machine_nvidia_gpus(root="/", search_path=None):
    """The NVIDIA GPUs the operating system shows, whether or not TensorFlow can use them.

    Reads the driver's `ROOT/proc/driver/nvidia/gpus/*/information` ("Model: NVIDIA ...");
    without that directory, an `nvidia-smi` on `search_path` (default: $PATH) counts as one
    GPU of unknown model (it is not run: a wedged driver can make it hang). Needs no
    TensorFlow, so the console filter can ask before TensorFlow starts.

    Returns:
        list of str, one model name per GPU ("NVIDIA GPU" when unknown); empty without one.
    """
    models = []
    try:
        gpu_dirs = sorted(path for path in (Path(root) / NVIDIA_PROC_GPUS).iterdir() if path.is_dir())
    except OSError:
        gpu_dirs = []
    for gpu_dir in gpu_dirs:
        model = "NVIDIA GPU"
        try:
            for line in (gpu_dir / "information").read_text(encoding="utf-8", errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Model" and value.strip():
                    model = value.strip()
                    break
        except OSError:
            pass
        models.append(model)
    if not models and shutil.which("nvidia-smi", path=os.environ.get("PATH", os.defpath)
                                   if search_path is None else search_path):
        models.append("NVIDIA GPU")
    return models


def keep_line(line, level, user_set, gpu_machine=False):
    """Whether one line of stderr (bytes, newline included or not) is shown at `level`.

    `user_set`: the level came from the user's TF_CPP_MIN_LOG_LEVEL; then the benign
    errors show at level 2, as TensorFlow would show them. `gpu_machine`: the operating
    system shows an NVIDIA GPU (`machine_nvidia_gpus`); then TensorFlow's `GPU_SETUP_LINES`
    show below level 3, whatever their severity.
    """
    if line.rstrip(b"\r\n") == _ABSL_NOTICE:
        return level == 0
    match = _LOG_LINE.match(line)
    if not match:
        return True
    if gpu_machine and level < 3 and any(reason in line for reason in GPU_SETUP_LINES):
        return True
    severity = SEVERITIES[match.group(1).decode()]
    if severity < level:
        return False
    if severity == SEVERITIES["E"] and not user_set and any(noise in line for noise in BENIGN_ERRORS):
        return False
    return True


def _could_become_log_line(text):
    """A partial line (bytes) that may still turn out to be a filtered log line."""
    if len(text) >= _PREFIX_PROBE:
        return False
    if _ABSL_NOTICE.startswith(text):
        return True
    return bool(re.match(rb"^[IWEF](\d{0,4}|\d{4} [\d:.]*( +\d*( [^\s:\]]*(:\d*)?)?)?)$", text))


def filter_stream(source_fd, target_fd, level, user_set, gpu_machine=False):
    """Copies source_fd to target_fd until EOF, keeping the lines `keep_line` keeps.

    Partial lines pass at once unless they may still become a filtered log line, and a
    progress bar's "\\r" rewrite counts as a line end, so nothing waits for a newline.
    """
    pending = b""

    def write(data):
        while data:
            data = data[os.write(target_fd, data):]

    while True:
        try:
            chunk = os.read(source_fd, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        pending += chunk
        while True:
            ends = [index for index in (pending.find(b"\n"), pending.find(b"\r")) if index >= 0]
            if not ends:
                break
            cut = min(ends) + 1
            line, pending = pending[:cut], pending[cut:]
            if keep_line(line, level, user_set, gpu_machine):
                write(line)
        if pending and not _could_become_log_line(pending):
            write(pending)
            pending = b""
    if pending and keep_line(pending, level, user_set, gpu_machine):
        write(pending)


class _StderrFilter:
    """fd 2 becomes a pipe into a small filter process that writes to the real stderr.

    Only what C++ code (and child processes) write to fd 2 takes that path: Python's own
    `sys.stderr` is re-opened on the real stderr, so our messages, progress bars, warnings
    and tracebacks keep their order with stdout. A process rather than a thread: if this
    one dies (a fatal C++ error, a signal), the filter still drains the pipe, so the last
    words of a crash are not lost.
    """

    def __init__(self, level, user_set, gpu_machine):
        import subprocess

        sys.stderr.flush()
        self.original = os.dup(2)
        read_end, write_end = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), str(level), "1" if user_set else "0",
                 "1" if gpu_machine else "0"],
                stdin=read_end, stdout=self.original, stderr=self.original, close_fds=True,
            )
        finally:
            os.close(read_end)
        os.dup2(write_end, 2)
        os.close(write_end)
        self.python_stderr = sys.stderr
        sys.stderr = io.TextIOWrapper(
            io.FileIO(self.original, "w", closefd=False), encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
            errors="backslashreplace", line_buffering=True, write_through=True,
        )
        atexit.register(self.close)

    def close(self):
        """Puts the real stderr back and lets the filter forward what is left (at exit)."""
        if self.original is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        sys.stderr = self.python_stderr
        os.dup2(self.original, 2)  # drops this process's write end: the filter sees EOF
        os.close(self.original)
        self.original = None
        try:
            self.process.wait(timeout=5)
        except Exception:  # noqa: BLE001 (a child of ours still holds the pipe: let it be)
            pass


def quiet_tensorflow_logs(environ=None):
    """Filters TensorFlow's C++ log lines out of this process's stderr (see the module docstring).

    Call before TensorFlow is imported; calling again does nothing. Sets
    TF_CPP_MIN_LOG_LEVEL to the level in force, so that TensorFlow filters what it logs
    after start-up itself. On a machine with an NVIDIA GPU, TensorFlow's lines on why it
    cannot use it stay (see `keep_line`). Returns the level in force.
    """
    global _installed
    environ = os.environ if environ is None else environ
    user_set = _user_level(environ) is not None
    level = log_level(environ)
    environ[LEVEL_VARIABLE] = str(level)
    if _installed is None and level > 0:
        try:
            _installed = _StderrFilter(level, user_set, bool(machine_nvidia_gpus()))
        except OSError:
            pass  # no usable fd 2 (a daemon with stderr closed): nothing to filter
    return level


if __name__ == "__main__":
    # The filter process (see _StderrFilter): argv = level, user_set, gpu_machine; stdin -> stdout.
    import signal

    # Ctrl-C reaches the whole process group; the filter must outlive the pipeline's
    # own "interrupted" message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    filter_stream(0, 1, int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1")
