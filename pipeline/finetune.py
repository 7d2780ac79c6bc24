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

Each epoch ends with validation CIDEr-D (`pipeline.training.validation`, shared with `train`);
the best decoder on it is written to `OUT/decoder.keras`, and a run stops after
`finetune.early_stopping_patience` epochs without improvement. Written:

    OUT/decoder_xe.keras          the cross-entropy decoder fine-tuning started from
    OUT/decoder.keras             the best fine-tuned decoder on validation CIDEr-D (atomic)
    OUT/finetune_history.json     per-epoch reward, loss, validation CIDEr-D (atomic)
    OUT/finetune_checkpoints/     weights, optimizer and step (tf.train.Checkpoint) plus the
                                  loop's JSON state, every `checkpoint_steps` steps and at
                                  each epoch end, for `--resume`
    OUT/logs/finetune/            TensorBoard scalars

Determinism: sampling is stateless and keyed by the step, batches by the epoch, and the
gradient pass runs without dropout, so a run killed mid-epoch and resumed from its last
checkpoint takes the same steps as an uninterrupted one (tested with SIGKILL).
"""

import contextlib
import dataclasses
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.core import config as config_module
from pipeline import train
from pipeline.core import errors, io_utils, progress
from pipeline.data import text
from pipeline.training import validation
from pipeline.training.cider_reward import CiderD

XE_DECODER_FILE = "decoder_xe.keras"
HISTORY_FILE = "finetune_history.json"
HISTORY_FORMAT = "captioner.finetune_history"
CHECKPOINT_DIR = "finetune_checkpoints"
LOG_DIR = os.path.join("logs", "finetune")
STATE_FORMAT = "captioner.finetune_state"
BASELINES = ("mean", "greedy")
FINETUNE_STRATEGIES = train.STRATEGIES
# Settings a resumed run must share with its checkpoint: they decide which steps it takes.
RESUME_FIXED = ("samples", "baseline", "batch_size", "learning_rate", "clipnorm")
# Loop states kept beside the checkpoints (a state is written just before its checkpoint).
KEPT_CHECKPOINTS = 2


def file_sha256(path):
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_history(out_dir):
    """OUT/finetune_history.json as a dict, or None when absent."""
    path = Path(out_dir) / HISTORY_FILE
    if not path.exists():
        return None
    data = io_utils.read_json(path, "the fine-tuning history")
    if not isinstance(data, dict) or data.get("format") != HISTORY_FORMAT or not isinstance(data.get("epochs"), list):
        raise errors.ArtifactError(f"{path}: not a fine-tuning history (expected format {HISTORY_FORMAT!r})")
    return data


def decoder_objective(out_dir):
    """"scst" when OUT/decoder.keras is the fine-tuned decoder `finetune` chose, else "xe".

    A later `train` replaces decoder.keras; the recorded digest then no longer matches.
    A fine-tuning whose best validation score was its starting point leaves the XE decoder.
    """
    out_dir = Path(out_dir)
    history = read_history(out_dir)
    decoder_path = out_dir / train.DECODER_FILE
    if not history or not history.get("decoder_sha256") or not decoder_path.is_file():
        return "xe"
    if history.get("best_step", 0) == 0 or file_sha256(decoder_path) != history["decoder_sha256"]:
        return "xe"
    return "scst"


def _check_settings(finetune):
    checks = [
        (finetune.epochs >= 1, "finetune.epochs (--epochs) must be at least 1", finetune.epochs),
        (finetune.learning_rate > 0, "finetune.learning_rate (--learning-rate) must be positive", finetune.learning_rate),
        (finetune.baseline in BASELINES, f"finetune.baseline (--baseline) must be one of {', '.join(BASELINES)}",
         finetune.baseline),
        (finetune.samples >= (2 if finetune.baseline == "mean" else 1),
         "finetune.samples (--samples) must be at least 2 with the mean baseline (1 with greedy)", finetune.samples),
        (finetune.batch_size >= 1, "finetune.batch_size (--batch-size) must be at least 1", finetune.batch_size),
        (finetune.clipnorm > 0, "finetune.clipnorm must be positive", finetune.clipnorm),
        (finetune.early_stopping_patience >= 1, "finetune.early_stopping_patience must be at least 1",
         finetune.early_stopping_patience),
        (finetune.checkpoint_steps >= 1, "finetune.checkpoint_steps must be at least 1", finetune.checkpoint_steps),
        (finetune.validation_images >= 0, "finetune.validation_images must be >= 0", finetune.validation_images),
        (finetune.strategy in FINETUNE_STRATEGIES,
         f"finetune.strategy (--strategy) must be one of {', '.join(FINETUNE_STRATEGIES)}", finetune.strategy),
    ]
    for valid, message, value in checks:
        if not valid:
            raise errors.PipelineError(f"{message}, got {value!r}")


@dataclasses.dataclass
class RewardData:
    """The training images fine-tuning samples from.

    rows: np.ndarray int32 [I], each image's feature-cache row.
    references: list over the I images of lists of np.ndarray int32 [n + 1] (words, `<end>`).
    """

    rows: np.ndarray
    references: list


def reward_data(split):
    """Groups a training CaptionSplit (`<start> w.. <end>` per caption) into images and references."""
    by_row = {}
    for row, tokens in zip(split.rows, split.token_ids):
        by_row.setdefault(int(row), []).append(np.asarray(tokens[1:], dtype=np.int32))
    rows = sorted(by_row)
    return RewardData(np.asarray(rows, dtype=np.int32), [by_row[row] for row in rows])


def epoch_image_order(num_images, seed, epoch):
    """int64 [num_images], the images of epoch `epoch` in order: a pure function of (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_images)


def _save_decoder(model, out_dir):
    """Writes OUT/decoder.keras atomically; returns its SHA-256."""
    path = Path(out_dir) / train.DECODER_FILE
    train.save_model_atomically(model, path)
    return file_sha256(path)


def _source_decoder(out_dir, resume, write=True):
    """The XE decoder to start from, copying OUT/decoder.keras to decoder_xe.keras when it is new.

    write=False (a non-chief worker, which never writes OUT): the same choice, without the
    copy; on --resume any decoder of OUT will do, as the chief's checkpoint replaces its weights.
    """
    out_dir = Path(out_dir)
    decoder_path, xe_path = out_dir / train.DECODER_FILE, out_dir / XE_DECODER_FILE
    if resume:
        if xe_path.is_file():
            return xe_path
        if not write and decoder_path.is_file():
            return decoder_path
        raise errors.ArtifactError(f"{out_dir / CHECKPOINT_DIR}: no checkpoint to resume from ({xe_path.name} "
                                   "is missing); run `finetune` without --resume")
    if not decoder_path.is_file():
        raise errors.ArtifactError(f"{decoder_path}: no trained decoder; run `train` first")
    history = read_history(out_dir)
    ours = history is not None and history.get("decoder_sha256") and xe_path.is_file() and (
        file_sha256(decoder_path) == history["decoder_sha256"])
    if not ours:
        # decoder.keras is a cross-entropy decoder (first fine-tuning, or `train` ran again).
        if not write:
            return decoder_path
        with io_utils.atomic_path(xe_path) as temporary:
            shutil.copyfile(decoder_path, temporary)
    return xe_path


class Stepper:
    """The TF side of one step: sampling, greedy captions and the distributed update."""

    def __init__(self, model, optimizer, strategy, settings, max_length, reward):
        import tensorflow as tf

        from models import beam_search, decoder, sampling

        self.model, self.optimizer, self.strategy = model, optimizer, strategy
        self.samples = settings.samples
        self.baseline = settings.baseline
        self.max_length = max_length
        self.reward = reward
        decoding = decoder.DecodingFunctions(model)
        banned = (text.PAD_ID, text.START_ID, text.UNK_ID)

        def draw(image_features, seed):
            return sampling.sample_captions(
                decoding.initial_state(image_features), decoding.step, tf.shape(image_features)[0],
                num_samples=self.samples, max_length=max_length, start_id=text.START_ID, end_id=text.END_ID,
                seed=seed, banned_ids=banned,
            )

        def greedy(image_features):
            token_ids, _, lengths = beam_search.greedy_search(
                decoding.initial_state(image_features), decoding.step, tf.shape(image_features)[0],
                max_length=max_length, start_id=text.START_ID, end_id=text.END_ID, banned_ids=banned,
            )
            return token_ids, lengths

        def replica_update(image_features, token_ids, mask, advantage, total_tokens):
            with tf.GradientTape() as tape:
                log_probs = sampling.sequence_log_probs(
                    model, image_features, token_ids, max_length=max_length, start_id=text.START_ID,
                    end_id=text.END_ID, banned_ids=banned,
                )
                loss = sampling.self_critical_loss(log_probs, mask, advantage, total_tokens=total_tokens)
            variables = model.trainable_variables
            gradients = tape.gradient(loss, variables)
            # Keras' optimizer sums the replicas' gradients; each replica's loss is already
            # divided by the global token count, so the sum is the one-device gradient.
            optimizer.apply_gradients(zip(gradients, variables))
            return loss

        def update(inputs):
            losses = strategy.run(replica_update, args=inputs)
            return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

        self.draw = tf.function(draw, reduce_retracing=True)
        self.greedy = tf.function(greedy, reduce_retracing=True)
        self._update = tf.function(update, reduce_retracing=True)

    def train_step(self, image_features, images, seed):
        """One self-critical step on a batch of images.

        Args:
            image_features: float32 [B, F] tensor; images: int [B], their indices in `reward`;
            seed: (int, int), the stateless seed of the draw (the run's seed and the step).
        Returns:
            dict: rewards float64 [B*K], loss float, mask float32 [B*K, max_length + 1],
            sample_seconds and reward_seconds (the time of the draw and of the samples'
            CIDEr-D, for their shares of a step).
        """
        import tensorflow as tf

        sample_started = time.monotonic()
        token_ids, _, mask = self.draw(image_features, tf.constant(seed, tf.int64))
        token_ids, mask = token_ids.numpy(), mask.numpy()
        sample_seconds = time.monotonic() - sample_started
        reward_started = time.monotonic()
        rewards = self.reward.scores(token_ids, mask.sum(axis=1).astype(np.int64), np.repeat(images, self.samples))
        reward_seconds = time.monotonic() - reward_started
        greedy_rewards = None
        if self.baseline == "greedy":
            greedy_ids, greedy_lengths = (value.numpy() for value in self.greedy(image_features))
            greedy_ids = np.pad(greedy_ids, ((0, 0), (0, 1)))
            greedy_ids[np.arange(len(greedy_ids)), greedy_lengths] = text.END_ID  # greedy_search drops <end>
            greedy_rewards = self.reward.scores(greedy_ids, greedy_lengths + 1, images)
        advantage = _advantages(rewards.reshape(len(images), self.samples), self.baseline, greedy_rewards)
        loss = self.update(np.repeat(image_features.numpy(), self.samples, axis=0), token_ids, mask,
                           advantage.reshape(-1).astype(np.float32))
        return {"rewards": rewards, "loss": loss, "mask": mask, "sample_seconds": sample_seconds,
                "reward_seconds": reward_seconds}

    def update(self, image_features, token_ids, mask, advantage):
        """One optimizer step on the samples (NumPy arrays, one row per sample); returns the loss."""
        total_tokens = np.float32(mask.sum())
        replicas = self.strategy.num_replicas_in_sync
        inputs = (image_features, token_ids, mask, advantage)
        if replicas > 1:
            # One part of each array per replica; the token count goes to all as it is.
            inputs = tuple(
                self.strategy.experimental_distribute_values_from_function(
                    lambda context, parts=np.array_split(array, replicas): parts[context.replica_id_in_sync_group])
                for array in inputs
            )
        inputs += (total_tokens,)
        return float(self._update(inputs))


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
    config = config_module.load_run_config(out_dir, overrides, "`extract` and `train`")
    settings = config.finetune
    _check_settings(settings)
    import keras
    import tensorflow as tf

    strategy = train.make_strategy(settings.strategy)
    is_chief = train.is_chief_worker(strategy)
    source = _source_decoder(out_dir, resume, write=is_chief)
    data = train.load_training_data(out_dir, config)
    images = reward_data(data.train)
    vocab_size = len(data.vocabulary)
    reward = CiderD(images.references, vocab_size)
    scorer = validation.build_validation_scorer(
        out_dir, config, split="val", max_images=settings.validation_images or None,
    )
    max_length = config.decode.max_length
    steps_per_epoch = -(-len(images.rows) // settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs

    checkpoint_dir = out_dir / CHECKPOINT_DIR
    log_dir = out_dir / LOG_DIR
    if not resume and is_chief:
        for stale in (checkpoint_dir, log_dir):
            if stale.exists():
                shutil.rmtree(stale)
        (out_dir / HISTORY_FILE).unlink(missing_ok=True)
    if not is_chief:
        # Every worker saves its checkpoints (a save may need collectives), the others into
        # a scratch folder of their own: only the chief writes OUT.
        scratch = train.worker_scratch_dir(out_dir, strategy)
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        if resume:
            if not checkpoint_dir.is_dir():
                raise errors.ArtifactError(
                    f"{checkpoint_dir}: no checkpoint to resume from; every worker resumes from the chief's "
                    f"{CHECKPOINT_DIR}/ (copy it here, or share OUT between the workers)")
            shutil.copytree(checkpoint_dir, scratch / CHECKPOINT_DIR)
        checkpoint_dir = scratch / CHECKPOINT_DIR
    cleanup.enter_context(train.lost_worker_errors(settings.strategy, "finetune",
                                                   lambda: _resume_point(checkpoint_dir)))

    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        try:
            model = keras.saving.load_model(source, compile=False)
        except (OSError, ValueError) as error:
            raise errors.ArtifactError(f"{source}: cannot load the decoder ({error}); run `train` again") from None
        optimizer = keras.optimizers.Adam(learning_rate=settings.learning_rate, clipnorm=settings.clipnorm)
        optimizer.build(model.trainable_variables)
    if model.get_layer("logits").units != vocab_size:
        raise errors.ArtifactError(f"{source}: the decoder predicts {model.get_layer('logits').units} words, "
                                   f"vocab.json has {vocab_size}; run `train` again after `extract`")
    step_variable = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_variable)
    manager = tf.train.CheckpointManager(checkpoint, str(checkpoint_dir), max_to_keep=KEPT_CHECKPOINTS)
    stopper = validation.EarlyStopper(patience_steps=settings.early_stopping_patience * steps_per_epoch, mode="max")
    state = {"step": 0, "epochs": [], "partial": _empty_partial(), "decoder_sha256": None,
             "initial_val_cider": None, "stopped_early": False, "settings": dataclasses.asdict(settings)}
    if resume:
        if manager.latest_checkpoint is None:
            raise errors.ArtifactError(f"{checkpoint_dir}: no checkpoint to resume from; run `finetune` without --resume")
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        state = _read_state(checkpoint_dir, int(step_variable.numpy()))
        changed = [name for name in RESUME_FIXED if state["settings"].get(name) != getattr(settings, name)]
        if changed:
            raise errors.PipelineError(
                f"--resume cannot change finetune.{', finetune.'.join(changed)} (checkpoint: "
                f"{', '.join(str(state['settings'].get(name)) for name in changed)}); run `finetune` without --resume"
            )
        stopper.load_state_dict(state["stopper"])
        print(f"finetune: resuming at step {state['step']} of {total_steps}", file=sys.stderr)
    if is_chief:
        config.save(out_dir)

    stepper = Stepper(model, optimizer, strategy, settings, max_length, reward)
    writer = _summary_writer(log_dir) if is_chief else tf.summary.create_noop_writer()
    print(
        f"finetune: {len(images.rows)} train images ({sum(len(r) for r in images.references)} references), "
        f"{steps_per_epoch} steps of {settings.batch_size} images x {settings.samples} samples per epoch, "
        f"baseline {settings.baseline}, Adam lr {settings.learning_rate:g}, validation on {len(scorer.image_features)} "
        f"images, strategy {settings.strategy} ({strategy.num_replicas_in_sync} replica(s)), from {source.name}",
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
        io_utils.write_json(out_dir / HISTORY_FILE, {
            "format": HISTORY_FORMAT, "version": 1, "source": XE_DECODER_FILE,
            "decoder_sha256": state["decoder_sha256"], "best_step": stopper.best_step,
            "best_val_cider": stopper.best, "initial_val_cider": state["initial_val_cider"],
            "settings": dataclasses.asdict(settings), "epochs": state["epochs"],
        })

    def validate():
        scores = validation.chief_scores(strategy, scorer(model))
        improved, should_stop = stopper.update(state["step"], scores["val_cider"])
        if improved and is_chief:
            state["decoder_sha256"] = _save_decoder(model, out_dir)
        return scores, improved, should_stop

    if state["step"] == 0 and state["initial_val_cider"] is None:
        # The starting point is a candidate too: fine-tuning must beat the XE decoder on
        # validation CIDEr-D to replace it.
        scores, _, _ = validate()
        state["initial_val_cider"] = scores["val_cider"]
        print(f"finetune: starting validation CIDEr-D {scores['val_cider']:.4f}", file=sys.stderr)
        write_history()
        save_checkpoint()

    loop_started = time.monotonic()
    captions_done, reward_seconds = 0, 0.0
    while state["step"] < total_steps and not state["stopped_early"]:
        epoch, position = divmod(state["step"], steps_per_epoch)
        order = epoch_image_order(len(images.rows), config.seed, epoch)
        partial = state["partial"]
        epoch_captions = len(images.rows) * settings.samples
        reporter = progress.Progress(epoch_captions, label=f"finetune epoch {epoch + 1}/{settings.epochs}",
                                     unit="captions")
        reporter.done = partial["captions"]
        epoch_started = time.monotonic()
        with reporter:
            for batch_index in range(position, steps_per_epoch):
                members = order[batch_index * settings.batch_size:(batch_index + 1) * settings.batch_size]
                rows = tf.constant(images.rows[members])
                image_features = data.feature_rows.gather(rows)
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
        scores, improved, should_stop = validate()
        entry = {
            "epoch": epoch + 1,
            "step": state["step"],
            "mean_reward": partial["reward_sum"] / partial["captions"],
            "loss": partial["loss_sum"] / partial["steps"],
            "mean_sample_length": partial["tokens"] / partial["captions"] - 1,
            "val_cider": scores["val_cider"],
            "val_bleu_4": scores["val_bleu_4"],
            "best": bool(improved),
            "seconds": round(time.monotonic() - epoch_started, 3),
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
                  f"{stopper.steps_since_best // steps_per_epoch} epochs (patience {settings.early_stopping_patience}); "
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
        f"{train.decoder_destination(out_dir, is_chief)}",
        file=sys.stderr,
    )
    return summary


def _empty_partial():
    """Running sums of the epoch in progress (kept in the checkpoint state so a resume continues them)."""
    return {"steps": 0, "captions": 0, "reward_sum": 0.0, "loss_sum": 0.0, "tokens": 0.0}


def _advantages(rewards, baseline, greedy_rewards):
    from models import sampling

    return sampling.advantages(rewards, baseline, greedy_rewards).numpy()


def _resume_point(checkpoint_dir):
    """Where `finetune --resume` continues from ("from step N"), None without a checkpoint."""
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(checkpoint_dir)) if Path(checkpoint_dir).is_dir() else None
    return f"from step {latest.rsplit('-', 1)[-1]}" if latest else None


def _read_state(checkpoint_dir, step):
    path = Path(checkpoint_dir) / f"state-{step}.json"
    if not path.is_file():
        raise errors.ArtifactError(f"{path}: the loop state of checkpoint {step} is missing; "
                                   "run `finetune` without --resume")
    state = io_utils.read_json(path, "the fine-tuning state")
    if not isinstance(state, dict) or state.pop("format", None) != STATE_FORMAT or state.get("step") != step:
        raise errors.ArtifactError(f"{path}: not the fine-tuning state of step {step}; run `finetune` without --resume")
    return state


def _summary_writer(log_dir):
    import tensorflow as tf

    if not train._tensorboard_installed():
        print(f"finetune: the tensorboard package is not installed: no TensorBoard logs in {log_dir}", file=sys.stderr)
        return tf.summary.create_noop_writer()
    return tf.summary.create_file_writer(str(log_dir))
