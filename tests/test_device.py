"""pipeline.core.device: what this machine computes on, read from /proc/cpuinfo and TensorFlow."""

from pathlib import Path

import pytest
import tensorflow as tf

from pipeline.core import device
from pipeline.core.errors import PipelineError


def test_auto_precision_follows_the_cpu_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    header = "processor\t: 0\nmodel name\t: Some CPU\n"
    cpuinfo.write_text(header + "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n" + "processor\t: 1\n")
    assert device.cpu_flags(cpuinfo) >= {"avx2", "avx512_bf16"}
    assert device.resolve_precision("auto", cpuinfo) == "bf16"
    cpuinfo.write_text(header + "flags\t\t: fpu sse2 avx2 amx_tile amx_bf16\n")
    assert device.resolve_precision("auto", cpuinfo) == "bf16"
    cpuinfo.write_text(header + "flags\t\t: fpu sse2 avx2 avx512f avx512_fp16\n")
    assert device.resolve_precision("auto", cpuinfo) == "fp32"
    assert device.resolve_precision("auto", tmp_path / "absent") == "fp32"  # not Linux
    # Explicit names pass through whatever the machine.
    assert device.resolve_precision("fp16", cpuinfo) == "fp16"
    # Without oneDNN, TF emulates bfloat16 convolutions: slower than float32.
    cpuinfo.write_text(header + "flags\t\t: avx512_bf16 amx_bf16\n")
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert device.resolve_precision("auto", cpuinfo) == "fp32"
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    # The real /proc/cpuinfo (the development host, an AMD EPYC Zen 5, has avx512_bf16 and no AMX: "bf16").
    machine_flags = device.cpu_flags()
    assert bool(machine_flags) == Path(device.CPUINFO_PATH).is_file()
    expected = "bf16" if machine_flags & set(device.BF16_CPU_FLAGS) else "fp32"
    assert device.resolve_precision("auto") == ("fp16" if tf.config.list_physical_devices("GPU") else expected)


def test_unknown_precision_names_the_setting():
    with pytest.raises(PipelineError, match="encoder.precision must be one of bf16, fp16, fp32 or auto, got 'fp8'"):
        device.resolve_precision("fp8")
