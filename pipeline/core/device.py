"""What this machine computes on: its processor's features, and the arithmetic it runs best.

The one place that asks the machine (the Linux kernel's /proc/cpuinfo, TensorFlow's list
of devices, the oneDNN switch in the environment) what the models should compute with,
so `models/` can take its answers as plain arguments. `resolve_precision` turns the
user's `--precision auto` into a name `models.encoder.build_encoder` accepts.

Each computing stage starts with `announce(stage, precision)`: one line naming the device
and the arithmetic in force (`extract: GPU:0 (NVIDIA A100-SXM4-40GB, fp16)`, `train: CPU,
2 cores, AVX512-BF16 (bf16)`), after one warning when the operating system shows an
NVIDIA GPU that TensorFlow does not list (its CUDA libraries are missing: the console
then lets TensorFlow's own lines on why through, `pipeline.core.console`), and one when
the precision asked is slow on this device. The same line, stage name left out, is what
the artifacts record (`device_record`).
"""

import os
import sys
from pathlib import Path

import tensorflow as tf

from models import encoder
from pipeline.core import console, errors, tf_data

CPUINFO_PATH = "/proc/cpuinfo"
# x86 feature flags (/proc/cpuinfo) of native bfloat16 matrix arithmetic, which oneDNN uses
# for bfloat16 convolutions; without them bfloat16 is emulated and slower than float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# The vector/matrix extension a device line names, best first (flag -> name).
CPU_EXTENSIONS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2"),
                  ("asimd", "NEON"))
GPU_INSTALL_COMMAND = "pip install -r requirements-gpu.txt"
# Images per encoder call when the user sets none. On a CPU the convolutions fill the cores
# at 32 already; a GPU needs larger batches to keep its tensor cores busy (128: not measured
# here, there is no GPU; `python -m benchmarks.bench_gpu` times it on one).
EXTRACTION_BATCH = {"CPU": 32, "GPU": 128}
_warned = set()  # the warnings this process has printed (each once, whatever the stages)


def cpu_flags(cpuinfo_path=CPUINFO_PATH):
    """The CPU feature flags the Linux kernel reports (set of str); empty elsewhere or unreadable."""
    try:
        text = Path(cpuinfo_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # the same on every core: the first one is enough
            return set(value.split())
    return set()


def gpu_names():
    """The GPUs TensorFlow computes on, in its order: list of str ("NVIDIA A100-SXM4-40GB"; "GPU" when unnamed)."""
    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            names.append(tf.config.experimental.get_device_details(gpu).get("device_name") or "GPU")
        except (ValueError, RuntimeError):
            names.append("GPU")
    return names


def unusable_gpu_warning(root="/", tensorflow_gpus=None, search_path=None):
    """A warning (str) when the operating system shows an NVIDIA GPU that TensorFlow does not list, else None.

    Args:
        root: where /proc is looked for (tests pass a fake tree).
        tensorflow_gpus: the GPUs TensorFlow lists (list; None: ask TensorFlow).
        search_path: where `nvidia-smi` is looked for (None: $PATH).
    """
    machine = console.machine_nvidia_gpus(root, search_path)
    if not machine or (gpu_names() if tensorflow_gpus is None else tensorflow_gpus):
        return None
    models = ", ".join(sorted(set(machine)))
    return (f"warning: this machine has {len(machine)} NVIDIA GPU{'s' if len(machine) > 1 else ''} ({models}) but "
            f"TensorFlow cannot use {'them' if len(machine) > 1 else 'it'}: everything runs on the CPU. Install "
            f"TensorFlow's CUDA libraries with `{GPU_INSTALL_COMMAND}` (TensorFlow's lines above say what it "
            "could not load)")


def precision_warning(precision, on_gpu, cpuinfo_path=CPUINFO_PATH):
    """A warning (str) when `precision` (resolved) has no fast hardware on this device, else None.

    fp16 on a CPU and bf16 on a CPU without AMX-BF16/AVX512-BF16 run emulated, slower than
    fp32; they still run as asked (the artifacts record them), since results, not speed, are
    what a user comparing precisions wants.
    """
    if on_gpu or precision == "fp32":
        return None
    if precision == "fp16":
        return ("warning: fp16 is for GPUs (tensor cores), and TensorFlow sees none: float16 on the CPU is emulated, "
                "slower than fp32. Running in fp16 as asked; --precision auto picks "
                f"{resolve_precision('auto', cpuinfo_path)} on this machine")
    if precision == "bf16" and not cpu_flags(cpuinfo_path) & set(BF16_CPU_FLAGS):
        return ("warning: this CPU has no bfloat16 instructions (AMX-BF16 or AVX512-BF16): bf16 is emulated, slower "
                "than fp32. Running in bf16 as asked; --precision auto picks fp32 on this machine")
    return None


def extraction_batch_size(batch_size=0):
    """Images per encoder call (int): `batch_size` when set (> 0), else EXTRACTION_BATCH of this device."""
    return batch_size if batch_size > 0 else EXTRACTION_BATCH["GPU" if gpu_names() else "CPU"]


def device_record(precision, cpuinfo_path=CPUINFO_PATH):
    """What a stage computes on, as artifacts record it (str): "GPU:0 (NVIDIA A100-SXM4-40GB, fp16)",
    "CPU, 2 cores, AVX512-BF16 (bf16)". `precision` is the resolved name in force."""
    gpus = gpu_names()
    if gpus:
        others = f"; {len(gpus)} GPUs visible" if len(gpus) > 1 else ""
        return f"GPU:0 ({gpus[0]}, {precision}{others})"
    flags = cpu_flags(cpuinfo_path)
    extension = next((name for flag, name in CPU_EXTENSIONS if flag in flags), None)
    cores = tf_data.cpu_count()
    parts = ["CPU", f"{cores} core{'s' if cores > 1 else ''}"] + ([extension] if extension else [])
    return f"{', '.join(parts)} ({precision})"


def announce(stage, precision, cpuinfo_path=CPUINFO_PATH, root="/", stream=None):
    """Prints the stage's device line (after the warnings that apply, each once a process); returns `device_record`.

    Args:
        stage: the command's name ("extract", "train", ...).
        precision: the resolved precision in force ("fp32", "bf16", "fp16").
        stream: where the line and the warnings go (default sys.stderr, with the stages' other lines).
    """
    record = device_record(precision, cpuinfo_path)
    on_gpu = record.startswith("GPU")
    for warning in (unusable_gpu_warning(root) if not on_gpu else None,
                    precision_warning(precision, on_gpu, cpuinfo_path)):
        if warning and warning not in _warned:
            _warned.add(warning)
            print(warning, file=stream or sys.stderr, flush=True)
    print(f"{stage}: {record}", file=stream or sys.stderr, flush=True)
    return record


def resolve_precision(precision, cpuinfo_path=CPUINFO_PATH, setting="encoder.precision"):
    """Resolves "auto" for this machine and checks the name; returns a key of `encoder.PRECISION_POLICIES`.

    "auto" is "fp16" when a GPU is visible (mixed_float16: tensor cores), "bf16" on a CPU
    with AMX-BF16 or AVX512-BF16 while oneDNN is on (TF's default on x86; the environment
    variable TF_ENABLE_ONEDNN_OPTS=0 turns it off), and "fp32" otherwise. Other names
    pass through unchanged whatever the machine.

    Raises PipelineError for a name that is neither "auto" nor a known precision, naming
    `setting` (the option the name came from: "encoder.precision", "train.precision", ...).
    """
    if precision == "auto":
        if tf.config.list_physical_devices("GPU"):
            return "fp16"
        onednn_on = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false")
        if onednn_on and cpu_flags(cpuinfo_path) & set(BF16_CPU_FLAGS):
            return "bf16"
        return "fp32"
    if precision not in encoder.PRECISION_POLICIES:
        raise errors.PipelineError(
            f"{setting} must be one of {', '.join(sorted(encoder.PRECISION_POLICIES))} or auto, got {precision!r}"
        )
    return precision
