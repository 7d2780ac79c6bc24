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

Data path: one sample per caption (teacher forcing over the whole caption, see
`models.decoder`). Captions become `<start> w1 .. wn <end>` id rows, kept as one ragged
tensor next to an int32 vector of feature-row indices. Each epoch permutes the caption
indices with stateless random ops keyed by (seed, epoch), sorts windows of 16 batches by
length (so batches carry almost no padding), cuts batches, puts each window's batches in
random order, pads each batch to its own longest caption, and only then gathers the
batch's image vectors: with `tf.gather` from one in-memory tensor, or, for a cache larger
than `train.max_cache_memory_gb`, from the HDF5 file batch by batch (`StreamedFeatures`),
giving the same batches. A 2048-d vector is never copied per caption into Python lists.
Training reads one endless stream of epochs (`make_training_dataset`), so epoch e is the
same batches whatever the distribution strategy and whether or not the run was resumed.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.core import config as config_module
from pipeline.core import errors, io_utils, tf_data
from pipeline.data import datasets, features, text

DECODER_FILE = "decoder.keras"
HISTORY_FILE = "history.json"
HISTORY_FORMAT = "captioner.history"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
EXTRACT_ERRORS_FILE = "extract_errors.json"
STRATEGIES = ("default", "mirrored", "multiworker")
LR_SCHEDULES = ("plateau", "cosine")
SELECT_ON = ("cider", "loss")
# OUT/checkpoints/stopping.json: the stopping state after each of the last periods, so the
# state matching whichever checkpoint BackupAndRestore restores is there.
STOPPING_FILE = "stopping.json"
STOPPING_FORMAT = "captioner.stopping"
STOPPING_PERIODS_KEPT = 3
HISTORY_VERSION = 2
# Training batches are formed within windows of this many batches sorted by caption length.
SORT_WINDOW_BATCHES = 16
# Training steps run per tf.function call (Keras `steps_per_execution`).
STEPS_PER_EXECUTION = 4
# Batches tf.data prepares ahead of the training step (a gather and a pad: far faster than the step).
PREFETCH_BATCHES = 2
# A collective across workers that has not completed in this time fails, so workers whose
# peer hangs stop (for a restart with --resume) instead of waiting forever. A dead peer is
# found sooner, by the coordination service's heartbeats. Generous: the first collective
# (the variables' initial values) also waits for the slowest worker to load its cache.
COLLECTIVE_TIMEOUT_SECONDS = 600


@dataclasses.dataclass
class CaptionSplit:
    """The encoded captions of one split.

    rows: np.ndarray int32 [C], the feature-cache row of each caption's image.
    token_ids: list of C np.ndarray int32 [L_i], `<start> w1 .. wn <end>`, n <= max_caption_length.
    images: int, how many images the captions come from.
    """

    rows: np.ndarray
    token_ids: list
    images: int

    def __len__(self):
        return len(self.rows)


@dataclasses.dataclass
class TrainingData:
    """Everything training reads from OUT, checked.

    feature_rows: InMemoryFeatures or StreamedFeatures (rows int32 [B] -> float32 [B, feature_dim]).
    feature_dim: int; vocabulary: text.Vocabulary; train, val: CaptionSplit.
    skipped_images: int, train/val images left out because extraction failed on them.
    empty_captions: int, captions left out because no word survived normalization.
    in_memory: bool, False when features are read from the HDF5 file batch by batch.
    """

    feature_rows: object
    feature_dim: int
    vocabulary: text.Vocabulary
    train: CaptionSplit
    val: CaptionSplit
    skipped_images: int
    empty_captions: int
    in_memory: bool


class InMemoryFeatures:
    """The whole feature cache held as one tensor; batches are gathered with TF ops.

    array: float32 [N, feature_dim] (NumPy or TF). The gather runs inside the tf.data
    graph (`tf.gather`), with no Python call and no GIL per batch.
    """

    def __init__(self, array):
        import tensorflow as tf

        self.tensor = tf.convert_to_tensor(array, dtype=tf.float32)
        self.feature_dim = int(self.tensor.shape[1])

    def gather(self, rows):
        """rows int32 [B] -> float32 [B, feature_dim] (graph-safe)."""
        import tensorflow as tf

        return tf.gather(self.tensor, rows)


class StreamedFeatures:
    """Feature rows read from features.h5 batch by batch, for caches above the memory limit.

    Only the rows of the current batches are in memory (plus HDF5's chunk cache). The
    reader is opened lazily in the process that iterates the dataset; h5py serializes
    access internally, so tf.data's threads may call it concurrently.
    """

    def __init__(self, out_dir, feature_dim):
        self.out_dir = out_dir
        self.feature_dim = int(feature_dim)
        self._reader = None

    def read(self, rows):
        """rows int [B] (NumPy) -> float32 [B, feature_dim] (NumPy)."""
        if self._reader is None:
            self._reader = features.open_features(self.out_dir)
        return self._reader.read(rows)

    def gather(self, rows):
        """rows int32 [B] tensor -> float32 [B, feature_dim] tensor, through `tf.numpy_function`."""
        import tensorflow as tf

        image_features = tf.numpy_function(self.read, [rows], tf.float32, stateful=False)
        return tf.ensure_shape(image_features, [None, self.feature_dim])

    def close(self):
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def encode_caption(raw_caption, vocabulary, max_caption_length):
    """One raw caption -> np.ndarray int32 [n + 2] `<start> w1 .. wn <end>`, or None if it has no word.

    Words come from `text.normalize_caption`; only the first `max_caption_length` are kept.
    """
    words = text.normalize_caption(raw_caption)[:max_caption_length]
    if not words:
        return None
    return np.asarray([text.START_ID, *vocabulary.encode(words), text.END_ID], dtype=np.int32)


def encode_split(records, row_of_image, vocabulary, max_caption_length):
    """Encodes every caption of `records` (ImageRecords whose images all have a row).

    Returns:
        (CaptionSplit, number of captions dropped because they had no word).
    """
    rows, token_ids, empty = [], [], 0
    for record in records:
        row = row_of_image[record.image_id]
        for caption in record.captions:
            encoded = encode_caption(caption, vocabulary, max_caption_length)
            if encoded is None:
                empty += 1
                continue
            rows.append(row)
            token_ids.append(encoded)
    return CaptionSplit(np.asarray(rows, dtype=np.int32), token_ids, len(records)), empty


def _caption_batches(split, batch_size, shuffle_seed, sort_window_batches):
    """The batching of one split as a function of the epoch number.

    Returns (epoch_batches, num_batches): `epoch_batches(epoch)` (epoch: int64 scalar,
    Python or tensor) -> tf.data.Dataset of `(rows int32 [b], token_ids int32 [b, L])`, L the
    batch's longest caption, padded with PAD_ID; num_batches = ceil(len(split) / batch_size).

    Epoch `e` is a pure function of (shuffle_seed, e), computed with stateless random ops.
    A `reshuffle_each_iteration` shuffle would instead key the order to how many iterators
    the dataset has seen, and Keras 3 opens an extra iterator (a peek to build the model)
    under a distribution strategy, so a mirrored run and a single-device run with one seed
    would train on differently ordered batches; a resumed run would repeat epoch 1's order.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if sort_window_batches < 1:
        raise ValueError(f"sort_window_batches must be at least 1, got {sort_window_batches}")
    num_captions = len(split)
    num_batches = -(-num_captions // batch_size)
    lengths = np.asarray([len(tokens) for tokens in split.token_ids], dtype=np.int64)
    flat = np.concatenate(split.token_ids).astype(np.int32) if split.token_ids else np.zeros((0,), np.int32)
    captions = tf.RaggedTensor.from_row_lengths(flat, lengths)
    rows = tf.constant(np.asarray(split.rows, dtype=np.int32))
    caption_lengths = tf.constant(lengths)
    longest = int(lengths.max()) if num_captions else 0
    window_captions = sort_window_batches * batch_size

    def epoch_batches(epoch):
        order = tf.range(num_captions, dtype=tf.int64)
        batch_order = tf.range(num_batches, dtype=tf.int64)
        if shuffle_seed is not None:
            seed = tf.stack([tf.constant(shuffle_seed, tf.int64), tf.cast(epoch, tf.int64)])
            order = tf.random.experimental.stateless_shuffle(order, seed=seed)
            if sort_window_batches > 1:
                # Sort each window of `sort_window_batches` batches by caption length
                # (stable, so equal lengths keep their random order), cut it into
                # batches, then put the window's batches in a random order.
                window = tf.range(num_captions, dtype=tf.int64) // window_captions
                key = window * (longest + 1) + tf.gather(caption_lengths, order)
                order = tf.gather(order, tf.argsort(key, stable=True))
                jitter = tf.random.stateless_uniform(
                    [num_batches], seed=tf.random.experimental.stateless_fold_in(seed, 1), dtype=tf.float64)
                batch_window = tf.cast(batch_order // sort_window_batches, tf.float64)
                batch_order = tf.cast(tf.argsort(batch_window + jitter, stable=True), tf.int64)

        def batch(index):
            start = index * batch_size
            members = order[start:tf.minimum(start + batch_size, num_captions)]
            token_ids = tf.gather(captions, members).to_tensor(default_value=np.int32(text.PAD_ID))
            return tf.gather(rows, members), token_ids

        return tf.data.Dataset.from_tensor_slices(batch_order).map(batch)

    return epoch_batches, num_batches


def _replica_slices(dataset, input_context):
    """Global batches -> this input pipeline's per-replica slices of each (multi-worker input).

    dataset: tf.data.Dataset of global batches `(rows int32 [b], token_ids int32 [b, L])`.
    input_context: tf.distribute.InputContext of this worker (R replicas in all, r of them
    local, this pipeline's first replica index p * r).
    Returns a tf.data.Dataset of `(rows int32 [s], token_ids int32 [s, L])`, s = ceil(b / R):
    for each global batch, in order, the slices of replicas p * r .. p * r + r - 1, which
    `distribute_datasets_from_function` hands to the local replicas in turn. Replica k takes
    captions k * s .. (k + 1) * s - 1 of the batch, so every caption of an epoch goes to
    exactly one replica once. The last replicas' slices are filled up to s with rows whose
    tokens are all PAD_ID (feature row 0): they hold no target, so they add nothing to the
    loss, its token count or the gradient, and every replica's slice has one shape, as the
    cross-worker collectives on a batch (Keras' first-batch peek) require.
    """
    import tensorflow as tf

    num_replicas = input_context.num_replicas_in_sync
    local_replicas = num_replicas // input_context.num_input_pipelines
    first = input_context.input_pipeline_id * local_replicas

    def slices(rows, token_ids):
        per_replica = -(-tf.shape(rows)[0] // num_replicas)
        padding = per_replica * num_replicas - tf.shape(rows)[0]
        rows = tf.pad(rows, [[0, padding]])
        token_ids = tf.pad(token_ids, [[0, padding], [0, 0]], constant_values=np.int32(text.PAD_ID))
        rows = tf.reshape(rows, [num_replicas, per_replica])[first:first + local_replicas]
        token_ids = tf.reshape(token_ids, [num_replicas, per_replica, -1])[first:first + local_replicas]
        return tf.data.Dataset.from_tensor_slices((rows, token_ids))

    return dataset.flat_map(slices)


def _to_model_batches(dataset, feature_rows):
    """(rows, token_ids) batches -> the model's (inputs, targets) batches, prefetched."""
    import tensorflow as tf

    from models import decoder

    def to_model_inputs(rows, token_ids):
        image_features = feature_rows.gather(rows)
        caption_tokens, targets = decoder.make_training_pair(token_ids)
        inputs = {decoder.IMAGE_FEATURES_INPUT: image_features, decoder.CAPTION_TOKENS_INPUT: caption_tokens}
        return inputs, targets

    dataset = dataset.map(to_model_inputs, num_parallel_calls=tf_data.cpu_count())
    options = tf_data.untuned_options()
    # Each worker takes its slice of every global batch itself (`_replica_slices`); tf.data's
    # auto-sharding would instead hand whole global batches to alternate workers.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options).prefetch(PREFETCH_BATCHES)


def make_caption_dataset(split, feature_rows, batch_size, *, shuffle_seed=None, epoch=0,
                         sort_window_batches=SORT_WINDOW_BATCHES, sort_by_length=False, input_context=None):
    """One epoch of one split as a tf.data pipeline (validation, tests, benchmarks).

    Args:
        split: CaptionSplit.
        feature_rows: InMemoryFeatures or StreamedFeatures: `.gather(rows int32 [B]) -> float32 [B, D]`
            and `.feature_dim`.
        batch_size: int, captions per batch (the global batch under a distribution strategy);
            an epoch has ceil(len(split) / batch_size) batches, the last one may be smaller.
        shuffle_seed: int to shuffle; None keeps the captions in order (validation).
        epoch: int (or int64 scalar tensor), which epoch's order to give: with one seed,
            every epoch has its own order, and epoch `e` is the same batches in every
            process, under every distribution strategy, resumed or not.
        sort_window_batches: int, when shuffling: the shuffled captions are cut into windows
            of this many batches, each window is sorted by caption length and cut into
            batches, and the window's batches are put in random order. Batches then hold
            captions of nearly one length, so padding (which the LSTM and the vocabulary-wide
            softmax compute on like on real words) almost vanishes, while which captions meet
            in a batch stays random. 1 turns it off.
        sort_by_length: bool, without shuffling: the captions in order of length (stable),
            so batches carry almost no padding (validation: the same order every time).
        input_context: None, or the tf.distribute.InputContext a multi-worker strategy passes
            to `distribute_datasets_from_function`: the dataset then gives this worker's
            per-replica slices of each global batch (`_replica_slices`).
    Returns:
        tf.data.Dataset of `({"image_features": float32 [B, D], "caption_tokens": int32 [B, T]},
        targets int32 [B, T])`, T = the batch's longest caption + 1, padded with 0; targets are
        the tokens shifted left by one (`models.decoder.make_training_pair`).
    """
    import tensorflow as tf

    if sort_by_length and shuffle_seed is None:
        order = sorted(range(len(split)), key=lambda index: len(split.token_ids[index]))
        split = CaptionSplit(split.rows[order], [split.token_ids[index] for index in order], split.images)
    epoch_batches, num_batches = _caption_batches(split, batch_size, shuffle_seed, sort_window_batches)
    dataset = epoch_batches(tf.constant(epoch, tf.int64))
    if input_context is not None:
        dataset = _replica_slices(dataset, input_context)
        num_batches *= input_context.num_replicas_in_sync // input_context.num_input_pipelines
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(num_batches))
    return _to_model_batches(dataset, feature_rows)


def make_training_dataset(split, feature_rows, batch_size, *, shuffle_seed, initial_epoch=0, skip_batches=0,
                          sort_window_batches=SORT_WINDOW_BATCHES, input_context=None):
    """The endless training stream: epochs `initial_epoch`, `initial_epoch + 1`, ... back to back.

    Epoch `e` holds exactly the batches of `make_caption_dataset(..., shuffle_seed, epoch=e)`;
    the stream starts `skip_batches` batches into epoch `initial_epoch`, so optimizer step s
    of a run (resumed or not) always trains on batch s % B of epoch s // B, B =
    ceil(len(split) / batch_size). Train on it with `model.fit(..., steps_per_epoch=P)` for a
    validation period of P steps and a `steps_per_execution` dividing P
    (`steps_per_execution_for`). Element spec and `input_context` as `make_caption_dataset`.
    """
    import tensorflow as tf

    epoch_batches, _ = _caption_batches(split, batch_size, shuffle_seed, sort_window_batches)
    dataset = tf.data.Dataset.counter(start=initial_epoch, dtype=tf.int64).flat_map(epoch_batches)
    if skip_batches:
        # Before the gather of image vectors: skipped batches cost an index slice each.
        dataset = dataset.skip(skip_batches)
    if input_context is not None:
        # After the skip, which counts global batches.
        dataset = _replica_slices(dataset, input_context)
    return _to_model_batches(dataset, feature_rows)


def steps_per_execution_for(steps_per_epoch, limit=STEPS_PER_EXECUTION):
    """The largest steps per tf.function call <= `limit` that divides `steps_per_epoch` (int >= 1).

    On the endless training stream Keras runs whole executions, so a count not dividing
    the (Keras) epoch, here the validation period, would carry batches of the next one into it.
    """
    return next(count for count in range(max(1, min(limit, steps_per_epoch)), 0, -1) if steps_per_epoch % count == 0)


def load_training_data(out_dir, config):
    """Reads and cross-checks the artifacts of `extract`; nothing is written.

    Raises ArtifactError (mismatched encoder, missing feature rows, damaged files) or
    PipelineError (an empty split) with one message naming the file and the fix.
    """
    out_dir = Path(out_dir)
    dataset = datasets.read_captions_json(out_dir)
    vocabulary = text.Vocabulary.load(out_dir / text.VOCAB_FILE)
    cache_path = out_dir / features.FEATURES_FILE
    with features.open_features(out_dir) as reader:
        attrs = dict(reader.attrs)
        image_ids = list(reader.image_ids)
        num_rows = len(reader)
    check_feature_cache(attrs, config.encoder, cache_path)
    feature_dim = int(attrs["feature_dim"])

    failed = failed_image_ids(out_dir)
    row_of_image = {image_id: row for row, image_id in enumerate(image_ids)}
    splits, skipped = {}, 0
    for split in ("train", "val"):
        records = dataset.split_images(split)
        usable = [record for record in records if record.image_id not in failed]
        skipped += len(records) - len(usable)
        lacking = [record.image_id for record in usable if record.image_id not in row_of_image]
        if lacking:
            raise errors.ArtifactError(
                f"{cache_path}: {len(lacking)} {split} image(s) of captions.json have no feature row and are "
                f"not listed in {EXTRACT_ERRORS_FILE} (e.g. {lacking[0]!r}); rerun `extract` to complete the cache"
            )
        splits[split] = usable

    empty_total = 0
    encoded = {}
    for split, records in splits.items():
        encoded[split], empty = encode_split(records, row_of_image, vocabulary, config.text.max_caption_length)
        empty_total += empty
        if not len(encoded[split]):
            raise errors.PipelineError(
                f"{out_dir / datasets.CAPTIONS_FILE}: the {split} split has no usable caption "
                f"({len(records)} images with features); training needs both train and val captions"
            )

    cache_bytes = num_rows * feature_dim * 4
    in_memory = cache_bytes <= config.train.max_cache_memory_gb * 2**30
    if in_memory:
        feature_rows = InMemoryFeatures(features.read_features(out_dir).features)
    else:
        feature_rows = StreamedFeatures(out_dir, feature_dim)
    return TrainingData(
        feature_rows=feature_rows, feature_dim=feature_dim, vocabulary=vocabulary,
        train=encoded["train"], val=encoded["val"], skipped_images=skipped,
        empty_captions=empty_total, in_memory=in_memory,
    )


def check_feature_cache(attrs, encoder_config, path):
    """Raises ArtifactError unless the cache attributes `attrs` (dict) fit `encoder_config`.

    `features.check_attrs`, except that precision "auto" accepts whatever the extracting
    machine resolved it to (fp16 on its GPU, fp32 elsewhere): the vectors are equally usable.
    """
    if encoder_config.precision == "auto":
        encoder_config = dataclasses.replace(encoder_config, precision=attrs.get("precision", "fp32"))
    features.check_attrs(attrs, encoder_config, path=path)


def failed_image_ids(out_dir):
    """Image ids extraction listed as unusable in extract_errors.json (empty set if absent)."""
    path = Path(out_dir) / EXTRACT_ERRORS_FILE
    if not path.exists():
        return set()
    entries = io_utils.read_json(path, "the extraction error list")
    if not isinstance(entries, list) or not all(isinstance(entry, dict) and "image_id" in entry for entry in entries):
        raise errors.ArtifactError(f"{path}: expected a list of objects with an 'image_id'; rerun `extract`")
    return {entry["image_id"] for entry in entries}


def _check_settings(config):
    train, text_config = config.train, config.text
    checks = [
        (train.epochs >= 1, "train.epochs (--epochs) must be at least 1", train.epochs),
        (train.batch_size >= 1, "train.batch_size (--batch-size) must be at least 1", train.batch_size),
        (train.learning_rate > 0, "train.learning_rate (--learning-rate) must be positive", train.learning_rate),
        (train.lr_schedule in LR_SCHEDULES, f"train.lr_schedule (--lr-schedule) must be one of {', '.join(LR_SCHEDULES)}",
         train.lr_schedule),
        (train.warmup_steps >= 0, "train.warmup_steps (--warmup-steps) must be >= 0", train.warmup_steps),
        (train.validate_every_steps >= 1, "train.validate_every_steps (--validate-every-steps) must be at least 1",
         train.validate_every_steps),
        (train.patience_steps >= 1, "train.patience_steps (--patience-steps) must be at least 1", train.patience_steps),
        (train.reduce_lr_patience_steps >= 1, "train.reduce_lr_patience_steps must be at least 1",
         train.reduce_lr_patience_steps),
        (0.0 < train.reduce_lr_factor < 1.0, "train.reduce_lr_factor must be in (0, 1)", train.reduce_lr_factor),
        (train.select_on in SELECT_ON, f"train.select_on (--select-on) must be one of {', '.join(SELECT_ON)}",
         train.select_on),
        (train.validation_beam_size >= 1, "train.validation_beam_size must be at least 1", train.validation_beam_size),
        (train.validation_images >= 0, "train.validation_images (--validation-images) must be >= 0 (0: all)",
         train.validation_images),
        (train.clipnorm > 0, "train.clipnorm must be positive", train.clipnorm),
        (train.max_cache_memory_gb > 0, "train.max_cache_memory_gb must be positive", train.max_cache_memory_gb),
        (text_config.max_caption_length >= 1, "text.max_caption_length (--max-caption-length) must be at least 1",
         text_config.max_caption_length),
        (train.strategy in STRATEGIES, f"train.strategy (--strategy) must be one of {', '.join(STRATEGIES)}",
         train.strategy),
        (0.0 <= config.decoder.dropout < 1.0, "decoder.dropout (--dropout) must be in [0, 1)", config.decoder.dropout),
        (config.decoder.units >= 1, "decoder.units (--units) must be at least 1", config.decoder.units),
        (config.decoder.embedding_dim >= 1, "decoder.embedding_dim (--embedding-dim) must be at least 1",
         config.decoder.embedding_dim),
        (config.decoder.image_input in ("init_state", "first_step"),
         "decoder.image_input (--image-input) must be init_state or first_step", config.decoder.image_input),
    ]
    for valid, message, value in checks:
        if not valid:
            raise errors.PipelineError(f"{message}, got {value!r}")


_GLOBAL_TOKEN_MEAN_LOSS = []


def global_token_mean_loss_function():
    """The training loss: `models.decoder.masked_loss` normalized by the global batch's tokens.

    Returns a registered Keras loss `loss(targets int [B, T], logits float32 [B, T, V]) ->
    float32 scalar`. On one device it is `masked_loss`: the sum of per-token losses over
    non-pad targets / their number. Under a distribution strategy each replica sees a
    slice of the global batch; Keras divides each replica's loss by the number of
    replicas R and sums their gradients. A per-replica `masked_loss` would then train on
    the mean of the replicas' token means, which weights a token of a replica with few
    tokens more than one of a replica with many. Here each replica returns
    R * (its token-loss sum) / (non-pad targets of the whole global batch, summed across
    replicas), so the summed gradient is exactly the gradient of the global token mean,
    and the reported loss (the replicas' mean) is the global token mean as well.
    """
    if _GLOBAL_TOKEN_MEAN_LOSS:
        return _GLOBAL_TOKEN_MEAN_LOSS[0]
    import keras
    import tensorflow as tf

    from models import decoder

    # Registered so a compiled decoder.keras reloads once this module is imported
    # (run_train's readers load with compile=False and need nothing).
    @keras.saving.register_keras_serializable(package="captioner")
    def global_token_mean_loss(targets, logits):
        local_mean = decoder.masked_loss(targets, logits)
        replica_context = tf.distribute.get_replica_context()
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replica_context is None or num_replicas == 1:
            return local_mean
        local_tokens = tf.reduce_sum(tf.cast(tf.not_equal(tf.cast(targets, tf.int32), text.PAD_ID), tf.float32))
        global_tokens = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, local_tokens)
        return local_mean * tf.math.divide_no_nan(local_tokens * float(num_replicas), global_tokens)

    _GLOBAL_TOKEN_MEAN_LOSS.append(global_token_mean_loss)
    return global_token_mean_loss


def make_schedule(config, total_steps):
    """The learning-rate schedule of `config.train` (a `models.schedules.WarmupSchedule`):
    `train.learning_rate` after `train.warmup_steps` of linear warm-up, then cut on plateaus
    or decayed along a cosine ending at `total_steps` (the cap), per `train.lr_schedule`.
    Call inside the strategy scope of the model it drives."""
    from models import schedules

    train_config = config.train
    return schedules.WarmupSchedule(
        train_config.learning_rate, train_config.warmup_steps, decay=train_config.lr_schedule,
        total_steps=max(int(total_steps), train_config.warmup_steps + 1),
    )


def build_model(config, vocab_size, feature_dim, steps_per_execution=STEPS_PER_EXECUTION, learning_rate=None):
    """The decoder of `config.decoder`, compiled for training as `run_train` trains it.

    Call inside `strategy.scope()` to distribute it. Adam with `train.clipnorm` and
    `learning_rate` (a float or schedule; None: `train.learning_rate`, constant),
    `models.decoder.masked_loss` over the global batch's tokens
    (`global_token_mean_loss_function`), `MaskedAccuracy`; several steps per
    `tf.function` call (`steps_per_execution`, 1 with several replicas) to spare the
    per-step Python round trip.
    Returns a compiled `keras.Model` (inputs and outputs as `models.decoder.build_decoder`).
    """
    import keras
    import tensorflow as tf

    from models import decoder

    if tf.distribute.get_strategy().num_replicas_in_sync > 1:
        # Keras 3.15's multi-step loop over a distributed iterator fails under
        # MirroredStrategy ("You must feed a value for placeholder tensor ...while/cond"):
        # one step per call there.
        steps_per_execution = 1
    model = decoder.build_decoder(config.decoder, vocab_size, feature_dim)
    if learning_rate is None:
        learning_rate = config.train.learning_rate
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate, clipnorm=config.train.clipnorm),
        loss=global_token_mean_loss_function(),
        metrics=[decoder.MaskedAccuracy()],
        steps_per_execution=steps_per_execution,
    )
    return model


def make_strategy(name):
    """The tf.distribute strategy named by `train.strategy`.

    "default": the current (single-device) strategy. "mirrored": one replica per GPU, or,
    without GPUs, per logical CPU device (`tf.config.set_logical_device_configuration`).
    "multiworker": `MultiWorkerMirroredStrategy` on the cluster of TF_CONFIG, checked first
    (`check_tf_config`). Under "mirrored" and "multiworker" `train.batch_size` is the
    global batch, split across replicas; the loss is averaged over the non-pad tokens of
    the whole global batch (`global_token_mean_loss_function`), as on one device.
    """
    import tensorflow as tf

    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    if name == "multiworker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS)
        return _nested_reduce_multiworker_strategy()(communication_options=options)
    return tf.distribute.get_strategy()


_NESTED_REDUCE_STRATEGY = []


def _nested_reduce_multiworker_strategy():
    """`tf.distribute.MultiWorkerMirroredStrategy` whose `reduce` takes what Keras 3 gives it.

    Keras 3's `fit` and `evaluate` peek at one distributed batch to build the model and
    hand the whole batch, a dict of PerReplica values, to `strategy.reduce`.
    MirroredStrategy reduces such a nest leaf by leaf; the collective strategy's
    `_reduce_to` converts its argument to one tensor and fails ("Attempt to convert a value
    ({'image_features': PerReplica:{...}, ...}) with an unsupported type (<class 'dict'>)").
    Reducing each leaf on its own is what MirroredStrategy does; the leaves of a batch have
    the same shape on every worker (`_replica_slices`), as the collective needs. Keras also
    reduces the replicas' scalar logs with `axis=0`, which fails on a scalar ("Invalid
    reduction dimension 0 for input with 0 dimensions"); the mean of scalars over replicas
    is their reduction with `axis=None`. (Reported upstream as keras-team/keras#20329 and
    #20585: Keras 3 `fit` under MultiWorkerMirroredStrategy.)
    """
    if _NESTED_REDUCE_STRATEGY:
        return _NESTED_REDUCE_STRATEGY[0]
    import tensorflow as tf

    class NestedReduceMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            reduce = super().reduce

            def reduce_leaf(leaf):
                # Keras reduces each replica's scalar logs (loss, metrics) "along axis 0":
                # for scalars that is the mean over replicas, axis None.
                scalar = all(local.shape.rank == 0 for local in self.experimental_local_results(leaf))
                return reduce(reduce_op, leaf, None if scalar else axis)

            return tf.nest.map_structure(reduce_leaf, value)

    _NESTED_REDUCE_STRATEGY.append(NestedReduceMultiWorkerMirroredStrategy)
    return NestedReduceMultiWorkerMirroredStrategy


def check_tf_config(raw):
    """Raises PipelineError unless `raw` (the TF_CONFIG string or None) describes this worker.

    Expected: {"cluster": {"worker": ["host:port", ...], "chief": [...]?}, "task": {"type":
    "worker"|"chief", "index": int}}, the task's index within its job's address list.
    """
    example = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}\'')
    if not raw:
        raise errors.PipelineError(
            f"--strategy multiworker needs the TF_CONFIG environment variable on every worker, e.g. {example}"
        )
    try:
        tf_config = json.loads(raw)
    except ValueError as error:
        raise errors.PipelineError(f"TF_CONFIG is not valid JSON ({error}); expected e.g. {example}") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
        raise errors.PipelineError(f"TF_CONFIG has no cluster with a 'worker' (or 'chief') address list; expected e.g. {example}")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a for a in addresses):
            raise errors.PipelineError(f"TF_CONFIG cluster[{job!r}] must be a list of 'host:port' strings, got {addresses!r}")
    if not isinstance(task, dict) or task.get("type") not in ("worker", "chief"):
        raise errors.PipelineError(f"TF_CONFIG task must be {{'type': 'worker' or 'chief', 'index': N}}, got {task!r}")
    index, addresses = task.get("index"), cluster.get(task["type"], [])
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(addresses):
        raise errors.PipelineError(
            f"TF_CONFIG task index {index!r} does not name one of the {len(addresses)} "
            f"{task['type']!r} address(es) of the cluster"
        )


def _distribute_datasets(strategy, make_train, make_val):
    """(train, val) datasets for `model.fit` under `strategy`.

    make_train, make_val: input_context (tf.distribute.InputContext or None) -> tf.data.Dataset.
    Under a multi-worker strategy every worker builds the same global batches and takes
    its replicas' slices of each (`_replica_slices`), through
    `strategy.distribute_datasets_from_function`; elsewhere the plain global-batch
    datasets, which Keras splits across the local replicas itself.
    """
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return make_train(None), make_val(None)
    return (strategy.distribute_datasets_from_function(make_train),
            strategy.distribute_datasets_from_function(make_val))


@contextlib.contextmanager
def lost_worker_errors(strategy_name, command, resume_point):
    """Turns a multi-worker collective that failed for want of a peer into one PipelineError line.

    A worker that dies (or never comes) stops the others in their next collective: the
    coordination service reports it unhealthy when its heartbeats stop, or the collective
    times out (COLLECTIVE_TIMEOUT_SECONDS). Every worker must then be restarted with --resume.

    Args:
        strategy_name: the run's strategy setting; errors pass through unless "multiworker".
        command: "train" or "finetune", for the message.
        resume_point: callable() -> str or None, where `--resume` would continue from (e.g.
            "after epoch 3"), None when the chief has no checkpoint yet.
    """
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
            tf.errors.AbortedError) as error:
        if strategy_name != "multiworker":
            raise
        point = resume_point()
        advice = (f"restart every worker with `{command} --resume` to continue {point}" if point else
                  f"restart every worker with `{command} --resume` (without it if the chief has no checkpoint yet)")
        raise errors.PipelineError(
            f"{command}: the cluster of TF_CONFIG lost a worker ({' '.join(errors.op_error_reason(error).split())}); "
            f"{advice}"
        ) from None


def _train_resume_point(checkpoint_dir):
    finished = _checkpoint_epoch(checkpoint_dir)
    return f"after epoch {finished}" if finished else None


def worker_scratch_dir(out_dir, strategy):
    """A new, empty OUT/.worker-TYPE-INDEX.tmp/ for a non-chief worker's writes (Path).

    One per task, so workers sharing OUT never meet; a folder a killed worker left behind
    is replaced when it restarts, and the stage removes it when the worker ends.
    """
    resolver = strategy.cluster_resolver
    path = Path(out_dir) / f".worker-{resolver.task_type}-{resolver.task_id}.tmp"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def decoder_destination(out_dir, is_chief):
    """The end of a stage's summary line: where decoder.keras went, or that the chief writes it."""
    return f"-> {Path(out_dir) / DECODER_FILE}" if is_chief else "(the chief writes decoder.keras)"


def is_chief_worker(strategy):
    """Whether this process writes OUT: always, except on the non-chief workers of a
    multi-worker cluster (the chief is the "chief" task, or else worker 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)


def read_history(out_dir):
    """The validation periods recorded in OUT/history.json: list of dicts, [] if absent.

    One entry per finished period (format version 2): "period" (1-based), "step"
    (optimizer steps done), "epoch" (passes over the training captions done, float), the
    Keras metrics ("loss", "masked_accuracy", "val_loss", "val_masked_accuracy"),
    "val_cider", "val_bleu_4", "val_distinct" (greedy captions of the val images),
    "learning_rate" (at the period's last step), "best" (decoder.keras was replaced),
    "lr_reduced", and seconds: "seconds" (the whole period), "train_seconds",
    "val_loss_seconds", "val_seconds" (captioning and scoring). Version 1 files (one
    entry per epoch, "epoch" 1-based, no "step") are returned as they are.
    """
    path = Path(out_dir) / HISTORY_FILE
    if not path.exists():
        return []
    data = io_utils.read_json(path, "the training history")
    key = "periods" if isinstance(data, dict) and data.get("version") == HISTORY_VERSION else "epochs"
    if not isinstance(data, dict) or data.get("format") != HISTORY_FORMAT or not isinstance(data.get(key), list):
        raise errors.ArtifactError(f"{path}: not a training history (expected format {HISTORY_FORMAT!r})")
    return data[key]


def _write_history(out_dir, history):
    io_utils.write_json(Path(out_dir) / HISTORY_FILE,
                        {"format": HISTORY_FORMAT, "version": HISTORY_VERSION, "periods": history})


def _checkpoint_epoch(checkpoint_dir):
    """Periods (Keras epochs) finished according to BackupAndRestore's metadata, or None without a checkpoint."""
    metadata = Path(checkpoint_dir) / "training_metadata.json"
    if not metadata.is_file() or not (Path(checkpoint_dir) / "latest.weights.h5").is_file():
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
    path = Path(checkpoint_dir) / STOPPING_FILE
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


def _write_stopping_state(checkpoint_dir, period_steps, period, state):
    """Adds `state` for `period` to stopping.json, keeping the last STOPPING_PERIODS_KEPT periods:
    written before BackupAndRestore's checkpoint of the period, so whichever of its two
    checkpoints a resume restores, the matching state is on disk."""
    path = Path(checkpoint_dir) / STOPPING_FILE
    states = {}
    if path.is_file():
        data = io_utils.read_json(path, "the early-stopping state")
        if isinstance(data, dict) and data.get("period_steps") == period_steps:
            states = {key: value for key, value in data.get("periods", {}).items() if int(key) < period}
    states[str(period)] = state
    kept = sorted(states, key=int)[-STOPPING_PERIODS_KEPT:]
    io_utils.write_json(path, {"format": STOPPING_FORMAT, "version": 1, "period_steps": period_steps,
                               "periods": {key: states[key] for key in kept}})


def save_model_atomically(model, path):
    """Saves a Keras model to `path` (.keras) under a temporary name renamed into place."""
    with io_utils.atomic_path(path, suffix=".tmp.keras") as temporary:
        model.save(temporary)


def _make_callbacks(out_dir, config, history, is_chief, *, strategy, scorer, schedule, period_steps, steps_per_epoch,
                    stopping_state, write_dir):
    """The callbacks of `run_train`, in order: validation and stopping (`PeriodValidation`),
    BackupAndRestore, TensorBoard. The first runs before the checkpoint is written, so the
    checkpoint of a period always finds that period's stopping state on disk. Checkpoints
    and TensorBoard logs go to `write_dir` (OUT on the chief, a worker's scratch folder
    elsewhere); only the chief writes OUT."""
    import keras

    from pipeline.training import validation

    out_dir, write_dir = Path(out_dir), Path(write_dir)
    train_config = config.train
    select_on_cider = train_config.select_on == "cider"

    class PeriodValidation(keras.callbacks.Callback):
        """After each validation period: validation CIDEr-D, selection, early stopping, LR cuts.

        Every worker of a distributed run scores the same val vectors with the same,
        synchronized weights, and then takes the chief's scores (`validation.chief_scores`),
        so the chief decides and all workers stop together; only the chief writes
        decoder.keras (on a new best), history.json and stopping.json.
        """

        def __init__(self):
            super().__init__()
            self.stopper = validation.EarlyStopper(train_config.patience_steps, mode="max" if select_on_cider else "min")
            self.lr_reductions, self.last_reduction_step = 0, None
            self.stopped_step = None
            if stopping_state is not None:
                self.stopper.load_state_dict(stopping_state["stopper"])
                self.lr_reductions = int(stopping_state["lr_reductions"])
                self.last_reduction_step = stopping_state["last_reduction_step"]
            schedule.scale.assign(train_config.reduce_lr_factor ** self.lr_reductions)
            self.marks = {}
            self.dropout_seeds = []

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
            step = (epoch + 1) * period_steps
            learning_rate = float(keras.ops.convert_to_numpy(schedule(step - 1)))
            scores = validation.chief_scores(strategy, scorer(self.model))
            if logs is not None:  # the same dict reaches TensorBoard and the console line
                logs.update({name: value for name, value in scores.items() if name != "val_seconds"})
                logs["learning_rate"] = learning_rate
            keras_logs = {name: float(value) for name, value in (logs or {}).items()}
            score = scores["val_cider"] if select_on_cider else keras_logs.get("val_loss", math.nan)
            improved, should_stop = self.stopper.update(step, score)
            lr_reduced = self._maybe_reduce_learning_rate(step, improved)
            now = time.monotonic()
            begin = self.marks.get("begin", now)
            entry = {"period": epoch + 1, "step": step, "epoch": round(step / steps_per_epoch, 3)}
            entry.update(keras_logs)
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
            if not is_chief:
                # Every worker has the same logs (Keras reduces them across workers) and
                # scores; the chief alone writes them.
                history.append(entry)
                return
            _write_stopping_state(out_dir / CHECKPOINT_DIR, period_steps, epoch + 1, self.state())
            if improved:
                save_model_atomically(self.model, out_dir / DECODER_FILE)
            history.append(entry)
            _write_history(out_dir, history)

        def _maybe_reduce_learning_rate(self, step, improved):
            """Reduce-on-plateau counted in steps: a cut once `reduce_lr_patience_steps` passed
            since both the best and the last cut."""
            if train_config.lr_schedule != "plateau" or improved or self.stopper.best_step is None:
                return False
            since = step - max(self.stopper.best_step, self.last_reduction_step or 0)
            if since < train_config.reduce_lr_patience_steps:
                return False
            self.lr_reductions += 1
            self.last_reduction_step = step
            schedule.scale.assign(train_config.reduce_lr_factor ** self.lr_reductions)
            print(f"train: step {step}: learning rate cut to {train_config.learning_rate * float(schedule.scale.numpy()):.3g} "
                  f"({since} steps without a better validation {train_config.select_on})", file=sys.stderr)
            return True

        def state(self):
            return {"stopper": self.stopper.state_dict(), "lr_reductions": self.lr_reductions,
                    "last_reduction_step": self.last_reduction_step, "stopped": self.stopped_step is not None}

    period_validation = PeriodValidation()
    callbacks = [
        period_validation,
        keras.callbacks.BackupAndRestore(
            str(write_dir / CHECKPOINT_DIR), save_freq="epoch", double_checkpoint=True,
            # Kept after a finished run: `--resume --epochs N` may extend it later.
            delete_checkpoint=False,
        ),
    ]
    if _tensorboard_installed():
        callbacks.append(
            keras.callbacks.TensorBoard(log_dir=str(write_dir / LOG_DIR), update_freq="epoch", write_graph=False)
        )
    else:
        # tf.summary needs the tensorboard package; training is still worth running without it.
        print("train: the tensorboard package is not installed: no TensorBoard logs in "
              f"{out_dir / LOG_DIR} (pip install tensorboard)", file=sys.stderr)
    return callbacks, period_validation


def _tensorboard_installed():
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


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
    config_path = out_dir / config_module.CONFIG_FILE
    if not config_path.is_file():
        raise errors.ArtifactError(f"{config_path}: no run configuration; run `extract` into {out_dir} first")
    saved_config = config_module.PipelineConfig.load(out_dir)
    config = saved_config.replace(overrides)
    _check_settings(config)

    # Before anything else touches TF: MultiWorkerMirroredStrategy must configure the
    # collective ops at startup, and TF_CONFIG problems should stop the run first.
    strategy = make_strategy(config.train.strategy)
    is_chief = is_chief_worker(strategy)
    data = load_training_data(out_dir, config)
    config.decoder.vocab_size = len(data.vocabulary)
    train_config = config.train
    batch_size = train_config.batch_size
    steps_per_epoch, period_steps, num_periods = training_plan(
        len(data.train), batch_size, train_config.epochs, train_config.validate_every_steps)

    checkpoint_dir = out_dir / CHECKPOINT_DIR
    stopping_state = None
    if resume:
        finished = _checkpoint_epoch(checkpoint_dir)
        if finished is None:
            raise errors.ArtifactError(
                f"{checkpoint_dir}: no checkpoint to resume from; run `train` without --resume"
            )
        # The chief's config.json describes the checkpoint; another worker's OUT may hold
        # only the cache's (it never writes OUT).
        if is_chief and dataclasses.asdict(saved_config.decoder) != dataclasses.asdict(config.decoder):
            raise errors.PipelineError(
                f"--resume cannot change the decoder's shape (checkpoint: {dataclasses.asdict(saved_config.decoder)}, "
                f"asked: {dataclasses.asdict(config.decoder)}); train without --resume instead"
            )
        stopping_state = read_stopping_state(checkpoint_dir, finished, period_steps)
        history = [entry for entry in read_history(out_dir) if entry.get("period", 0) <= finished]
    else:
        finished = 0
        if is_chief:
            for stale in (checkpoint_dir, out_dir / LOG_DIR):
                if stale.exists():
                    shutil.rmtree(stale)
            (out_dir / HISTORY_FILE).unlink(missing_ok=True)
        history = []
    if is_chief:
        config.save(out_dir)

    from pipeline.training import validation

    scorer = validation_scorer or validation.build_validation_scorer(
        out_dir, config, max_images=train_config.validation_images or None,
        beam_size=train_config.validation_beam_size)
    import keras

    keras.utils.set_random_seed(config.seed)
    lost_workers = functools.partial(lost_worker_errors, config.train.strategy, "train",
                                     functools.partial(_train_resume_point, checkpoint_dir))
    with lost_workers(), strategy.scope():
        schedule = make_schedule(config, num_periods * period_steps)
        model = build_model(config, config.decoder.vocab_size, data.feature_dim,
                            steps_per_execution=steps_per_execution_for(period_steps), learning_rate=schedule)
    # Endless, epoch e's order fixed by (seed, e), entered at the step the checkpoint
    # reached: a resumed run trains on the batches the uninterrupted run would have, and
    # so does every distribution strategy.
    initial_step = finished * period_steps
    train_dataset, val_dataset = _distribute_datasets(
        strategy,
        lambda input_context: make_training_dataset(
            data.train, data.feature_rows, batch_size, shuffle_seed=config.seed,
            initial_epoch=initial_step // steps_per_epoch, skip_batches=initial_step % steps_per_epoch,
            input_context=input_context),
        # Sorted by length: the same val loss with almost no padding, half the time (measured).
        lambda input_context: make_caption_dataset(data.val, data.feature_rows, batch_size, sort_by_length=True,
                                                   input_context=input_context),
    )
    print(
        f"train: {len(data.train)} train captions ({data.train.images} images), {len(data.val)} val captions "
        f"({data.val.images} images, {len(scorer) if hasattr(scorer, '__len__') else '?'} captioned for CIDEr-D), "
        f"vocabulary {config.decoder.vocab_size}, "
        f"{model.count_params():,} parameters, features {'in memory' if data.in_memory else 'streamed from HDF5'}"
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
    write_dir = out_dir if is_chief else worker_scratch_dir(out_dir, strategy)
    if resume and not is_chief:
        # Every worker restores the chief's checkpoint: the same weights, optimizer state and epoch.
        shutil.copytree(checkpoint_dir, write_dir / CHECKPOINT_DIR)
    callbacks, period_validation = _make_callbacks(
        out_dir, config, history, is_chief, strategy=strategy, scorer=scorer, schedule=schedule,
        period_steps=period_steps, steps_per_epoch=steps_per_epoch, stopping_state=stopping_state,
        write_dir=write_dir,
    )
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
        if isinstance(data.feature_rows, StreamedFeatures):
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
        f"{100 * summary['validation_share']:.1f}% of the fit {decoder_destination(out_dir, is_chief)}",
        file=sys.stderr,
    )
    return summary

