"""The training inputs: captions of OUT encoded once, and tf.data pipelines that batch them.

Captions become `<start> w1 .. wn <end>` id rows, kept as one ragged tensor next to an
int32 vector of feature-row indices (`CaptionSplit`). Each epoch permutes the caption
indices with stateless random ops keyed by (seed, epoch), sorts windows of 16 batches by
length (so batches carry almost no padding), cuts batches, puts each window's batches in
random order, pads each batch to its own longest caption, and only then gathers the
batch's image vectors: from the rows held in memory (`InMemoryFeatures`, a memory map of
the cache file), or, for a cache larger than `train.max_cache_memory_gb`, from the HDF5
file batch by batch (`StreamedFeatures`), giving the same batches. A 2048-d vector is
never copied per caption into Python lists. Training reads one endless stream of epochs
(`make_training_dataset`), so epoch e is the same batches whatever the distribution
strategy and whether or not the run was resumed.
"""

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow as tf

from models import decoder
from pipeline.core import errors, tf_data
from pipeline.data import features as feature_cache
from pipeline.data import run_folder, text

# Training batches are formed within windows of this many batches sorted by caption length.
SORT_WINDOW_BATCHES = 16
# Batches tf.data prepares ahead of the training step (a gather and a pad: far faster than the step).
PREFETCH_BATCHES = 2


class CaptionSplit:
    """The encoded captions of one split, held as NumPy arrays (no Python object per caption).

    rows: np.ndarray int32 [C], the feature-cache row of each caption's image.
    tokens: np.ndarray int32 [T], every caption's `<start> w1 .. wn <end>` back to back
        (n <= max_caption_length); lengths: np.ndarray int64 [C], each caption's share of them.
    images: int, how many images the captions come from.
    captions_per_image: np.ndarray int64 [images] when the captions are grouped by image in
        image order (`encode_split`), else None.
    `token_ids` gives the captions as a list of C arrays (views of `tokens`).

    Built either from `token_ids` (a list of C int arrays) or from `tokens` and `lengths`.
    """

    def __init__(self, rows, token_ids=None, images=0, *, tokens=None, lengths=None, captions_per_image=None):
        self.rows = np.asarray(rows, dtype=np.int32)
        if tokens is None:
            lengths = np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids))
            tokens = np.concatenate(token_ids) if len(token_ids) else np.zeros((0,), np.int32)
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) != len(self.rows) or int(self.lengths.sum()) != len(self.tokens):
            raise ValueError(f"{len(self.rows)} rows, {len(self.lengths)} lengths and {len(self.tokens)} tokens "
                             "do not make one caption per row")
        self.images = int(images)
        self.captions_per_image = None if captions_per_image is None else np.asarray(captions_per_image, np.int64)

    def __len__(self):
        return len(self.rows)

    @property
    def token_ids(self):
        """list of C np.ndarray int32 [L_i], views of `tokens`."""
        return np.split(self.tokens, np.cumsum(self.lengths)[:-1]) if len(self.lengths) else []

    def take(self, order):
        """The captions at indices `order` (int array), in that order: a CaptionSplit of as many
        images (captions_per_image dropped)."""
        order = np.asarray(order, dtype=np.int64)
        starts = np.cumsum(self.lengths) - self.lengths
        lengths = self.lengths[order]
        # Position k of the result holds token (k - its caption's new start) of the caption's old start.
        offsets = np.repeat(starts[order] - (np.cumsum(lengths) - lengths), lengths)
        tokens = self.tokens[np.arange(len(offsets), dtype=np.int64) + offsets]
        return CaptionSplit(self.rows[order], images=self.images, tokens=tokens, lengths=lengths)

    def first_images(self, count):
        """The captions of the first `count` images (all when `count` is None or covers them):
        a CaptionSplit. Needs `captions_per_image`."""
        if count is None or count >= self.images:
            return self
        captions = int(self.captions_per_image[:count].sum())
        return CaptionSplit(self.rows[:captions], images=count, tokens=self.tokens[:int(self.lengths[:captions].sum())],
                            lengths=self.lengths[:captions], captions_per_image=self.captions_per_image[:count])


@dataclasses.dataclass
class ScoredImages:
    """The val images the validation scorer captions, in captions.json order.

    rows: np.ndarray int [N], each image's row in `TrainingData.feature_rows`.
    references: list over the N images of lists of list[str], the image's normalized
        captions that keep a word (as `run_folder.usable_images` gives them).
    """

    rows: np.ndarray
    references: list

    def __len__(self):
        return len(self.rows)


@dataclasses.dataclass
class TrainingData:
    """Everything training reads from OUT, checked; each file of OUT read once.

    feature_rows: InMemoryFeatures or StreamedFeatures (rows int32 [B] -> float32 [B, feature_dim]).
    feature_dim: int; vocabulary: text.Vocabulary; train: CaptionSplit.
    val: CaptionSplit, the captions of the val images validation uses (the first
        `val_images` usable ones, `load_training_data`), grouped by image.
    val_images: ScoredImages of the same images, from which the validation scorer is built
        (`validation.build_validation_scorer(data=...)`).
    val_split_images: int, the usable val images of the whole split.
    skipped_images: int, train/val images left out because extraction failed on them.
    empty_captions: int, captions left out because no word survived normalization.
    in_memory: bool, False when features are read from the HDF5 file batch by batch.
    """

    feature_rows: object
    feature_dim: int
    vocabulary: text.Vocabulary
    train: CaptionSplit
    val: CaptionSplit
    val_images: ScoredImages
    val_split_images: int
    skipped_images: int
    empty_captions: int
    in_memory: bool


class InMemoryFeatures:
    """The feature rows training gathers from, held whole; batches are gathered by `tf.numpy_function`.

    array: float32 [N, feature_dim], a NumPy array (held as it is), or a
    `features.MappedRows` over the cache file, which `load_training_data` uses: the rows
    then live once, in the page cache, and start-up reads nothing (reading 114k rows into
    a new array took 4-8 s at COCO size on this machine, docs/SCALING.md). One copy of the
    cache in memory either way: a tensor made from the array (`tf.convert_to_tensor`) held
    twice its size while converting, and 2 GiB for a 1 GiB array after the array was
    freed; `tf.numpy_function` over the array holds none, and a batch's gather
    (B x 2048 floats, NumPy fancy indexing) took less time than `tf.gather` from the tensor.
    """

    def __init__(self, array):
        if isinstance(array, tf.Tensor):
            array = array.numpy()
        if not isinstance(array, feature_cache.MappedRows):
            array = np.ascontiguousarray(array, dtype=np.float32)
            if array.ndim != 2:
                raise ValueError(f"features must be [N, feature_dim], got shape {array.shape}")
        self.array = array
        self.feature_dim = int(array.shape[1])

    def read(self, rows):
        """rows int [B] (NumPy) -> float32 [B, feature_dim] (NumPy, a new array)."""
        return self.array[np.asarray(rows, dtype=np.int64)]

    def gather(self, rows):
        """rows int32 [B] tensor -> float32 [B, feature_dim] tensor (graph-safe)."""
        image_features = tf.numpy_function(self.read, [rows], tf.float32, stateful=False)
        return tf.ensure_shape(image_features, [None, self.feature_dim])

    def describe(self):
        """What the console says: "features in memory (N rows, M MiB[, mapped from features.h5])"."""
        mapped = ", mapped from features.h5" if isinstance(self.array, feature_cache.MappedRows) else ""
        return f"features in memory ({self.array.shape[0]:,} rows, {self.array.nbytes / 2**20:.0f} MiB{mapped})"

    def close(self):
        pass  # a map is released with the array, when no tf.data thread can still read it


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
            self._reader = run_folder.open_feature_cache(self.out_dir)
        return self._reader.read(rows)

    def gather(self, rows):
        """rows int32 [B] tensor -> float32 [B, feature_dim] tensor, through `tf.numpy_function`."""
        image_features = tf.numpy_function(self.read, [rows], tf.float32, stateful=False)
        return tf.ensure_shape(image_features, [None, self.feature_dim])

    def describe(self):
        return "features streamed from HDF5"

    def close(self):
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def encode_caption(raw_caption, vocabulary, max_caption_length):
    """One raw caption -> np.ndarray int32 [n + 2] `<start> w1 .. wn <end>`, or None if it has no word.

    Words come from `text.normalize_caption`; only the first `max_caption_length` are kept.
    """
    words = text.normalize_caption(raw_caption)
    return encode_words(words, vocabulary, max_caption_length) if words else None


def encode_words(words, vocabulary, max_caption_length):
    """Normalized words (list[str], at least one) -> np.ndarray int32 [n + 2] `<start> w1 .. wn <end>`,
    n = min(len(words), max_caption_length)."""
    return np.asarray([text.START_ID, *vocabulary.encode(words[:max_caption_length]), text.END_ID], dtype=np.int32)


def encode_split(images, vocabulary, max_caption_length):
    """Every caption with a word of a split's usable images (`run_folder.UsableImages`) -> CaptionSplit,
    the captions grouped by image in image order, each `<start> w1 .. wn <end>` (n <= max_caption_length).

    Vectorised over the split: the word ids (`images.caption_ids`, or the references
    encoded here) are cut and framed with `<start>`/`<end>` in NumPy.
    """
    if images.caption_ids is not None:
        word_ids, word_counts = images.caption_ids, images.caption_lengths
    else:
        captions = [words for references in images.references for words in references]
        word_ids = np.asarray(vocabulary.encode([word for words in captions for word in words]), dtype=np.int32)
        word_counts = np.fromiter(map(len, captions), dtype=np.int64, count=len(captions))
    kept = np.minimum(word_counts, max_caption_length)
    word_starts = np.cumsum(word_counts) - word_counts
    position = np.arange(len(word_ids), dtype=np.int64) - np.repeat(word_starts, word_counts)
    words = word_ids[position < np.repeat(kept, word_counts)]
    lengths = kept + 2
    starts = np.cumsum(lengths) - lengths
    tokens = np.empty(int(lengths.sum()), dtype=np.int32)
    tokens[starts] = text.START_ID
    tokens[starts + lengths - 1] = text.END_ID
    is_word = np.ones(len(tokens), dtype=bool)
    is_word[starts] = is_word[starts + lengths - 1] = False
    tokens[is_word] = words
    captions_per_image = images.captions_per_image
    rows = np.repeat(np.asarray(images.rows, dtype=np.int32), captions_per_image)
    return CaptionSplit(rows, images=len(images), tokens=tokens, lengths=lengths,
                        captions_per_image=captions_per_image)


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
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if sort_window_batches < 1:
        raise ValueError(f"sort_window_batches must be at least 1, got {sort_window_batches}")
    num_captions = len(split)
    num_batches = -(-num_captions // batch_size)
    lengths = split.lengths
    captions = tf.RaggedTensor.from_row_lengths(split.tokens, lengths)
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
    if sort_by_length and shuffle_seed is None:
        split = split.take(np.argsort(split.lengths, kind="stable"))
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
    epoch_batches, _ = _caption_batches(split, batch_size, shuffle_seed, sort_window_batches)
    dataset = tf.data.Dataset.counter(start=initial_epoch, dtype=tf.int64).flat_map(epoch_batches)
    if skip_batches:
        # Before the gather of image vectors: skipped batches cost an index slice each.
        dataset = dataset.skip(skip_batches)
    if input_context is not None:
        # After the skip, which counts global batches.
        dataset = _replica_slices(dataset, input_context)
    return _to_model_batches(dataset, feature_rows)


def cache_memory_bytes(num_rows, feature_dim):
    """Bytes `num_rows` feature rows take in memory when training holds them (one float32 copy):
    what `train.max_cache_memory_gb` is compared with."""
    return int(num_rows) * int(feature_dim) * np.dtype(np.float32).itemsize


def load_training_data(out_dir, config, val_images=None):
    """Reads and cross-checks what training needs from OUT (the artifacts of `extract`); nothing is written.

    Each file is read once: captions.json, extract_errors.json, vocab.json, and features.h5.
    The train and val captions are those of `run_folder.usable_images`, as word ids without
    a Python object per word; of the val split only the first `val_images` usable images
    are kept (None: all), the ones validation uses. Training gathers from the feature rows
    of the kept images held whole (`InMemoryFeatures`, when `cache_memory_bytes` of them is
    at most `train.max_cache_memory_gb`; the splits' rows then number those rows): mapped
    from the file (`FeatureReader.map_rows`), or read into one array when the file stores
    them compressed; above the limit they are streamed from the file batch by batch.
    Returns a TrainingData. Raises ArtifactError (mismatched encoder, missing feature rows,
    damaged files) or PipelineError (an empty split) with one message naming the file and the fix.
    """
    out_dir = Path(out_dir)
    vocabulary = run_folder.read_vocabulary(out_dir)
    with run_folder.open_feature_cache(out_dir, config.encoder) as reader:
        feature_dim = int(reader.attrs["feature_dim"])
        dataset = run_folder.read_captions(out_dir)
        failed_ids = run_folder.failed_image_ids(out_dir)
        splits = {split: run_folder.usable_images(out_dir, split, reader.image_ids, dataset, failed_ids=failed_ids,
                                                  vocabulary=vocabulary)
                  for split in ("train", "val")}
        val_kept = len(splits["val"]) if val_images is None else min(int(val_images), len(splits["val"]))
        # The scorer's captions leave captions.json's Python objects as one bytes object, and
        # are normalized again once all of those are freed: kept among them, they would pin
        # the allocator's memory of the whole file (110 MiB more at COCO size, measured).
        scored_text, scored_lengths, scored_counts = _pack_captions(splits["val"].records[:val_kept])
        del dataset
        encoded = {}
        for split, images in splits.items():
            encoded[split] = encode_split(images, vocabulary, config.text.max_caption_length)
            if not len(encoded[split]):
                raise errors.PipelineError(
                    f"{out_dir / run_folder.CAPTIONS_FILE}: the {split} split has no usable caption "
                    f"({len(images) + images.wordless} images with features); training needs both train and val "
                    "captions"
                )
        train, val = encoded["train"], encoded["val"].first_images(val_kept)
        scored_rows = splits["val"].rows[:val_kept]
        counts = {"val_split_images": len(splits["val"]),
                  "skipped_images": sum(images.failed for images in splits.values()),
                  "empty_captions": sum(images.wordless_captions for images in splits.values())}
        del splits
        held = np.unique(np.concatenate([train.rows, val.rows, scored_rows]))
        in_memory = cache_memory_bytes(len(held), feature_dim) <= config.train.max_cache_memory_gb * 2**30
        if in_memory:
            mapped = reader.map_rows(held)
            feature_rows = InMemoryFeatures(mapped if mapped is not None else reader.read(held))
            train, val = (CaptionSplit(np.searchsorted(held, split.rows), images=split.images, tokens=split.tokens,
                                       lengths=split.lengths, captions_per_image=split.captions_per_image)
                          for split in (train, val))
            scored_rows = np.searchsorted(held, scored_rows)
        else:
            feature_rows = StreamedFeatures(out_dir, feature_dim)
    references = _unpack_references(scored_text, scored_lengths, scored_counts)
    return TrainingData(feature_rows=feature_rows, feature_dim=feature_dim, vocabulary=vocabulary, train=train,
                        val=val, val_images=ScoredImages(scored_rows, references), in_memory=in_memory, **counts)


def _pack_captions(records):
    """The captions of `records` (ImageRecord list) as (UTF-8 bytes back to back, int64 [C] their
    lengths in bytes, int64 [N] captions per record)."""
    encoded = [caption.encode("utf-8") for record in records for caption in record.captions]
    return (b"".join(encoded), np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)),
            np.fromiter((len(record.captions) for record in records), dtype=np.int64, count=len(records)))


def _unpack_references(text_bytes, lengths, counts):
    """`_pack_captions`' output -> list over its records of their normalized captions that keep a word."""
    ends = np.cumsum(lengths)
    captions = [text_bytes[end - length:end].decode("utf-8") for end, length in zip(ends.tolist(), lengths.tolist())]
    return run_folder.references_by_image(list(run_folder.normalized_captions(captions)), counts)
