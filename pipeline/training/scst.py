"""Self-critical sequence training (SCST, Rennie et al. 2017): the step `finetune` repeats.

`Stepper.train_step` draws `finetune.samples` captions per image from the decoder
(`models.sampling.sample_captions`, a stateless seed per step), rewards each with its
CIDEr-D against the image's references (`pipeline.training.cider_reward.CiderD`),
subtracts a baseline ("mean": the image's other samples' mean reward; "greedy": the
reward of its greedy caption) and descends the self-critical loss
(`models.sampling.self_critical_loss`) under the distribution strategy, each replica's
loss divided by the global token count so the update is the one-device update.
"""

import dataclasses
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from models import beam_search, decoder, sampling
from pipeline.core import io_utils
from pipeline.data import text
from pipeline.training import cider_reward


@dataclasses.dataclass
class RewardData:
    """The training images fine-tuning samples from.

    rows: np.ndarray int32 [I], each image's feature-cache row (increasing).
    references: `cider_reward.Captions` of the I images, in the order of `rows`: each
        caption's ids `w1 .. wn <end>`.
    """

    rows: np.ndarray
    references: cider_reward.Captions


def reward_data(split, vocabulary_size):
    """Groups a training `inputs.CaptionSplit` (`<start> w.. <end>` per caption, its `tokens` and
    `lengths`) into images and references.

    Images in feature-row order, each image's captions in the split's order, `<start>`
    dropped; in NumPy arrays, with no Python object per caption.
    """
    order = np.argsort(split.rows, kind="stable")
    if (np.diff(order) != 1).any():
        split = split.take(order)  # captions grouped by image, in feature-row order
    lengths, flat = split.lengths, split.tokens
    starts = np.cumsum(lengths) - lengths
    keep = np.ones(len(flat), dtype=bool)
    keep[starts[lengths > 0]] = False  # each caption's <start>
    tokens = flat[keep]
    del keep
    lengths = np.maximum(lengths - 1, 0)
    rows = np.asarray(split.rows, dtype=np.int64)
    first = np.flatnonzero(np.diff(rows, prepend=-1) != 0)
    per_image = np.diff(first, append=len(rows))
    return RewardData(rows[first].astype(np.int32), cider_reward.Captions(tokens, lengths, per_image, vocabulary_size))


def reward_scorer(references, vocabulary_size, state_path, name="finetune"):
    """The CIDEr-D reward of `references`, its document frequencies read from `state_path` when
    they were counted from these captions, else counted and written there.

    Args:
        references: `cider_reward.Captions` (`RewardData.references`).
        vocabulary_size: int, the ids of vocab.json.
        state_path: Path of the `CiderD.state()` kept with the checkpoints (an `.npz`); a
            file of other captions or another vocabulary (its fingerprint differs), or a
            damaged one, is counted again and replaced, and stderr says why.
        name: str, the stage named in the messages.
    Returns:
        `cider_reward.CiderD`.
    """
    state_path = Path(state_path)
    started = time.monotonic()
    reason = "no saved document frequencies"
    if state_path.is_file():
        try:
            with np.load(state_path) as saved:
                state = dict(saved)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            reason = f"{state_path} is unreadable ({error})"
        else:
            try:
                reward = cider_reward.CiderD.from_state(state, references, vocabulary_size)
            except ValueError as error:
                reason = f"{state_path} does not belong to these captions ({error})"
            else:
                print(f"{name}: CIDEr-D document frequencies read from {state_path} ({len(reward.df_keys):,} "
                      f"n-grams, {time.monotonic() - started:.1f} s)", file=sys.stderr)
                return reward
        print(f"{name}: {reason}; counting them again", file=sys.stderr)
    reward = cider_reward.CiderD(references, vocabulary_size)
    with io_utils.atomic_path(state_path, suffix=".tmp.npz") as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **reward.state())
    print(f"{name}: CIDEr-D document frequencies of {reward.corpus_size:,} images counted "
          f"({len(reward.df_keys):,} n-grams, {time.monotonic() - started:.1f} s), kept in {state_path}",
          file=sys.stderr)
    return reward


def epoch_image_order(num_images, seed, epoch):
    """int64 [num_images], the images of epoch `epoch` in order: a pure function of (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_images)


class Stepper:
    """The TF side of one SCST step: sampling, greedy captions and the distributed update.

    Args:
        model: the decoder (`models.decoder.build_decoder`), its variables made under `strategy`.
        optimizer: a Keras optimizer built on the model's trainable variables.
        strategy: the tf.distribute strategy of the run.
        settings: the FinetuneConfig (`samples`, `baseline`).
        max_length: int, words per sampled caption at most (`decode.max_length`).
        reward: `pipeline.training.cider_reward.CiderD` over the training images' references.
    """

    def __init__(self, model, optimizer, strategy, settings, max_length, reward):
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
                # The loss itself under fp32 and bf16; multiplied by the dynamic scale under fp16
                # (objective.make_optimizer), which apply_gradients divides out again.
                scaled_loss = optimizer.scale_loss(loss)
            variables = model.trainable_variables
            gradients = tape.gradient(scaled_loss, variables)
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
        advantage = sampling.advantages(rewards.reshape(len(images), self.samples), self.baseline,
                                       greedy_rewards).numpy()
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
