"""What this machine computes on: its processor's features, and the arithmetic it runs best.

The one place that asks the machine (the Linux kernel's /proc/cpuinfo, TensorFlow's list
of devices, the oneDNN switch in the environment) what the models should compute with,
so `models/` can take its answers as plain arguments. `resolve_precision` turns the
user's `--precision auto` into a name `models.encoder.build_encoder` accepts.
"""

import os
from pathlib import Path

import tensorflow as tf

from models import encoder
from pipeline.core import errors

CPUINFO_PATH = "/proc/cpuinfo"
# x86 feature flags (/proc/cpuinfo) of native bfloat16 matrix arithmetic, which oneDNN uses
# for bfloat16 convolutions; without them bfloat16 is emulated and slower than float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


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


def resolve_precision(precision, cpuinfo_path=CPUINFO_PATH):
    """Resolves "auto" for this machine and checks the name; returns a key of `encoder.PRECISION_POLICIES`.

    "auto" is "fp16" when a GPU is visible (mixed_float16: tensor cores), "bf16" on a CPU
    with AMX-BF16 or AVX512-BF16 while oneDNN is on (TF's default on x86; the environment
    variable TF_ENABLE_ONEDNN_OPTS=0 turns it off), and "fp32" otherwise. Other names
    pass through unchanged whatever the machine.

    Raises PipelineError for a name that is neither "auto" nor a known precision.
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
            f"encoder.precision must be one of {', '.join(sorted(encoder.PRECISION_POLICIES))} or auto, got {precision!r}"
        )
    return precision
