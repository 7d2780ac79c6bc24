"""Stage 2 training: the LSTM decoder on cached image vectors and tokenized captions.

Reads `OUT/config.json`, `OUT/captions.json`, `OUT/vocab.json` and `OUT/features.h5`
(all written by `extract`), trains with `model.fit()` until validation stops improving,
and writes:

    OUT/decoder.keras      the best model so far on validation CIDEr-D (or val loss,
                           `train.select_on`), atomic: temp name + rename
    OUT/checkpoints/       the last period's weights, optimizer state and period number
                           (`keras.callbacks.BackupAndRestore`) and the stopping state
                           (`stopping.json`), for `--resume`
    OUT/history.json       one entry per validation period, rewritten atomically each period
    OUT/logs/              TensorBoard logs
    OUT/config.json        the settings, `decoder.vocab_size` filled in

Schedule, in optimizer steps so that it means the same on 2,400 captions as on 600k: a
validation period of `train.validate_every_steps` steps is one Keras epoch; after each,
the val images are captioned greedily in the graph and scored with corpus CIDEr-D
(`pipeline.training.validation`). The learning rate warms up linearly over `train.warmup_steps`,
then is halved after `train.reduce_lr_patience_steps` steps without a better score
(`models.schedules.WarmupSchedule`); training stops after `train.patience_steps` steps
without one, or at the cap of `train.epochs` passes over the training captions.

The captions and their batches are `pipeline.training.inputs`'s, the loss and schedule
`pipeline.training.objective`'s, the strategy `pipeline.training.distribution`'s, and
what happens after each period (validation, selection, the stopping state)
`pipeline.training.periods`'s; this module runs them in order.
"""

import dataclasses
import functools
import shutil
import sys
import time
from pathlib import Path

import keras

from pipeline.core import device, errors
from pipeline.data import run_folder
from pipeline.training import distribution, inputs, objective, periods, validation


def training_plan(num_captions, batch_size, epochs_cap, validate_every_steps):
    """How many optimizer steps run, in which periods: (steps_per_epoch, period_steps, num_periods).

    steps_per_epoch = ceil(num_captions / batch_size), one pass over the training captions;
    a period is `validate_every_steps` steps (fewer if the whole cap is shorter); the cap of
    `epochs_cap` passes is rounded up to whole periods.
    """
    steps_per_epoch = -(-num_captions // batch_size)
    cap_steps = epochs_cap * steps_per_epoch
    period_steps = min(validate_every_steps, cap_steps)
    return steps_per_epoch, period_steps, -(-cap_steps // period_steps)


def run_train(out_dir, overrides, resume=False, validation_scorer=None):
    """Trains the decoder of OUT from its feature cache until validation stops improving.

    Training runs in validation periods of `train.validate_every_steps` optimizer steps (a
    Keras epoch each). After each, the val images are captioned greedily and scored
    (`pipeline.training.validation.ValidationScorer`); decoder.keras is replaced whenever the score
    of `train.select_on` (val CIDEr-D, or val loss) is a new best, the learning rate is cut
    after `train.reduce_lr_patience_steps` steps without one (schedule "plateau"), and
    training stops after `train.patience_steps`, or at the cap of `train.epochs` passes.

    Args:
        out_dir: str or Path, the run folder `extract` wrote.
        overrides: {"section.field": value} applied to OUT/config.json (None values ignored).
        resume: continue from OUT/checkpoints/ (period count, weights, optimizer state and
            the stopping state); without it a fresh run replaces old checkpoints, history and logs.
        validation_scorer: callable(decoder_model) -> dict with "val_cider", "val_bleu_4",
            "val_seconds" (floats), or None for the val split's `ValidationScorer`.
    Returns:
        dict: periods_run, periods_total, initial_period, period_steps, steps, epochs (passes
        done, float), stopped_by ("early_stopping" or "cap"), select_on, best_step,
        best_period, best_score, best_val_cider, best_val_loss, seconds, captions_per_second
        (fit, validation included), validation_share (of fit time), train_captions,
        val_captions, val_images_scored, vocab_size, features_in_memory.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    saved_config = run_folder.read_config(out_dir, requires="`extract`")
    config = saved_config.replace(overrides)
    config.check("train", "text", "decoder")
    # Saved resolved ("auto" -> "bf16" here), as extraction saves its own: what was computed.
    config.train.precision = device.resolve_precision(config.train.precision, setting="train.precision (--precision)")

    # Before anything else touches TF: MultiWorkerMirroredStrategy must configure the
    # collective ops at startup, and TF_CONFIG problems should stop the run first.
    strategy = distribution.make_strategy(config.train.strategy)
    is_chief = distribution.is_chief_worker(strategy)
    config.train.device = device.announce("train", config.train.precision)
    train_config = config.train
    # The val images validation uses: the loss on the first validation_loss_images, CIDEr-D on
    # the first validation_images (0: all of them).
    val_uses = (train_config.validation_images, train_config.validation_loss_images)
    data = inputs.load_training_data(out_dir, config, val_images=max(val_uses) if all(val_uses) else None)
    config.decoder.vocab_size = len(data.vocabulary)
    batch_size = train_config.batch_size
    steps_per_epoch, period_steps, num_periods = training_plan(
        len(data.train), batch_size, train_config.epochs, train_config.validate_every_steps)

    checkpoint_dir = out_dir / run_folder.CHECKPOINT_DIR
    finished, stopping_state, history = _starting_point(out_dir, saved_config, config, resume, is_chief, period_steps)
    if is_chief:
        config.save(out_dir)

    scorer = validation_scorer or validation.build_validation_scorer(
        out_dir, config, max_images=train_config.validation_images or None,
        beam_size=train_config.validation_beam_size, data=data)
    # The validation loss: on the captions of the first val images, the same in every period.
    val_loss_split = data.val.first_images(train_config.validation_loss_images or None)
    keras.utils.set_random_seed(config.seed)
    lost_workers = functools.partial(distribution.lost_worker_errors, config.train.strategy, "train",
                                     functools.partial(_resume_point, checkpoint_dir))
    with lost_workers(), strategy.scope():
        schedule = objective.make_schedule(config, num_periods * period_steps)
        model = objective.build_model(config, config.decoder.vocab_size, data.feature_dim,
                                      steps_per_execution=objective.steps_per_execution_for(period_steps),
                                      learning_rate=schedule)
    # Endless, epoch e's order fixed by (seed, e), entered at the step the checkpoint
    # reached: a resumed run trains on the batches the uninterrupted run would have, and
    # so does every distribution strategy.
    initial_step = finished * period_steps
    train_dataset, val_dataset = distribution.distribute_datasets(
        strategy,
        lambda input_context: inputs.make_training_dataset(
            data.train, data.feature_rows, batch_size, shuffle_seed=config.seed,
            initial_epoch=initial_step // steps_per_epoch, skip_batches=initial_step % steps_per_epoch,
            input_context=input_context),
        # Sorted by length: the same val loss with almost no padding, half the time (measured).
        lambda input_context: inputs.make_caption_dataset(val_loss_split, data.feature_rows, batch_size,
                                                          sort_by_length=True, input_context=input_context),
    )
    print(
        f"train: {len(data.train)} train captions ({data.train.images} images), {data.val_split_images} val images "
        f"(validation loss on the {len(val_loss_split)} captions of the first {val_loss_split.images}, "
        f"{len(scorer) if hasattr(scorer, '__len__') else '?'} images captioned for CIDEr-D), "
        f"vocabulary {config.decoder.vocab_size}, "
        f"{model.count_params():,} parameters, {data.feature_rows.describe()}"
        + (f", {data.skipped_images} images skipped (extraction failed)" if data.skipped_images else "")
        + (f", {data.empty_captions} captions without words skipped" if data.empty_captions else ""),
        file=sys.stderr,
    )
    print(
        f"train: validation every {period_steps} steps ({period_steps / steps_per_epoch:.2f} epochs), "
        f"at most {num_periods} periods ({num_periods * period_steps} steps, cap {train_config.epochs} epochs); "
        f"best and early stopping on val {train_config.select_on}, patience {train_config.patience_steps} steps",
        file=sys.stderr,
    )
    if resume:
        print(f"train: resuming after period {finished} of {num_periods} (step {initial_step})", file=sys.stderr)

    # Only the chief writes OUT (which several workers may share); the others keep their
    # checkpoints and logs in a scratch folder of their own, removed when they end.
    write_dir = out_dir if is_chief else distribution.worker_scratch_dir(out_dir, strategy)
    if resume and not is_chief:
        # Every worker restores the chief's checkpoint: the same weights, optimizer state and epoch.
        shutil.copytree(checkpoint_dir, write_dir / run_folder.CHECKPOINT_DIR)
    period_validation = periods.PeriodValidation(
        out_dir, train_config, history, is_chief, strategy=strategy, scorer=scorer, schedule=schedule,
        period_steps=period_steps, steps_per_epoch=steps_per_epoch, stopping_state=stopping_state,
        val_loss_set=(val_loss_split.images, len(val_loss_split)),
    )
    callbacks = periods.make_callbacks(period_validation, out_dir, write_dir)
    stopper = period_validation.stopper
    already_stopped = bool(stopping_state and stopping_state.get("stopped")) and (
        stopper.steps_since_best >= stopper.patience_steps)
    fit_started = time.monotonic()
    try:
        if already_stopped:
            print(f"train: the checkpoint had stopped early at step {stopper.last_step}; nothing to resume "
                  "(raise --patience-steps to train on)", file=sys.stderr)
        else:
            with lost_workers():
                model.fit(
                    train_dataset, steps_per_epoch=period_steps, validation_data=val_dataset, epochs=num_periods,
                    callbacks=callbacks, verbose=2, shuffle=False,  # the dataset shuffles itself, seeded
                )
    except (OSError, RuntimeError) as error:
        # h5py reports a failed checkpoint write as OSError, a failed flush or close as
        # RuntimeError; any other RuntimeError is a bug and keeps its traceback.
        message = " ".join(str(error).split())
        if isinstance(error, RuntimeError) and not ("write" in message or "flush" in message or "close" in message):
            raise
        raise errors.ArtifactError(
            f"{out_dir}: cannot write the training checkpoints ({errors.write_failure_reason(error)}); "
            "`train --resume` continues from the last complete checkpoint"
        ) from None
    finally:
        if isinstance(data.feature_rows, inputs.StreamedFeatures):
            data.feature_rows.close()
        if not is_chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    fit_seconds = time.monotonic() - fit_started
    new_entries = [entry for entry in history if entry["period"] > finished]
    if is_chief:
        config.save(out_dir)

    best = next((entry for entry in history if entry.get("step") == stopper.best_step), None)
    steps_done = history[-1]["step"] if history else initial_step
    validation_seconds = sum(entry["val_loss_seconds"] + entry["val_seconds"] for entry in new_entries)
    captions_seen = len(new_entries) * period_steps * batch_size
    stopped_early = already_stopped or period_validation.stopped_step is not None
    summary = {
        "periods_run": len(new_entries),
        "periods_total": history[-1]["period"] if history else finished,
        "initial_period": finished,
        "period_steps": period_steps,
        "steps": steps_done,
        "epochs": round(steps_done / steps_per_epoch, 3),
        "stopped_by": "early_stopping" if stopped_early else "cap",
        "select_on": train_config.select_on,
        "best_step": stopper.best_step,
        "best_period": best["period"] if best else None,
        "best_score": stopper.best,
        "best_val_cider": best.get("val_cider") if best else None,
        "best_val_loss": best.get("val_loss") if best else None,
        "seconds": round(time.monotonic() - started, 3),
        "captions_per_second": round(captions_seen / fit_seconds, 1) if new_entries and fit_seconds > 0 else 0.0,
        "validation_share": round(validation_seconds / fit_seconds, 4) if new_entries and fit_seconds > 0 else 0.0,
        "train_captions": len(data.train),
        "val_captions": len(data.val),
        "val_images_scored": len(scorer) if hasattr(scorer, "__len__") else None,
        "vocab_size": config.decoder.vocab_size,
        "features_in_memory": data.in_memory,
    }
    best_text = (f"{summary['best_score']:.4f} at step {summary['best_step']} (period {summary['best_period']})"
                 if best else "none")
    print(
        f"train: {summary['periods_run']} periods run, now step {steps_done} ({summary['epochs']:.1f} epochs), "
        f"stopped by {summary['stopped_by'].replace('_', ' ')}; best val {train_config.select_on} {best_text}, "
        f"{summary['seconds']:.1f} s, {summary['captions_per_second']:.0f} captions/s, validation "
        f"{100 * summary['validation_share']:.1f}% of the fit {distribution.decoder_destination(out_dir, is_chief)}",
        file=sys.stderr,
    )
    return summary


def _starting_point(out_dir, saved_config, config, resume, is_chief, period_steps):
    """Where this run starts: (periods finished, the stopping state to resume or None, the
    history entries kept). A fresh run on the chief removes the old checkpoints, logs and history.

    saved_config, config: OUT/config.json as it was, and with this run's overrides.
    """
    checkpoint_dir = out_dir / run_folder.CHECKPOINT_DIR
    if not resume:
        if is_chief:
            for stale in (checkpoint_dir, out_dir / run_folder.LOG_DIR):
                if stale.exists():
                    shutil.rmtree(stale)
            (out_dir / run_folder.HISTORY_FILE).unlink(missing_ok=True)
        return 0, None, []
    finished = periods.checkpoint_epoch(checkpoint_dir)
    if finished is None:
        raise errors.ArtifactError(f"{checkpoint_dir}: no checkpoint to resume from; run `train` without --resume")
    # The chief's config.json describes the checkpoint; another worker's OUT may hold
    # only the cache's (it never writes OUT).
    if is_chief and dataclasses.asdict(saved_config.decoder) != dataclasses.asdict(config.decoder):
        raise errors.PipelineError(
            f"--resume cannot change the decoder's shape (checkpoint: {dataclasses.asdict(saved_config.decoder)}, "
            f"asked: {dataclasses.asdict(config.decoder)}); train without --resume instead"
        )
    if is_chief and saved_config.train.precision != config.train.precision:
        # The optimizer's state differs under fp16 (loss scaling), and the steps' arithmetic.
        raise errors.PipelineError(
            f"--resume cannot change train.precision (checkpoint: {saved_config.train.precision}, asked: "
            f"{config.train.precision}); resume with --precision {saved_config.train.precision}, or train without --resume"
        )
    stopping_state = periods.read_stopping_state(checkpoint_dir, finished, period_steps)
    history = [entry for entry in run_folder.read_training_history(out_dir) if entry.get("period", 0) <= finished]
    return finished, stopping_state, history


def _resume_point(checkpoint_dir):
    """Where `train --resume` continues from ("after epoch N"), None without a checkpoint."""
    finished = periods.checkpoint_epoch(checkpoint_dir)
    return f"after epoch {finished}" if finished else None
