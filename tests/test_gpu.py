"""What a run says about its device: the device line, the warning for a GPU TensorFlow cannot use, the GPU install."""

import re
from pathlib import Path

import pytest

from pipeline.core import device, tf_data
from tests.test_console import _fake_nvidia_machine

ROOT = Path(__file__).resolve().parent.parent
CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n\n"


@pytest.fixture
def cpuinfo(tmp_path):
    """Writes a fake /proc/cpuinfo with `extra` flags; returns its path."""
    def write(extra=""):
        path = tmp_path / f"cpuinfo-{extra or 'plain'}"
        path.write_text(CPUINFO.format(extra=extra))
        return path
    return write


def test_an_nvidia_gpu_tensorflow_does_not_list_is_a_warning_naming_the_fix(tmp_path):
    _fake_nvidia_machine(tmp_path, ["NVIDIA L4"])
    warning = device.unusable_gpu_warning(tmp_path, tensorflow_gpus=[], search_path="")
    assert warning.startswith("warning: this machine has 1 NVIDIA GPU (NVIDIA L4) but TensorFlow cannot use it")
    assert "pip install -r requirements-gpu.txt" in warning
    assert device.unusable_gpu_warning(tmp_path, tensorflow_gpus=["NVIDIA L4"], search_path="") is None
    # No GPU in the OS: nothing to say (this machine's real answer too, unless it has one).
    assert device.unusable_gpu_warning(tmp_path / "none", tensorflow_gpus=[], search_path="") is None


def test_announce_prints_the_device_line_after_each_warning_once(tmp_path, cpuinfo, capsys, monkeypatch):
    monkeypatch.setattr(device, "gpu_names", lambda: [])
    monkeypatch.setattr(device, "_warned", set())
    monkeypatch.setenv("PATH", "")  # no nvidia-smi
    _fake_nvidia_machine(tmp_path, ["NVIDIA A100-SXM4-40GB"])
    path = cpuinfo("avx512_bf16")
    cores = tf_data.cpu_count()
    expected = f"CPU, {cores} core{'s' if cores > 1 else ''}, AVX512-BF16 (bf16)"
    for stage in ("extract", "train"):
        assert device.announce(stage, "bf16", cpuinfo_path=path, root=tmp_path) == expected
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and "requirements-gpu.txt" in lines[0]  # the warning once, before the first line
    assert lines[1:] == [f"extract: {expected}", f"train: {expected}"]
    # Without the GPU in /proc, no warning: a CPU machine's console stays quiet.
    monkeypatch.setattr(device, "_warned", set())
    device.announce("train", "fp32", cpuinfo_path=cpuinfo(), root=tmp_path / "none")
    assert re.fullmatch(r"train: CPU, \d+ cores?, AVX512 \(fp32\)\n", capsys.readouterr().err)


def test_a_gpu_line_names_the_gpu_and_the_precision(monkeypatch):
    monkeypatch.setattr(device, "gpu_names", lambda: ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])
    assert device.device_record("fp16") == "GPU:0 (NVIDIA H100 80GB HBM3, fp16; 2 GPUs visible)"
    monkeypatch.setattr(device, "gpu_names", lambda: ["NVIDIA L4"])
    assert device.device_record("fp16") == "GPU:0 (NVIDIA L4, fp16)"
    assert device.precision_warning("fp16", on_gpu=True) is None


def test_slow_precisions_on_a_cpu_say_what_runs(cpuinfo, monkeypatch):
    monkeypatch.setattr(device.tf.config, "list_physical_devices", lambda kind=None: [])
    with_bf16, without = cpuinfo("avx512_bf16"), cpuinfo()
    fp16 = device.precision_warning("fp16", on_gpu=False, cpuinfo_path=with_bf16)
    assert "fp16 is for GPUs" in fp16 and "Running in fp16 as asked; --precision auto picks bf16" in fp16
    assert "auto picks fp32" in device.precision_warning("fp16", on_gpu=False, cpuinfo_path=without)
    assert "no bfloat16 instructions" in device.precision_warning("bf16", on_gpu=False, cpuinfo_path=without)
    assert device.precision_warning("bf16", on_gpu=False, cpuinfo_path=with_bf16) is None
    assert device.precision_warning("fp32", on_gpu=False, cpuinfo_path=without) is None
    with pytest.raises(device.errors.PipelineError, match="train.precision must be one of bf16, fp16, fp32 or auto"):
        device.resolve_precision("half", setting="train.precision")


def test_requirements_gpu_adds_tensorflows_cuda_extra_in_the_same_range():
    def tensorflow_range(path):
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        return [re.sub(r"^tensorflow(\[and-cuda\])?", "", line)
                for line in lines if re.match(r"tensorflow(\[|>|<|=)", line)]

    gpu = ROOT / "requirements-gpu.txt"
    assert "-r requirements.txt" in gpu.read_text().splitlines()
    assert "tensorflow[and-cuda]" in gpu.read_text()
    assert tensorflow_range(gpu) == tensorflow_range(ROOT / "requirements.txt")


def test_every_computing_stage_starts_with_its_device_and_the_report_shows_them(finetuned, demo_data_dir, copy_run,
                                                                                capsys):
    import h5py

    from pipeline import evaluate, export, extract
    from pipeline.data import run_folder
    from tests.conftest import EXTRACT_OVERRIDES

    out = copy_run(finetuned[0])
    line = re.compile(r"(extract|evaluate|export): CPU, \d+ cores?(, [A-Z0-9-]+)? \((fp32|bf16|fp16)\)")
    for stage, run in (("extract", lambda: extract.run_extract(demo_data_dir, out, dict(EXTRACT_OVERRIDES))),
                       ("evaluate", lambda: evaluate.run_evaluate(out, {"decode.beam_size": 1})),
                       ("export", lambda: export.run_export(out, {"decode.beam_size": 1}))):
        run()
        captured = capsys.readouterr()
        first = captured.err.splitlines()[0]
        assert first.startswith(f"{stage}: ") and line.fullmatch(first), (stage, captured.err[:300])
    config = run_folder.read_config(out, requires="`train`")
    with h5py.File(out / "features.h5", "r") as handle:
        extracted_on = handle.attrs["device"]
    assert extracted_on.startswith("CPU") and extracted_on.endswith(f"({config.encoder.precision})")
    assert config.train.device.startswith("CPU") and config.finetune.device.startswith("CPU")
    page = (out / "report.html").read_text()
    for computed_by, device_line in (("features (extract)", extracted_on), ("decoder (train)", config.train.device),
                                     ("fine-tuning (finetune)", config.finetune.device)):
        assert f"<td>{computed_by}</td><td>{device_line}</td>" in page


def test_extraction_batch_is_sized_for_the_device_unless_set(monkeypatch):
    from pipeline.core import config as config_module

    assert config_module.EncoderConfig().batch_size == 0  # sized for the device
    monkeypatch.setattr(device, "gpu_names", lambda: [])
    assert device.extraction_batch_size(0) == device.EXTRACTION_BATCH["CPU"] == 32
    monkeypatch.setattr(device, "gpu_names", lambda: ["NVIDIA L4"])
    assert device.extraction_batch_size(0) == device.EXTRACTION_BATCH["GPU"] == 128
    assert device.extraction_batch_size(8) == 8  # --extract-batch-size wins
    with pytest.raises(device.errors.PipelineError, match="encoder.batch_size must be positive"):
        config_module.PipelineConfig().replace({"encoder.batch_size": -1}).check("encoder")
