"""The `finetune` stage: artifacts, evaluation of both decoders, and SIGKILL + --resume."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import config as config_module
from pipeline.data import run_folder
from tests.conftest import FINETUNE_SETTINGS
from tests.helpers import decoder_weights, wait_until

REPO = Path(__file__).resolve().parent.parent


def _prepared(trained_out, copy_run):
    out = copy_run(trained_out)
    # A checkpoint after every step, so the kill lands just after one, mid-epoch. How often
    # checkpoints are written does not change the steps a run takes.
    config_module.PipelineConfig.load(out).replace({**FINETUNE_SETTINGS, "finetune.checkpoint_steps": 1}).save(out)
    return out


def test_finetune_keeps_the_xe_decoder_and_writes_history_logs_and_metrics_of_both(finetuned):
    out, summary, original = finetuned
    assert (out / "decoder_xe.keras").read_bytes() == original
    history = json.loads((out / "finetune_history.json").read_text())
    assert [entry["epoch"] for entry in history["epochs"]] == [1, 2]
    steps_per_epoch = history["epochs"][0]["step"]
    assert summary["steps"] == 2 * steps_per_epoch
    assert all(entry["mean_reward"] >= 0 and entry["val_cider"] >= 0 for entry in history["epochs"])
    # On these 48 images the fine-tuning raises validation CIDEr-D, so the fine-tuned decoder is kept.
    assert summary["best_val_cider"] > summary["initial_val_cider"]
    assert history["best_step"] > 0 and run_folder.decoder_objective(out) == "scst"
    assert list((out / "logs" / "finetune").glob("events.out.tfevents.*"))

    metrics = json.loads((out / "metrics.json").read_text())
    metrics_xe = json.loads((out / "metrics_xe.json").read_text())
    assert (metrics["objective"], metrics_xe["objective"]) == ("scst", "xe")
    for result in (metrics, metrics_xe):
        assert 0 <= result["bad_endings"] <= 1 and 0 <= result["immediate_repeats"] <= 1
        assert result["mean_length"] > 0 and result["vocabulary_used"] >= 1
    assert metrics["xe"]["cider"] == metrics_xe["cider"]
    assert 0 < metrics["meteor"] < 1 and 0 < metrics_xe["meteor"] < 1
    captions = json.loads((out / "captions_test.json").read_text())["captions"]
    assert all("caption_xe" in entry for entry in captions)
    page = (out / "report.html").read_text()
    assert "cross-entropy: " in page and "Self-critical fine-tuning" in page


def test_a_second_finetune_starts_again_from_the_xe_decoder_and_a_new_train_replaces_it(finetuned, copy_run):
    from pipeline import finetune

    out, _, original = finetuned
    out = copy_run(out)
    # decoder.keras is the fine-tuned decoder (its digest is in the history): start from decoder_xe.keras.
    assert finetune._source_decoder(out, resume=False) == out / "decoder_xe.keras"
    assert (out / "decoder_xe.keras").read_bytes() == original
    # A later `train` writes a new XE decoder.keras: it becomes the new decoder_xe.keras.
    retrained = original + b"retrained"
    (out / "decoder.keras").write_bytes(retrained)
    assert run_folder.decoder_objective(out) == "xe"
    finetune._source_decoder(out, resume=False)
    assert (out / "decoder_xe.keras").read_bytes() == retrained


def test_finetune_sigkilled_mid_epoch_and_resumed_equals_the_uninterrupted_run(finetuned, trained_out, copy_run,
                                                                               capsys):
    from pipeline import finetune

    reference_out, reference, _ = finetuned
    out = _prepared(trained_out, copy_run)
    steps_per_epoch = reference["steps"] // 2
    kill_after = steps_per_epoch + 2  # two steps into the second epoch
    command = [sys.executable, "run_pipeline.py", "finetune", "--out", str(out)]
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    state = out / "finetune_checkpoints" / f"state-{kill_after}.json"
    wait_until(state.exists, 120, [process])
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, stderr[-2000:]
    history = json.loads((out / "finetune_history.json").read_text())
    assert len(history["epochs"]) == 1  # killed inside epoch 2

    # `finetune --resume` is this call (run_pipeline.py only parses the flag); in-process, it
    # spares the test a second TensorFlow start-up.
    finetune.run_finetune(out, {}, resume=True)
    err = capsys.readouterr().err
    assert "resuming at step" in err
    # The reward's document frequencies come from the checkpoint folder, not a second count.
    assert "CIDEr-D document frequencies read from" in err and "counted" not in err
    expected = json.loads((reference_out / "finetune_history.json").read_text())
    history = json.loads((out / "finetune_history.json").read_text())
    for got, want in zip(history["epochs"], expected["epochs"], strict=True):
        for key in ("step", "mean_reward", "loss", "val_cider", "best"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    assert history["best_step"] == expected["best_step"]
    for got, want in zip(decoder_weights(out), decoder_weights(reference_out, run_folder.XE_DECODER_FILE)
                         if expected["best_step"] == 0 else decoder_weights(reference_out)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_run_stopped_in_its_first_epoch_resumes_to_the_uninterrupted_result(finetuned, trained_out, copy_run,
                                                                                monkeypatch, capsys):
    # The starting decoder is validated at the end of epoch 1 (its weights put back for it):
    # a run stopped before then validates it on --resume, from decoder_xe.keras.
    from pipeline import finetune
    from pipeline.training import scst

    reference_out, _, _ = finetuned
    out = _prepared(trained_out, copy_run)
    train_step, steps = scst.Stepper.train_step, []

    def stopped_after_three_steps(self, *args, **kwargs):
        if len(steps) == 3:
            raise KeyboardInterrupt
        steps.append(1)
        return train_step(self, *args, **kwargs)

    monkeypatch.setattr(scst.Stepper, "train_step", stopped_after_three_steps)
    with pytest.raises(KeyboardInterrupt):
        finetune.run_finetune(out, {})
    monkeypatch.undo()
    history = json.loads((out / "finetune_history.json").read_text())
    assert (history["epochs"], history["initial_val_cider"], history["best_step"]) == ([], None, 0)
    assert run_folder.decoder_objective(out) == "xe"
    assert "starting validation" not in capsys.readouterr().err

    finetune.run_finetune(out, {}, resume=True)
    assert "resuming at step 3" in capsys.readouterr().err
    expected = json.loads((reference_out / "finetune_history.json").read_text())
    history = json.loads((out / "finetune_history.json").read_text())
    for key in ("initial_val_cider", "best_val_cider", "best_step"):
        assert history[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    for got, want in zip(history["epochs"], expected["epochs"], strict=True):
        for key in ("step", "mean_reward", "loss", "val_cider", "best"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    for got, want in zip(decoder_weights(out), decoder_weights(reference_out)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_resume_counts_the_reward_again_when_its_saved_state_is_of_other_captions(finetuned, copy_run, capsys):
    from pipeline import finetune

    out = copy_run(finetuned[0])
    path = out / "finetune_checkpoints" / finetune.REWARD_STATE_FILE
    with np.load(path) as saved:
        state = dict(saved)
    right = str(state["fingerprint"])
    state["fingerprint"] = np.asarray("0" * 64)  # as if captions.json or vocab.json had changed
    np.savez(path, **state)
    finetune.run_finetune(out, {}, resume=True)  # the run is finished: set-up only
    err = capsys.readouterr().err
    assert "does not belong to these captions" in err and "counting them again" in err
    assert "CIDEr-D document frequencies of" in err
    with np.load(path) as saved:
        assert str(saved["fingerprint"]) == right
        np.testing.assert_array_equal(saved["ngram_keys"], state["ngram_keys"])
    finetune.run_finetune(out, {}, resume=True)
    assert "CIDEr-D document frequencies read from" in capsys.readouterr().err


def test_bad_settings_are_rejected_before_anything_is_written(trained_out, finetuned, copy_run, monkeypatch):
    from pipeline import finetune
    from pipeline.core import errors

    finished = copy_run(finetuned[0])
    with pytest.raises(errors.PipelineError, match="--resume cannot change finetune.batch_size"):
        finetune.run_finetune(finished, {"finetune.batch_size": 8, "finetune.epochs": 3}, resume=True)
    assert len(json.loads((finished / "finetune_history.json").read_text())["epochs"]) == 2
    out = copy_run(trained_out)
    with pytest.raises(errors.PipelineError, match="must be one of default, mirrored, multiworker, got 'tpu'"):
        finetune.run_finetune(out, {"finetune.strategy": "tpu"})
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(errors.PipelineError, match="--strategy multiworker needs the TF_CONFIG environment variable"):
        finetune.run_finetune(out, {"finetune.strategy": "multiworker"})
    with pytest.raises(errors.PipelineError, match="finetune.baseline"):
        finetune.run_finetune(out, {"finetune.baseline": "best"})
    with pytest.raises(errors.PipelineError, match="at least 2 with the mean baseline"):
        finetune.run_finetune(out, {"finetune.samples": 1})
    with pytest.raises(errors.ArtifactError, match="no checkpoint to resume"):
        finetune.run_finetune(out, {}, resume=True)
    assert not (out / "decoder_xe.keras").exists()


MIRRORED_SCRIPT = r"""
import json
import numpy as np
import tensorflow as tf

# Two logical CPU devices: must happen before anything initializes TF's devices.
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
from models import decoder
from pipeline.core import config as config_module
from pipeline.training import distribution, scst
from pipeline.training.cider_reward import CiderD

rng = np.random.default_rng(0)
features = tf.constant(rng.normal(size=(12, 16)).astype(np.float32))
references = [[np.asarray([*rng.integers(4, 30, size=rng.integers(2, 8)), 2]) for _ in range(3)] for _ in range(12)]
reward = CiderD(references, 30)
settings = config_module.FinetuneConfig(samples=3, batch_size=6)
config = config_module.DecoderConfig(embedding_dim=8, units=16, dropout=0.0)
report = {}
strategies = {name: distribution.make_strategy(name) for name in ("default", "mirrored")}
for name, strategy in strategies.items():
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = decoder.build_decoder(config, 30, feature_dim=16)
        optimizer = keras.optimizers.SGD(0.5)
        optimizer.build(model.trainable_variables)
    stepper = scst.Stepper(model, optimizer, strategy, settings, 6, reward)
    losses, rewards = [], []
    for step in range(4):
        members = np.arange(6) + 6 * (step % 2)
        outcome = stepper.train_step(tf.gather(features, members), members, (0, step))
        losses.append(outcome["loss"])
        rewards.append(outcome["rewards"].tolist())
    report[name] = {"replicas": strategy.num_replicas_in_sync, "losses": losses, "rewards": rewards,
                    "weights": [np.asarray(weight).tolist() for weight in model.get_weights()]}
print(json.dumps(report))
"""


def test_mirrored_fine_tuning_on_two_cpu_devices_matches_one_device():
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    single, mirrored = report["default"], report["mirrored"]
    assert (single["replicas"], mirrored["replicas"]) == (1, 2)
    # Same samples (sampling is seeded by the step), so the same rewards, losses and updates:
    # each replica's loss is divided by the global token count and Keras sums the gradients.
    np.testing.assert_allclose(mirrored["rewards"], single["rewards"], atol=1e-9)
    np.testing.assert_allclose(mirrored["losses"], single["losses"], rtol=1e-5, atol=1e-7)
    initial_differs = max(abs(a - b) for a, b in zip(single["losses"], single["losses"][1:]))
    assert initial_differs > 0  # the weights moved between steps
    for got, want in zip(mirrored["weights"], single["weights"]):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_command_line_maps_finetune_flags_to_the_finetune_section():
    import run_pipeline

    parser = run_pipeline.build_parser()
    args = parser.parse_args(["finetune", "--out", "OUT", "--epochs", "3", "--learning-rate", "1e-4", "--samples", "4",
                              "--baseline", "greedy", "--batch-size", "16", "--strategy", "mirrored", "--resume",
                              "--precision", "bf16"])
    assert run_pipeline._overrides(args, run_pipeline.FINETUNE_FLAGS) == {
        "finetune.epochs": 3, "finetune.learning_rate": 1e-4, "finetune.samples": 4, "finetune.baseline": "greedy",
        "finetune.batch_size": 16, "finetune.strategy": "mirrored", "finetune.precision": "bf16"}
    assert args.resume
    args = parser.parse_args(["all", "--data", "D", "--out", "OUT", "--finetune-epochs", "2"])
    assert args.finetune_epochs == 2
    assert parser.parse_args(["all", "--data", "D", "--out", "OUT"]).finetune_epochs is None
