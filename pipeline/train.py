"""Stage 2 training: the LSTM decoder on cached image vectors and tokenized captions.

Reads `OUT/config.json`, `OUT/captions.json`, `OUT/vocab.json` and `OUT/features.h5`
(all written by `extract`), trains with `model.fit()` and writes:

    OUT/decoder.keras      the best model so far on val_loss (atomic: temp name + rename)
    OUT/checkpoints/       the last epoch's weights, optimizer state and epoch number
                           (`keras.callbacks.BackupAndRestore`), for `--resume`
    OUT/history.json       one entry per finished epoch, rewritten atomically each epoch
    OUT/logs/              TensorBoard logs
    OUT/config.json        the settings, `decoder.vocab_size` filled in

Data path: one sample per caption (teacher forcing over the whole caption, see
`models.decoder`). Captions become `<start> w1 .. wn <end>` id rows, kept as one ragged
tensor next to an int32 vector of feature-row indices; `tf.data` shuffles those small
(row index, token ids) pairs, pads each batch to its own longest caption, and only then
gathers the batch's image vectors from the float32 cache array in one NumPy indexing
call. A 2048-d vector is never copied per caption into Python lists, and a cache larger
than `train.max_cache_memory_gb` is read batch by batch from the HDF5 file instead.
"""

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import config as config_module
from pipeline import datasets, errors, features, io_utils, text

DECODER_FILE = "decoder.keras"
HISTORY_FILE = "history.json"
HISTORY_FORMAT = "captioner.history"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
EXTRACT_ERRORS_FILE = "extract_errors.json"
STRATEGIES = ("default", "mirrored", "multiworker")


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

    feature_rows: a callable rows int [B] -> float32 [B, feature_dim] (memory or HDF5).
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


class _ArrayRows:
    """rows -> float32 [B, D] from the in-memory cache (one fancy-indexing copy per batch)."""

    def __init__(self, array):
        self.array = array

    def __call__(self, rows):
        return self.array[rows]


class _StreamedRows:
    """rows -> float32 [B, D] read from features.h5 per batch, for caches above the memory limit.

    The reader is opened lazily in the process that iterates the dataset; h5py serializes
    access internally, so tf.data's threads may call this concurrently.
    """

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self._reader = None

    def __call__(self, rows):
        if self._reader is None:
            self._reader = features.open_features(self.out_dir)
        return self._reader.read(rows)


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


def make_caption_dataset(split, feature_rows, feature_dim, batch_size, shuffle_seed=None, shuffle_buffer=10000):
    """The tf.data pipeline of one split for `model.fit`.

    Args:
        split: CaptionSplit.
        feature_rows: callable int32 [B] -> float32 [B, feature_dim] (NumPy).
        feature_dim: int.
        batch_size: int; the last batch may be smaller.
        shuffle_seed: int to shuffle (reshuffled every epoch, same sequence for a seed), None keeps the order.
        shuffle_buffer: int, shuffle buffer size (the pairs are small: a full buffer is cheap).
    Returns:
        tf.data.Dataset of `({"image_features": float32 [B, feature_dim], "caption_tokens": int32 [B, T]},
        targets int32 [B, T])`, T = the batch's longest caption + 1, padded with 0; targets are
        the tokens shifted left by one (`models.decoder.make_training_pair`).
    """
    import tensorflow as tf

    from models import decoder

    lengths = np.asarray([len(tokens) for tokens in split.token_ids], dtype=np.int64)
    flat = np.concatenate(split.token_ids) if split.token_ids else np.zeros((0,), np.int32)
    captions = tf.RaggedTensor.from_row_lengths(flat, lengths)
    dataset = tf.data.Dataset.from_tensor_slices((split.rows, captions))
    # A slice of a ragged tensor is a dense vector wrapped in a ragged spec, which
    # padded_batch refuses; passing it through a map gives it its plain dense spec.
    dataset = dataset.map(lambda row, token_ids: (row, tf.convert_to_tensor(token_ids)))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.padded_batch(
        batch_size, padded_shapes=([], [None]), padding_values=(0, np.int32(text.PAD_ID))
    )

    def gather(rows, token_ids):
        image_features = tf.numpy_function(feature_rows, [rows], tf.float32, stateful=False)
        image_features = tf.ensure_shape(image_features, [None, feature_dim])
        caption_tokens, targets = decoder.make_training_pair(token_ids)
        inputs = {decoder.IMAGE_FEATURES_INPUT: image_features, decoder.CAPTION_TOKENS_INPUT: caption_tokens}
        return inputs, targets

    dataset = dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Elements come from in-memory tensors, not files: shard by element across workers.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


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
        feature_rows = _ArrayRows(features.read_features(out_dir).features)
    else:
        feature_rows = _StreamedRows(out_dir)
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
        (train.clipnorm > 0, "train.clipnorm must be positive", train.clipnorm),
        (train.shuffle_buffer >= 1, "train.shuffle_buffer must be at least 1", train.shuffle_buffer),
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


def _make_strategy(name):
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        # Reads the cluster from the TF_CONFIG environment variable.
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)


def read_history(out_dir):
    """The epochs recorded in OUT/history.json: list of dicts with "epoch" (1-based) and metrics; [] if absent."""
    path = Path(out_dir) / HISTORY_FILE
    if not path.exists():
        return []
    data = io_utils.read_json(path, "the training history")
    if not isinstance(data, dict) or data.get("format") != HISTORY_FORMAT or not isinstance(data.get("epochs"), list):
        raise errors.ArtifactError(f"{path}: not a training history (expected format {HISTORY_FORMAT!r})")
    return data["epochs"]


def _checkpoint_epoch(checkpoint_dir):
    """Epochs finished according to BackupAndRestore's metadata, or None without a checkpoint."""
    metadata = Path(checkpoint_dir) / "training_metadata.json"
    if not metadata.is_file() or not (Path(checkpoint_dir) / "latest.weights.h5").is_file():
        return None
    try:
        return int(json.loads(metadata.read_text(encoding="utf-8"))["epoch"])
    except (ValueError, KeyError, TypeError) as error:
        raise errors.ArtifactError(f"{metadata}: damaged checkpoint metadata ({error}); train again without --resume")


def _make_callbacks(out_dir, config, history, is_chief):
    import keras

    out_dir = Path(out_dir)

    class EpochRecorder(keras.callbacks.Callback):
        """Keeps decoder.keras (best val_loss, atomic) and history.json (every epoch, atomic).

        The best val_loss is taken from the history it continues, so a resumed run only
        replaces decoder.keras with a model better than every earlier epoch's.
        """

        def __init__(self):
            super().__init__()
            losses = [entry["val_loss"] for entry in history if isinstance(entry.get("val_loss"), (int, float))]
            self.best = min(losses) if losses else math.inf
            self.epoch_started = None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_started = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            entry = {"epoch": epoch + 1}
            entry.update({name: float(value) for name, value in logs.items()})
            entry["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            entry["seconds"] = round(time.monotonic() - self.epoch_started, 3)
            val_loss = entry.get("val_loss", math.inf)
            entry["best"] = bool(val_loss < self.best)
            if not is_chief:
                return
            if val_loss < self.best:
                self.best = val_loss
                # Keras refuses file names not ending in ".keras", so the temporary keeps it.
                temporary = out_dir / f".{DECODER_FILE}.{os.getpid()}.tmp.keras"
                try:
                    self.model.save(temporary)
                    os.replace(temporary, out_dir / DECODER_FILE)
                finally:
                    temporary.unlink(missing_ok=True)
            history.append(entry)
            io_utils.write_json(out_dir / HISTORY_FILE, {"format": HISTORY_FORMAT, "version": 1, "epochs": history})

    callbacks = [
        keras.callbacks.BackupAndRestore(
            str(out_dir / CHECKPOINT_DIR), save_freq="epoch", double_checkpoint=True,
            # Kept after a finished run: `--resume --epochs N` may extend it later.
            delete_checkpoint=False,
        ),
        EpochRecorder(),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.train.early_stopping_patience, restore_best_weights=True,
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=config.train.reduce_lr_factor, patience=config.train.reduce_lr_patience,
            verbose=1,
        ),
    ]
    if _tensorboard_installed():
        callbacks.append(
            keras.callbacks.TensorBoard(log_dir=str(out_dir / LOG_DIR), update_freq="epoch", write_graph=False)
        )
    else:
        # tf.summary needs the tensorboard package; training is still worth running without it.
        print("train: the tensorboard package is not installed: no TensorBoard logs in "
              f"{out_dir / LOG_DIR} (pip install tensorboard)", file=sys.stderr)
    return callbacks


def _tensorboard_installed():
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def run_train(out_dir, overrides, resume=False):
    """Trains the decoder of OUT from its feature cache (see the module docstring).

    Args:
        out_dir: str or Path, the run folder `extract` wrote.
        overrides: {"section.field": value} applied to OUT/config.json (None values ignored).
        resume: continue from OUT/checkpoints/ (epoch count, weights and optimizer state);
            without it a fresh run replaces old checkpoints, history and logs.
    Returns:
        dict: epochs_run, epochs_total, initial_epoch, best_epoch, best_val_loss, seconds,
        captions_per_second, train_captions, val_captions, vocab_size, features_in_memory.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    config_path = out_dir / config_module.CONFIG_FILE
    if not config_path.is_file():
        raise errors.ArtifactError(f"{config_path}: no run configuration; run `extract` into {out_dir} first")
    saved_config = config_module.PipelineConfig.load(out_dir)
    config = saved_config.replace(overrides)
    _check_settings(config)
    data = load_training_data(out_dir, config)
    config.decoder.vocab_size = len(data.vocabulary)

    checkpoint_dir = out_dir / CHECKPOINT_DIR
    if resume:
        finished = _checkpoint_epoch(checkpoint_dir)
        if finished is None:
            raise errors.ArtifactError(
                f"{checkpoint_dir}: no checkpoint to resume from; run `train` without --resume"
            )
        if dataclasses.asdict(saved_config.decoder) != dataclasses.asdict(config.decoder):
            raise errors.PipelineError(
                f"--resume cannot change the decoder's shape (checkpoint: {dataclasses.asdict(saved_config.decoder)}, "
                f"asked: {dataclasses.asdict(config.decoder)}); train without --resume instead"
            )
        history = [entry for entry in read_history(out_dir) if entry.get("epoch", 0) <= finished]
    else:
        finished = 0
        for stale in (checkpoint_dir, out_dir / LOG_DIR):
            if stale.exists():
                shutil.rmtree(stale)
        (out_dir / HISTORY_FILE).unlink(missing_ok=True)
        history = []
    config.save(out_dir)

    import keras

    from models import decoder

    keras.utils.set_random_seed(config.seed)
    strategy = _make_strategy(config.train.strategy)
    with strategy.scope():
        model = decoder.build_decoder(config.decoder, config.decoder.vocab_size, data.feature_dim)
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=config.train.learning_rate, clipnorm=config.train.clipnorm),
            loss=decoder.masked_loss,
            metrics=[decoder.MaskedAccuracy()],
        )
    batch_size = config.train.batch_size
    train_dataset = make_caption_dataset(
        data.train, data.feature_rows, data.feature_dim, batch_size,
        shuffle_seed=config.seed, shuffle_buffer=config.train.shuffle_buffer,
    )
    val_dataset = make_caption_dataset(data.val, data.feature_rows, data.feature_dim, batch_size)
    print(
        f"train: {len(data.train)} train captions ({data.train.images} images), {len(data.val)} val captions "
        f"({data.val.images} images), vocabulary {config.decoder.vocab_size}, "
        f"{model.count_params():,} parameters, features {'in memory' if data.in_memory else 'streamed from HDF5'}"
        + (f", {data.skipped_images} images skipped (extraction failed)" if data.skipped_images else "")
        + (f", {data.empty_captions} captions without words skipped" if data.empty_captions else ""),
        file=sys.stderr,
    )
    if resume:
        print(f"train: resuming after epoch {finished} of {config.train.epochs}", file=sys.stderr)

    callbacks = _make_callbacks(out_dir, config, history, _is_chief(strategy))
    fit_started = time.monotonic()
    model.fit(
        train_dataset, validation_data=val_dataset, epochs=config.train.epochs,
        callbacks=callbacks, verbose=2, shuffle=False,  # the dataset shuffles itself, seeded
    )
    fit_seconds = time.monotonic() - fit_started
    epochs_run = sum(1 for entry in history if entry["epoch"] > finished)
    config.save(out_dir)

    best = min((entry for entry in history if "val_loss" in entry), key=lambda entry: entry["val_loss"], default=None)
    captions_seen = epochs_run * len(data.train)
    summary = {
        "epochs_run": epochs_run,
        "epochs_total": history[-1]["epoch"] if history else finished,
        "initial_epoch": finished,
        "best_epoch": best["epoch"] if best else None,
        "best_val_loss": best["val_loss"] if best else None,
        "seconds": round(time.monotonic() - started, 3),
        "captions_per_second": round(captions_seen / fit_seconds, 1) if epochs_run and fit_seconds > 0 else 0.0,
        "train_captions": len(data.train),
        "val_captions": len(data.val),
        "vocab_size": config.decoder.vocab_size,
        "features_in_memory": data.in_memory,
    }
    best_text = f"{summary['best_val_loss']:.4f} (epoch {summary['best_epoch']})" if best else "none"
    print(
        f"train: {epochs_run} epochs run (now {summary['epochs_total']} of {config.train.epochs}), "
        f"best val_loss {best_text}, {summary['seconds']:.1f} s, {summary['captions_per_second']:.0f} captions/s "
        f"-> {out_dir / DECODER_FILE}",
        file=sys.stderr,
    )
    return summary
