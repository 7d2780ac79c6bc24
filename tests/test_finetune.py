"""The `finetune` stage: artifacts, evaluation of both decoders, and SIGKILL + --resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import config as config_module

REPO = Path(__file__).resolve().parent.parent
# Small steps (4 images x 5 samples) and a checkpoint after every step, so a kill lands mid-epoch.
FINETUNE_SETTINGS = {
    "finetune.epochs": 2, "finetune.batch_size": 4, "finetune.checkpoint_steps": 1,
    "finetune.learning_rate": 5e-3,
}


def _prepared(trained_out, copy_run):
    out = copy_run(trained_out)
    config_module.PipelineConfig.load(out).replace(FINETUNE_SETTINGS).save(out)
    return out


def _weights(path):
    import keras

    return [np.asarray(weight) for weight in keras.saving.load_model(path, compile=False).get_weights()]


@pytest.fixture(scope="module")
def finetuned(trained_out, tmp_path_factory):
    """(OUT after an uninterrupted 2-epoch fine-tuning and `evaluate`, the summary, the original decoder bytes)."""
    import shutil

    from pipeline import evaluate, finetune

    out = tmp_path_factory.mktemp("finetune") / "run"
    shutil.copytree(trained_out, out)
    config_module.PipelineConfig.load(out).replace(FINETUNE_SETTINGS).save(out)
    original = (out / "decoder.keras").read_bytes()
    summary = finetune.run_finetune(out, {})
    evaluate.run_evaluate(out, {"decode.beam_size": 1})
    return out, summary, original


def test_finetune_keeps_the_xe_decoder_and_writes_history_logs_and_metrics_of_both(finetuned):
    from pipeline import finetune

    out, summary, original = finetuned
    assert (out / "decoder_xe.keras").read_bytes() == original
    history = json.loads((out / "finetune_history.json").read_text())
    assert [entry["epoch"] for entry in history["epochs"]] == [1, 2]
    steps_per_epoch = history["epochs"][0]["step"]
    assert summary["steps"] == 2 * steps_per_epoch
    assert all(entry["mean_reward"] >= 0 and entry["val_cider"] >= 0 for entry in history["epochs"])
    # On these 48 images the fine-tuning raises validation CIDEr-D, so the fine-tuned decoder is kept.
    assert summary["best_val_cider"] > summary["initial_val_cider"]
    assert history["best_step"] > 0 and finetune.decoder_objective(out) == "scst"
    assert list((out / "logs" / "finetune").glob("events.out.tfevents.*"))

    metrics = json.loads((out / "metrics.json").read_text())
    metrics_xe = json.loads((out / "metrics_xe.json").read_text())
    assert (metrics["objective"], metrics_xe["objective"]) == ("scst", "xe")
    for result in (metrics, metrics_xe):
        assert 0 <= result["bad_endings"] <= 1 and 0 <= result["immediate_repeats"] <= 1
        assert result["mean_length"] > 0 and result["vocabulary_used"] >= 1
    assert metrics["xe"]["cider"] == metrics_xe["cider"]
    captions = json.loads((out / "captions_test.json").read_text())["captions"]
    assert all("caption_xe" in entry for entry in captions)
    page = (out / "report.html").read_text()
    assert "cross-entropy: " in page and "Self-critical fine-tuning" in page


def test_a_second_finetune_starts_again_from_the_xe_decoder(finetuned, copy_run):
    from pipeline import finetune

    out, _, original = finetuned
    out = copy_run(out)
    finetune.run_finetune(out, {"finetune.epochs": 1})
    assert (out / "decoder_xe.keras").read_bytes() == original  # not the fine-tuned one
    assert len(json.loads((out / "finetune_history.json").read_text())["epochs"]) == 1


def test_finetune_sigkilled_mid_epoch_and_resumed_equals_the_uninterrupted_run(finetuned, trained_out, copy_run):
    reference_out, reference, _ = finetuned
    out = _prepared(trained_out, copy_run)
    steps_per_epoch = reference["steps"] // 2
    kill_after = steps_per_epoch + 2  # two steps into the second epoch
    command = [sys.executable, "run_pipeline.py", "finetune", "--out", str(out)]
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    state = out / "finetune_checkpoints" / f"state-{kill_after}.json"
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, stderr[-2000:]
    history = json.loads((out / "finetune_history.json").read_text())
    assert len(history["epochs"]) == 1  # killed inside epoch 2

    resumed = subprocess.run(command + ["--resume"], cwd=REPO, env=environment, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step" in resumed.stderr
    expected = json.loads((reference_out / "finetune_history.json").read_text())
    history = json.loads((out / "finetune_history.json").read_text())
    for got, want in zip(history["epochs"], expected["epochs"], strict=True):
        for key in ("step", "mean_reward", "loss", "val_cider", "best"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    assert history["best_step"] == expected["best_step"]
    for got, want in zip(_weights(out / "decoder.keras"), _weights(reference_out / "decoder_xe.keras")
                         if expected["best_step"] == 0 else _weights(reference_out / "decoder.keras")):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_bad_settings_are_rejected_before_anything_is_written(trained_out, copy_run):
    from pipeline import errors, finetune

    out = copy_run(trained_out)
    with pytest.raises(errors.PipelineError, match="finetune.baseline"):
        finetune.run_finetune(out, {"finetune.baseline": "best"})
    with pytest.raises(errors.PipelineError, match="at least 2 with the mean baseline"):
        finetune.run_finetune(out, {"finetune.samples": 1})
    with pytest.raises(errors.ArtifactError, match="no checkpoint to resume"):
        finetune.run_finetune(out, {}, resume=True)
    assert not (out / "decoder_xe.keras").exists()
