"""Self-critical fine-tuning of the decoder on CIDEr-D (`finetune`, Rennie et al. 2017).

Starts from the cross-entropy decoder `OUT/decoder.keras`, which it keeps as
`OUT/decoder_xe.keras`, and each step:

1. takes `finetune.batch_size` training images (epoch e's order a pure function of
   (seed, e)) and draws `finetune.samples` captions per image from the decoder
   (`models.sampling.sample_captions`, stateless seed (seed, step));
2. rewards each caption by its CIDEr-D against the image's training references, `<end>`
   counted, document frequencies from the training split (`pipeline.training.cider_reward`);
3. subtracts a baseline ("mean": the image's other samples' mean reward; "greedy": the
   reward of the image's greedy caption) and descends the self-critical loss
   (`models.sampling.self_critical_loss`) with Adam, under the distribution strategy.

The step itself (sample, reward, baseline, update) is `pipeline.training.scst.Stepper`.
Each epoch ends with validation CIDEr-D (`pipeline.training.validation`, shared with `train`);
the first one also scores the starting decoder as step 0's candidate (its weights put back
for it), so the steps begin as soon as the data is read. The best decoder on it is written
to `OUT/decoder.keras`, and a run stops after `finetune.early_stopping_patience` epochs
without improvement. Written:

    OUT/decoder_xe.keras          the cross-entropy decoder fine-tuning started from
    OUT/decoder.keras             the best fine-tuned decoder on validation CIDEr-D (atomic)
    OUT/finetune_history.json     per-epoch reward, loss, validation CIDEr-D (atomic)
    OUT/finetune_checkpoints/     weights, optimizer and step (tf.train.Checkpoint) plus the
                                  loop's JSON state, every `checkpoint_steps` steps and at
                                  each epoch end, for `--resume`; reward_state.npz, the
                                  reward's document frequencies with a fingerprint of the
                                  training captions they came from (`--resume` reads them)
    OUT/logs/finetune/            TensorBoard scalars

Determinism: sampling is stateless and keyed by the step, batches by the epoch, and the
gradient pass runs without dropout, so a run killed mid-epoch and resumed from its last
checkpoint takes the same steps as an uninterrupted one (tested with SIGKILL).
"""

import contextlib
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import keras
import tensorflow as tf

from models import decoder, encoder
from pipeline.core import device, errors, io_utils, progress
from pipeline.data import run_folder
from pipeline.training import distribution, inputs, objective, periods, scst, validation

STATE_FORMAT = "captioner.finetune_state"
# Settings a resumed run must share with its checkpoint: they decide which steps it takes.
RESUME_FIXED = ("samples", "baseline", "batch_size", "learning_rate", "clipnorm", "precision")
# Loop states kept beside the checkpoints (a state is written just before its checkpoint).
KEPT_CHECKPOINTS = 2
# The reward's document frequencies (`CiderD.state()`), in the checkpoint folder.
REWARD_STATE_FILE = run_folder.REWARD_STATE_FILE


def _save_decoder(model, out_dir):
    """Writes OUT/decoder.keras atomically; returns its SHA-256."""
    return run_folder.file_sha256(run_folder.save_decoder(model, out_dir))


def _source_decoder(out_dir, resume, write=True):
    """The XE decoder to start from, copying OUT/decoder.keras to decoder_xe.keras when it is new.

    write=False (a non-chief worker, which never writes OUT): the same choice, without the
    copy; on --resume any decoder of OUT will do, as the chief's checkpoint replaces its weights.
    """
    out_dir = Path(out_dir)
    xe_path = out_dir / run_folder.XE_DECODER_FILE
    if resume:
        if xe_path.is_file():
            return xe_path
        if not write and (out_dir / run_folder.DECODER_FILE).is_file():
            return out_dir / run_folder.DECODER_FILE
        raise errors.ArtifactError(f"{out_dir / run_folder.FINETUNE_CHECKPOINT_DIR}: no checkpoint to resume from "
                                   f"({xe_path.name} is missing); run `finetune` without --resume")
    decoder_path = run_folder.trained_decoder_path(out_dir)
    history = run_folder.read_finetune_history(out_dir)
    ours = history is not None and history.get("decoder_sha256") and xe_path.is_file() and (
        run_folder.file_sha256(decoder_path) == history["decoder_sha256"])
    if not ours:
        # decoder.keras is a cross-entropy decoder (first fine-tuning, or `train` ran again).
        if not write:
            return decoder_path
        with io_utils.atomic_path(xe_path) as temporary:
            shutil.copyfile(decoder_path, temporary)
    return xe_path


def run_finetune(out_dir, overrides, resume=False):
    """Fine-tunes OUT/decoder.keras on CIDEr-D (see the module docstring).

    Args:
        out_dir: str or Path, a run folder after `train`.
        overrides: {"finetune.field": value} (None values ignored).
        resume: continue from OUT/finetune_checkpoints/ (weights, optimizer, step, history).
    Returns:
        dict: steps, epochs_run, best_epoch, best_val_cider, initial_val_cider, mean_reward
        (last epoch), captions_per_second, reward_captions_per_second, stopped_early, seconds.

    Under `finetune.strategy` "multiworker" every worker runs this on its own OUT (or a
    shared one): each draws the samples of the whole global batch (the same on all, from the
    same weights and seed) and takes its share of the gradient pass; validation goes by the
    chief's scores (`validation.chief_scores`), so all stop together. Only the chief writes
    OUT; another worker checkpoints into OUT/.worker-TYPE-INDEX.tmp/, removed when it ends,
    and on --resume first copies the chief's checkpoints from its OUT/finetune_checkpoints/.
    """
    with contextlib.ExitStack() as cleanup:
        return _run_finetune(Path(out_dir), overrides, resume, cleanup)


def _run_finetune(out_dir, overrides, resume, cleanup):
    started = time.monotonic()
    config = run_folder.read_config(out_dir, requires="`extract` and `train`").replace(overrides)
    config.check("finetune")
    settings = config.finetune
    # Saved resolved, as train saves its own (finetune_history.json's settings too).
    settings.precision = device.resolve_precision(settings.precision, setting="finetune.precision (--precision)")
    strategy = distribution.make_strategy(settings.strategy)
    is_chief = distribution.is_chief_worker(strategy)
    settings.device = device.announce("finetune", settings.precision)
    source = _source_decoder(out_dir, resume, write=is_chief)
    data = inputs.load_training_data(out_dir, config, val_images=settings.validation_images or None)
    vocab_size = len(data.vocabulary)
    images = scst.reward_data(data.train, vocab_size)
    scorer = validation.build_validation_scorer(
        out_dir, config, split="val", max_images=settings.validation_images or None, data=data,
    )
    # What the steps read from here on: the other captions need not stay in memory.
    feature_rows = data.feature_rows
    cleanup.callback(feature_rows.close)
    del data
    max_length = config.decode.max_length
    steps_per_epoch = -(-len(images.rows) // settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs

    checkpoint_dir = out_dir / run_folder.FINETUNE_CHECKPOINT_DIR
    log_dir = out_dir / run_folder.FINETUNE_LOG_DIR
    if not resume and is_chief:
        for stale in (checkpoint_dir, log_dir):
            if stale.exists():
                shutil.rmtree(stale)
        (out_dir / run_folder.FINETUNE_HISTORY_FILE).unlink(missing_ok=True)
    if not is_chief:
        # Every worker saves its checkpoints (a save may need collectives), the others into
        # a scratch folder of their own: only the chief writes OUT.
        scratch = distribution.worker_scratch_dir(out_dir, strategy)
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        if resume:
            if not checkpoint_dir.is_dir():
                raise errors.ArtifactError(
                    f"{checkpoint_dir}: no checkpoint to resume from; every worker resumes from the chief's "
                    f"{run_folder.FINETUNE_CHECKPOINT_DIR}/ (copy it here, or share OUT between the workers)")
            shutil.copytree(checkpoint_dir, scratch / run_folder.FINETUNE_CHECKPOINT_DIR)
        checkpoint_dir = scratch / run_folder.FINETUNE_CHECKPOINT_DIR
    if resume and tf.train.latest_checkpoint(str(checkpoint_dir)) is None:
        raise errors.ArtifactError(f"{checkpoint_dir}: no checkpoint to resume from; run `finetune` without --resume")
    # Counted once per run: a resumed run reads them back, checked against the captions.
    reward = scst.reward_scorer(images.references, vocab_size, checkpoint_dir / REWARD_STATE_FILE)
    cleanup.enter_context(distribution.lost_worker_errors(settings.strategy, "finetune",
                                                          lambda: _resume_point(checkpoint_dir)))

    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = run_folder.load_decoder(out_dir, source.name, vocabulary_size=vocab_size)
        # Saved decoders are float32 (run_folder.save_decoder); the steps compute in finetune.precision.
        model = decoder.with_dtype_policy(model, encoder.PRECISION_POLICIES[settings.precision])
        optimizer = objective.make_optimizer(settings.precision, settings.learning_rate, settings.clipnorm)
        optimizer.build(model.trainable_variables)
    # The decoder fine-tuning starts from (`source`): validated at the first validation, with
    # these weights put back in the model for it (a copy of the decoder's size).
    starting_weights = model.get_weights()
    step_variable = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_variable)
    manager = tf.train.CheckpointManager(checkpoint, str(checkpoint_dir), max_to_keep=KEPT_CHECKPOINTS)
    stopper = validation.EarlyStopper(patience_steps=settings.early_stopping_patience * steps_per_epoch, mode="max")
    state = {"step": 0, "epochs": [], "partial": _empty_partial(), "decoder_sha256": None,
             "initial_val_cider": None, "stopped_early": False, "settings": dataclasses.asdict(settings)}
    if resume:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        state = _read_state(checkpoint_dir, int(step_variable.numpy()))
        changed = [name for name in RESUME_FIXED if state["settings"].get(name) != getattr(settings, name)]
        if changed:
            raise errors.PipelineError(
                f"--resume cannot change finetune.{', finetune.'.join(changed)} (checkpoint: "
                f"{', '.join(str(state['settings'].get(name)) for name in changed)}); run `finetune` without --resume"
            )
        stopper.load_state_dict(state["stopper"])
        if state["initial_val_cider"] is not None:
            starting_weights = None
        print(f"finetune: resuming at step {state['step']} of {total_steps}", file=sys.stderr)
    if is_chief:
        config.save(out_dir)

    stepper = scst.Stepper(model, optimizer, strategy, settings, max_length, reward)
    writer = _summary_writer(log_dir) if is_chief else tf.summary.create_noop_writer()
    print(
        f"finetune: {len(images.rows)} train images ({images.references.num_captions} references), "
        f"{steps_per_epoch} steps of {settings.batch_size} images x {settings.samples} samples per epoch, "
        f"baseline {settings.baseline}, Adam lr {settings.learning_rate:g}, validation on {len(scorer.image_features)} "
        f"images, strategy {settings.strategy} ({strategy.num_replicas_in_sync} replica(s)), from {source.name}, "
        f"{feature_rows.describe()}",
        file=sys.stderr,
    )

    def save_checkpoint():
        state["stopper"] = stopper.state_dict()
        step_variable.assign(state["step"])
        io_utils.write_json(checkpoint_dir / f"state-{state['step']}.json", {"format": STATE_FORMAT, **state})
        manager.save(checkpoint_number=state["step"])
        kept = {int(Path(path).name.split("-")[-1]) for path in manager.checkpoints}
        for old in checkpoint_dir.glob("state-*.json"):
            if int(old.stem.split("-")[-1]) not in kept:
                old.unlink(missing_ok=True)

    def write_history():
        if not is_chief:
            return
        run_folder.write_finetune_history(out_dir, {
            "source": run_folder.XE_DECODER_FILE,
            # Step 0 until a validation picks a step: decoder.keras holds the starting decoder.
            "decoder_sha256": state["decoder_sha256"], "best_step": stopper.best_step or 0,
            "best_val_cider": stopper.best, "initial_val_cider": state["initial_val_cider"],
            "settings": dataclasses.asdict(settings), "epochs": state["epochs"],
        })

    def validate(step):
        """Scores the model's weights as step `step`'s candidate; the best is written to decoder.keras."""
        scores = validation.chief_scores(strategy, scorer(model))
        improved, should_stop = stopper.update(step, scores["val_cider"])
        if improved and is_chief:
            state["decoder_sha256"] = _save_decoder(model, out_dir)
        return scores, improved, should_stop

    def validate_starting_decoder():
        """Scores the decoder fine-tuning started from as step 0's candidate: fine-tuning must beat
        it on validation CIDEr-D to replace it. Run at the first validation rather than before
        the first step, so the steps start as soon as the data is read; the weights trained
        so far are put back after. Returns its seconds."""
        started_validation = time.monotonic()
        trained = model.get_weights()
        model.set_weights(starting_weights)
        scores, _, _ = validate(0)
        model.set_weights(trained)
        state["initial_val_cider"] = scores["val_cider"]
        seconds = time.monotonic() - started_validation
        print(f"finetune: starting validation CIDEr-D {scores['val_cider']:.4f} (the decoder of step 0, "
              f"{seconds:.1f} s)", file=sys.stderr)
        return seconds

    if not resume:
        # decoder.keras is the starting decoder until a fine-tuned one beats it (a second
        # fine-tuning puts the cross-entropy decoder back first), and a checkpoint of step 0
        # lets --resume continue a run stopped in its first steps.
        if is_chief:
            state["decoder_sha256"] = _save_decoder(model, out_dir)
        write_history()
        save_checkpoint()

    loop_started = time.monotonic()
    captions_done, reward_seconds = 0, 0.0
    while state["step"] < total_steps and not state["stopped_early"]:
        epoch, position = divmod(state["step"], steps_per_epoch)
        order = scst.epoch_image_order(len(images.rows), config.seed, epoch)
        partial = state["partial"]
        epoch_captions = len(images.rows) * settings.samples
        reporter = progress.Progress(epoch_captions, label=f"finetune epoch {epoch + 1}/{settings.epochs}",
                                     unit="captions")
        reporter.done = partial["captions"]
        epoch_started = time.monotonic()
        with reporter:
            for batch_index in range(position, steps_per_epoch):
                members = order[batch_index * settings.batch_size:(batch_index + 1) * settings.batch_size]
                image_features = tf.constant(feature_rows.read(images.rows[members]))
                outcome = stepper.train_step(image_features, members, (config.seed, state["step"]))
                rewards, loss, mask = outcome["rewards"], outcome["loss"], outcome["mask"]
                reward_seconds += outcome["reward_seconds"]
                state["step"] += 1
                partial["steps"] += 1
                partial["captions"] += len(rewards)
                partial["reward_sum"] += float(rewards.sum())
                partial["loss_sum"] += loss
                partial["tokens"] += float(mask.sum())
                captions_done += len(rewards)
                with writer.as_default(step=state["step"]):
                    tf.summary.scalar("finetune/mean_reward", float(rewards.mean()))
                    tf.summary.scalar("finetune/loss", loss)
                reporter.suffix = f"mean reward {partial['reward_sum'] / partial['captions']:.3f}"
                reporter.update(len(rewards))
                if state["step"] % settings.checkpoint_steps == 0 and batch_index + 1 < steps_per_epoch:
                    save_checkpoint()
        starting_seconds = validate_starting_decoder() if state["initial_val_cider"] is None else 0.0
        scores, improved, should_stop = validate(state["step"])
        entry = {
            "epoch": epoch + 1,
            "step": state["step"],
            "mean_reward": partial["reward_sum"] / partial["captions"],
            "loss": partial["loss_sum"] / partial["steps"],
            "mean_sample_length": partial["tokens"] / partial["captions"] - 1,
            "val_cider": scores["val_cider"],
            "val_bleu_4": scores["val_bleu_4"],
            "best": bool(improved),
            "seconds": round(time.monotonic() - epoch_started - starting_seconds, 3),
        }
        state["epochs"].append(entry)
        state["partial"] = _empty_partial()
        state["stopped_early"] = bool(should_stop)
        with writer.as_default(step=state["step"]):
            tf.summary.scalar("finetune/val_cider", scores["val_cider"])
            tf.summary.scalar("finetune/val_bleu_4", scores["val_bleu_4"])
        writer.flush()
        print(
            f"finetune: epoch {epoch + 1}: mean reward {entry['mean_reward']:.4f}, loss {entry['loss']:.4f}, "
            f"val CIDEr-D {scores['val_cider']:.4f}{' (best)' if improved else ''}, {entry['seconds']:.1f} s",
            file=sys.stderr,
        )
        write_history()
        save_checkpoint()
        if should_stop:
            print(f"finetune: early stopping after epoch {epoch + 1}: validation CIDEr-D has not improved for "
                  f"{stopper.steps_since_best // steps_per_epoch} epochs "
                  f"(patience {settings.early_stopping_patience}); "
                  f"best {stopper.best:.4f} at step {stopper.best_step}", file=sys.stderr)
    writer.close()
    loop_seconds = time.monotonic() - loop_started

    best_epoch = next((entry["epoch"] for entry in state["epochs"] if entry["step"] == stopper.best_step), 0)
    summary = {
        "steps": state["step"],
        "epochs_run": len(state["epochs"]),
        "best_epoch": best_epoch,
        "best_val_cider": stopper.best,
        "initial_val_cider": state["initial_val_cider"],
        "mean_reward": state["epochs"][-1]["mean_reward"] if state["epochs"] else None,
        "captions_per_second": round(captions_done / loop_seconds, 1) if captions_done and loop_seconds > 0 else 0.0,
        "reward_captions_per_second": round(captions_done / reward_seconds, 1) if reward_seconds > 0 else 0.0,
        "stopped_early": state["stopped_early"],
        "seconds": round(time.monotonic() - started, 3),
    }
    print(
        f"finetune: {summary['epochs_run']} epochs, validation CIDEr-D {summary['initial_val_cider']:.4f} -> "
        f"{summary['best_val_cider']:.4f} (epoch {best_epoch}), {summary['captions_per_second']:.0f} captions/s, "
        f"reward {summary['reward_captions_per_second']:.0f} captions/s, {summary['seconds']:.1f} s "
        f"{distribution.decoder_destination(out_dir, is_chief)}",
        file=sys.stderr,
    )
    return summary


def _empty_partial():
    """Running sums of the epoch in progress (kept in the checkpoint state so a resume continues them)."""
    return {"steps": 0, "captions": 0, "reward_sum": 0.0, "loss_sum": 0.0, "tokens": 0.0}


def _resume_point(checkpoint_dir):
    """Where `finetune --resume` continues from ("from step N"), None without a checkpoint."""
    latest = tf.train.latest_checkpoint(str(checkpoint_dir)) if Path(checkpoint_dir).is_dir() else None
    return f"from step {latest.rsplit('-', 1)[-1]}" if latest else None


def _read_state(checkpoint_dir, step):
    """The loop state saved beside checkpoint `step` (dict, as `save_checkpoint` wrote it)."""
    path = Path(checkpoint_dir) / f"state-{step}.json"
    if not path.is_file():
        raise errors.ArtifactError(f"{path}: the loop state of checkpoint {step} is missing; "
                                   "run `finetune` without --resume")
    state = io_utils.read_json(path, "the fine-tuning state")
    if not isinstance(state, dict) or state.pop("format", None) != STATE_FORMAT or state.get("step") != step:
        raise errors.ArtifactError(f"{path}: not the fine-tuning state of step {step}; run `finetune` without --resume")
    return state


def _summary_writer(log_dir):
    """A tf.summary writer into `log_dir`, or one that writes nothing without the tensorboard package."""
    if not periods.tensorboard_installed():
        print(f"finetune: the tensorboard package is not installed: no TensorBoard logs in {log_dir}", file=sys.stderr)
        return tf.summary.create_noop_writer()
    return tf.summary.create_file_writer(str(log_dir))
