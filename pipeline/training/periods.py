"""What happens between `train`'s validation periods, and the files that let `--resume` continue them.

A validation period is one Keras epoch of `train.validate_every_steps` optimizer steps.
After each, `PeriodValidation` scores the model on the val split, keeps the best
decoder, cuts the learning rate on a plateau and decides the stop; it writes the
period's entry of OUT/history.json and the stopping state (OUT/checkpoints/stopping.json)
before Keras' BackupAndRestore writes the period's checkpoint, so whichever checkpoint a
resume restores finds its stopping state on disk.
"""

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import keras
import numpy as np

from pipeline.core import errors, io_utils
from pipeline.data import run_folder
from pipeline.training import validation

STOPPING_FORMAT = "captioner.stopping"
# stopping.json keeps the state after each of the last periods, so the state matching
# whichever of BackupAndRestore's two checkpoints a resume restores is there.
STOPPING_PERIODS_KEPT = 3
# BackupAndRestore's files in OUT/checkpoints/.
CHECKPOINT_METADATA_FILE = "training_metadata.json"
CHECKPOINT_WEIGHTS_FILE = "latest.weights.h5"


def checkpoint_epoch(checkpoint_dir):
    """Periods (Keras epochs) finished according to BackupAndRestore's metadata (int), or None without a checkpoint."""
    metadata = Path(checkpoint_dir) / CHECKPOINT_METADATA_FILE
    if not metadata.is_file() or not (Path(checkpoint_dir) / CHECKPOINT_WEIGHTS_FILE).is_file():
        return None
    try:
        return int(json.loads(metadata.read_text(encoding="utf-8"))["epoch"])
    except (ValueError, KeyError, TypeError) as error:
        raise errors.ArtifactError(f"{metadata}: damaged checkpoint metadata ({error}); train again without --resume")


def read_stopping_state(checkpoint_dir, period, period_steps):
    """The stopping state saved after `period` (int) in OUT/checkpoints/stopping.json.

    Returns:
        dict: "stopper" (`validation.EarlyStopper.state_dict()`), "lr_reductions" (int),
        "last_reduction_step" (int or None), "stopped" (bool).
    Raises ArtifactError if the file lacks that period, PipelineError if it was written
    with another validation period.
    """
    path = Path(checkpoint_dir) / run_folder.STOPPING_FILE
    data = io_utils.read_json(path, "the early-stopping state")
    states = data.get("periods") if isinstance(data, dict) and data.get("format") == STOPPING_FORMAT else None
    if not isinstance(states, dict) or not isinstance(states.get(str(period)), dict):
        raise errors.ArtifactError(
            f"{path}: no early-stopping state for the checkpoint of period {period}; train again without --resume"
        )
    if data.get("period_steps") != period_steps:
        raise errors.PipelineError(
            f"--resume cannot change the validation period (checkpoint: every {data.get('period_steps')} steps, "
            f"asked: {period_steps}); keep --validate-every-steps and --epochs large enough, or train without --resume"
        )
    return states[str(period)]


def write_stopping_state(checkpoint_dir, period_steps, period, state):
    """Adds `state` (dict, as `read_stopping_state` returns) for `period` to stopping.json,
    keeping the last STOPPING_PERIODS_KEPT periods."""
    path = Path(checkpoint_dir) / run_folder.STOPPING_FILE
    states = {}
    if path.is_file():
        data = io_utils.read_json(path, "the early-stopping state")
        if isinstance(data, dict) and data.get("period_steps") == period_steps:
            states = {key: value for key, value in data.get("periods", {}).items() if int(key) < period}
    states[str(period)] = state
    kept = sorted(states, key=int)[-STOPPING_PERIODS_KEPT:]
    io_utils.write_json(path, {"format": STOPPING_FORMAT, "version": 1, "period_steps": period_steps,
                               "periods": {key: states[key] for key in kept}})


def tensorboard_installed():
    """Whether the tensorboard package is there: tf.summary writes nothing without it."""
    return importlib.util.find_spec("tensorboard") is not None


class PeriodValidation(keras.callbacks.Callback):
    """After each validation period: validation CIDEr-D, selection, early stopping, LR cuts.

    Every worker of a distributed run scores the same val vectors with the same,
    synchronized weights, and then takes the chief's scores (`validation.chief_scores`),
    so the chief decides and all workers stop together; only the chief writes
    decoder.keras (on a new best), history.json and stopping.json.

    Args:
        out_dir: the run folder (Path).
        train_config: the run's TrainConfig.
        history: list of the history entries so far (`run_folder.read_training_history`);
            each period's entry is appended to it.
        is_chief: whether this process writes OUT.
        strategy: the run's tf.distribute strategy.
        scorer: callable(decoder_model) -> {"val_cider", "val_bleu_4", "val_seconds", ...}.
        schedule: the `models.schedules.WarmupSchedule` of the optimizer (its `scale` is cut).
        period_steps, steps_per_epoch: optimizer steps per period and per pass over the captions.
        stopping_state: the state `read_stopping_state` gave for a resumed run, or None.
        val_loss_set: (images, captions), ints: what Keras' validation loss is computed on
            (the captions of the first val images), recorded with every period.
    """

    def __init__(self, out_dir, train_config, history, is_chief, *, strategy, scorer, schedule, period_steps,
                 steps_per_epoch, stopping_state=None, val_loss_set=(None, None)):
        super().__init__()
        self.out_dir, self.train_config, self.history, self.is_chief = Path(out_dir), train_config, history, is_chief
        self.strategy, self.scorer, self.schedule = strategy, scorer, schedule
        self.period_steps, self.steps_per_epoch = period_steps, steps_per_epoch
        self.select_on_cider = train_config.select_on == "cider"
        self.stopper = validation.EarlyStopper(train_config.patience_steps,
                                               mode="max" if self.select_on_cider else "min")
        self.lr_reductions, self.last_reduction_step = 0, None
        self.stopped_step = None
        if stopping_state is not None:
            self.stopper.load_state_dict(stopping_state["stopper"])
            self.lr_reductions = int(stopping_state["lr_reductions"])
            self.last_reduction_step = stopping_state["last_reduction_step"]
        schedule.scale.assign(train_config.reduce_lr_factor ** self.lr_reductions)
        self.marks = {}
        self.dropout_seeds = []
        self.val_loss_set = {"val_loss_images": val_loss_set[0], "val_loss_captions": val_loss_set[1]}

    def on_train_begin(self, logs=None):
        # The dropout layers' random state is not part of the weights BackupAndRestore
        # saves; keyed per period below, the masks of period p are the same whether or
        # not the run was resumed before it.
        self.dropout_seeds = [
            (variable, int(keras.ops.convert_to_numpy(variable)[0]))
            for variable in self.model.variables if variable.path.endswith("seed_generator_state")
        ]

    def on_epoch_begin(self, epoch, logs=None):
        self.marks = {"begin": time.monotonic()}
        for variable, first in self.dropout_seeds:
            # The second word counts draws within the period (far fewer than 2**32).
            variable.assign(np.asarray([first, epoch << 32], dtype=variable.dtype))

    def on_test_begin(self, logs=None):
        self.marks["test_begin"] = time.monotonic()

    def on_test_end(self, logs=None):
        self.marks["test_end"] = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        train_config = self.train_config
        step = (epoch + 1) * self.period_steps
        learning_rate = float(keras.ops.convert_to_numpy(self.schedule(step - 1)))
        scores = validation.chief_scores(self.strategy, self.scorer(self.model))
        if logs is not None:  # the same dict reaches TensorBoard and the console line
            logs.update({name: value for name, value in scores.items() if name != "val_seconds"})
            logs["learning_rate"] = learning_rate
            logs.update({name: value for name, value in self.val_loss_set.items() if value is not None})
        keras_logs = {name: float(value) for name, value in (logs or {}).items() if name not in self.val_loss_set}
        score = scores["val_cider"] if self.select_on_cider else keras_logs.get("val_loss", math.nan)
        improved, should_stop = self.stopper.update(step, score)
        lr_reduced = self._maybe_reduce_learning_rate(step, improved)
        now = time.monotonic()
        begin = self.marks.get("begin", now)
        entry = {"period": epoch + 1, "step": step, "epoch": round(step / self.steps_per_epoch, 3)}
        entry.update(keras_logs)
        entry.update(self.val_loss_set)
        # Per period: a run resumed on another machine shows where each part was computed.
        entry.update({"device": train_config.device, "precision": train_config.precision})
        entry.update({
            "learning_rate": learning_rate, "best": improved, "lr_reduced": lr_reduced,
            "seconds": round(now - begin, 3),
            "train_seconds": round(self.marks.get("test_begin", now) - begin, 3),
            "val_loss_seconds": round(self.marks.get("test_end", now) - self.marks.get("test_begin", now), 3),
            "val_seconds": scores["val_seconds"],
        })
        if should_stop:
            self.model.stop_training = True
            self.stopped_step = step
            print(
                f"train: early stopping at step {step}: validation {train_config.select_on} has not improved "
                f"for {self.stopper.steps_since_best} steps (patience {train_config.patience_steps}); best "
                f"{self.stopper.best:.4f} at step {self.stopper.best_step}", file=sys.stderr,
            )
        if not self.is_chief:
            # Every worker has the same logs (Keras reduces them across workers) and
            # scores; the chief alone writes them.
            self.history.append(entry)
            return
        write_stopping_state(self.out_dir / run_folder.CHECKPOINT_DIR, self.period_steps, epoch + 1, self.state())
        if improved:
            run_folder.save_decoder(self.model, self.out_dir)
        self.history.append(entry)
        run_folder.write_training_history(self.out_dir, self.history)

    def _maybe_reduce_learning_rate(self, step, improved):
        """Reduce-on-plateau counted in steps: a cut once `reduce_lr_patience_steps` passed
        since both the best and the last cut."""
        train_config = self.train_config
        if train_config.lr_schedule != "plateau" or improved or self.stopper.best_step is None:
            return False
        since = step - max(self.stopper.best_step, self.last_reduction_step or 0)
        if since < train_config.reduce_lr_patience_steps:
            return False
        self.lr_reductions += 1
        self.last_reduction_step = step
        self.schedule.scale.assign(train_config.reduce_lr_factor ** self.lr_reductions)
        print(f"train: step {step}: learning rate cut to "
              f"{train_config.learning_rate * float(self.schedule.scale.numpy()):.3g} "
              f"({since} steps without a better validation {train_config.select_on})", file=sys.stderr)
        return True

    def state(self):
        """The stopping state after the last period (JSON-able dict, as `read_stopping_state` returns)."""
        return {"stopper": self.stopper.state_dict(), "lr_reductions": self.lr_reductions,
                "last_reduction_step": self.last_reduction_step, "stopped": self.stopped_step is not None}


def make_callbacks(period_validation, out_dir, write_dir):
    """The callbacks of `run_train`, in order: `period_validation`, BackupAndRestore, TensorBoard.

    The first runs before the checkpoint is written, so the checkpoint of a period always
    finds that period's stopping state on disk. Checkpoints and TensorBoard logs go to
    `write_dir` (OUT on the chief, a worker's scratch folder elsewhere).
    """
    write_dir = Path(write_dir)
    callbacks = [
        period_validation,
        keras.callbacks.BackupAndRestore(
            str(write_dir / run_folder.CHECKPOINT_DIR), save_freq="epoch", double_checkpoint=True,
            # Kept after a finished run: `--resume --epochs N` may extend it later.
            delete_checkpoint=False,
        ),
    ]
    if tensorboard_installed():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(write_dir / run_folder.LOG_DIR), update_freq="epoch",
                                                     write_graph=False))
    else:
        # tf.summary needs the tensorboard package; training is still worth running without it.
        print("train: the tensorboard package is not installed: no TensorBoard logs in "
              f"{Path(out_dir) / run_folder.LOG_DIR} (pip install tensorboard)", file=sys.stderr)
    return callbacks
