"""The run folder `OUT/`: the names of its files, and one reader for each artifact.

Stages talk to each other only through `OUT/`, and read it through this module alone, so
every stage sees an artifact the same way: the same checks, the same error message, the
same rule for which images of a split are usable.

    read_config(out_dir, requires)          config.json (PipelineConfig)
    read_captions(out_dir)                  captions.json (datasets.Dataset)
    read_vocabulary(out_dir)                vocab.json (text.Vocabulary)
    open_feature_cache / read_feature_cache / read_feature_attrs
                                            features.h5, checked against the run's encoder
    failed_image_ids(out_dir)               extract_errors.json
    usable_images(out_dir, split, image_ids)  the images of a split that stages use
    load_decoder(out_dir, decoder_file)     decoder.keras or decoder_xe.keras
    read_training_history / read_finetune_history (and their writers)
    decoder_objective(out_dir)              "xe" or "scst": which training made decoder.keras

The file names are defined in `pipeline.core.run_files` (see there why) and exported here.
"""

import dataclasses
import gc
import hashlib
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from pipeline.core import config as config_module
from pipeline.core import errors, io_utils
from pipeline.core.run_files import (  # noqa: F401  (the names of OUT/, for the stages)
    CAPTIONS_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DECODER_FILE,
    DEMO_DATA_DIR,
    EXTRACT_ERRORS_FILE,
    EXTRACT_ERRORS_SHARD_PATTERN,
    FEATURES_FILE,
    FEATURES_SHARD_PATTERN,
    FINETUNE_CHECKPOINT_DIR,
    FINETUNE_HISTORY_FILE,
    FINETUNE_LOG_DIR,
    HISTORY_FILE,
    LOG_DIR,
    METRICS_FILE,
    REPORT_FILE,
    REWARD_STATE_FILE,
    SAVED_MODEL_DIR,
    SERVING_DIR,
    STOPPING_FILE,
    TEST_CAPTIONS_FILE,
    VOCAB_FILE,
    WORKER_SCRATCH_PATTERN,
    XE_DECODER_FILE,
    XE_METRICS_FILE,
)
from pipeline.data import datasets, features, text

HISTORY_FORMAT = "captioner.history"
HISTORY_VERSION = 2  # one entry per validation period; version 1 had one per epoch
FINETUNE_HISTORY_FORMAT = "captioner.finetune_history"
FINETUNE_HISTORY_VERSION = 1


def read_config(out_dir, requires):
    """OUT/config.json as a PipelineConfig.

    requires: str naming the stages that write it, e.g. "`extract` and `train`", for the
        message when it is absent; None: a default PipelineConfig then (`extract` starts a run).
    Raises ArtifactError when it is absent (and required) or damaged, PipelineError for an
    unknown or mistyped setting.
    """
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        if requires is None:
            return config_module.PipelineConfig()
        raise errors.ArtifactError(f"{path}: no run configuration; run {requires} into {out_dir} first")
    return config_module.PipelineConfig.load(out_dir)


def read_captions(out_dir):
    """OUT/captions.json as a `datasets.Dataset` (ArtifactError if missing, foreign or damaged)."""
    return datasets.read_captions_json(out_dir)


def read_vocabulary(out_dir):
    """OUT/vocab.json as a `text.Vocabulary` (ArtifactError if missing, foreign or damaged)."""
    return text.Vocabulary.load(Path(out_dir) / VOCAB_FILE)


def check_feature_cache(attrs, encoder_config, path):
    """Raises ArtifactError unless the cache attributes `attrs` (dict) fit `encoder_config`.

    `features.check_attrs`, except that precision "auto" accepts whatever the extracting
    machine resolved it to (fp16 on its GPU, fp32 elsewhere): the vectors are equally usable.
    """
    if encoder_config.precision == "auto":
        encoder_config = dataclasses.replace(encoder_config, precision=attrs.get("precision", "fp32"))
    features.check_attrs(attrs, encoder_config, path=path)


def open_feature_cache(out_dir, encoder_config=None):
    """OUT/features.h5 open for reading rows: a `features.FeatureReader` (close it, or use `with`).

    encoder_config: the run's EncoderConfig, checked with `check_feature_cache`; None reads
    the cache as it is. Raises ArtifactError when the file is missing, damaged or foreign.
    """
    reader = features.open_features(out_dir)
    if encoder_config is not None:
        try:
            check_feature_cache(dict(reader.attrs), encoder_config, reader.path)
        except BaseException:
            reader.close()
            raise
    return reader


def read_feature_cache(out_dir, encoder_config=None):
    """The whole of OUT/features.h5 in memory (`features.FeatureCache`, float32 [N, feature_dim]),
    checked as `open_feature_cache` checks it."""
    cache = features.read_features(out_dir)
    if encoder_config is not None:
        check_feature_cache(cache.attrs, encoder_config, features.features_path(out_dir))
    return cache


def read_feature_attrs(out_dir):
    """The attributes of OUT/features.h5 (dict), without reading its rows."""
    return features.read_attrs(features.features_path(out_dir))


def failed_image_ids(out_dir):
    """Image ids extraction listed as unusable in OUT/extract_errors.json (set of str; empty if absent)."""
    path = Path(out_dir) / EXTRACT_ERRORS_FILE
    if not path.exists():
        return set()
    entries = io_utils.read_json(path, "the extraction error list")
    if not isinstance(entries, list) or not all(isinstance(entry, dict) and "image_id" in entry for entry in entries):
        raise errors.ArtifactError(f"{path}: expected a list of objects with an 'image_id'; rerun `extract`")
    return {entry["image_id"] for entry in entries}


@dataclasses.dataclass
class UsableImages:
    """The usable images of one split, in captions.json order (`usable_images`).

    records: list of N `datasets.ImageRecord`.
    rows: np.ndarray int64 [N], each image's row in features.h5.
    references: list over the N images of lists of list[str]: the image's captions that
        keep at least one word after `text.normalize_caption`, normalized (never empty);
        None when the captions were asked for as word ids (`caption_ids`).
    failed: int, images of the split left out because extraction failed on them.
    wordless: int, images left out because none of their captions has a word.
    wordless_captions: int, captions without a word among the images extraction did not fail on.
    captions_per_image: np.ndarray int64 [N], the captions with a word of each image.
    caption_ids, caption_lengths: with a vocabulary only (else None): np.ndarray int32 [W],
        the word ids (`Vocabulary.encode`) of those captions back to back, image by image,
        and np.ndarray int64 [C] the words of each caption.
    """

    records: list
    rows: np.ndarray
    references: list
    failed: int
    wordless: int
    wordless_captions: int
    captions_per_image: np.ndarray = None
    caption_ids: np.ndarray = None
    caption_lengths: np.ndarray = None

    def __len__(self):
        return len(self.records)


# Lower-case ASCII letters runs: `text.normalize_caption` of an ASCII caption (NFKD and the
# combining marks change nothing there, and `str.isalpha` is [A-Za-z]), one C call per caption.
_ASCII_WORDS = re.compile(r"[a-z]+")


class _WordIds(dict):
    """{word: id} of a vocabulary's words (list[str]), `text.UNK_ID` for any other: `Vocabulary.encode`
    one word at a time through `map`, with no Python frame per word."""

    def __init__(self, words):
        super().__init__(zip(words, range(len(words))))

    def __missing__(self, word):
        return text.UNK_ID


def normalized_captions(raw_captions):
    """`text.normalize_caption` of each caption (iterable of str -> iterator of list[str]), with
    a fast path for ASCII captions that gives the same words."""
    return (_ASCII_WORDS.findall(raw.lower()) if raw.isascii() else text.normalize_caption(raw)
            for raw in raw_captions)


def references_by_image(normalized, counts):
    """Normalized captions (list of list[str], image after image) grouped by image, `counts[i]`
    (int array) of image i, the wordless ones left out: list over the images of list of list[str]."""
    starts = np.cumsum(counts) - counts
    return [[words for words in normalized[start:start + count] if words]
            for start, count in zip(starts.tolist(), np.asarray(counts).tolist())]


def usable_images(out_dir, split, image_ids, dataset=None, *, failed_ids=None, vocabulary=None):
    """The images of `split` every stage uses: training, validation, fine-tuning and evaluation alike.

    The rule: an image is usable when extraction did not fail on it (it is not listed in
    extract_errors.json), it has a row in features.h5, and at least one of its captions
    keeps a word after normalization (a caption without one is nothing to train on or to
    score against). An image that extraction did not list but that has no row means the
    cache is incomplete: ArtifactError, naming the fix.

    Args:
        out_dir: the run folder.
        split: "train", "val" or "test".
        image_ids: list of str, the rows of features.h5 in order (`FeatureReader.image_ids`).
        dataset: captions.json already read (`datasets.Dataset`), or None to read it.
        failed_ids: `failed_image_ids(out_dir)` already read, or None to read it.
        vocabulary: a `text.Vocabulary` to get the captions as word ids (`caption_ids`,
            `caption_lengths`) and no `references`: no Python object per word (training's
            600k COCO captions); None for the words.
    Returns:
        UsableImages.
    """
    dataset = read_captions(out_dir) if dataset is None else dataset
    failed_ids = failed_image_ids(out_dir) if failed_ids is None else failed_ids
    row_of_image = dict(zip(image_ids, range(len(image_ids))))
    split_records = dataset.split_images(split)
    records = [record for record in split_records if record.image_id not in failed_ids]
    lacking = [record.image_id for record in records if record.image_id not in row_of_image]
    if lacking:
        raise errors.ArtifactError(
            f"{Path(out_dir) / FEATURES_FILE}: {len(lacking)} {split} image(s) of captions.json have no feature row "
            f"and are not listed in {EXTRACT_ERRORS_FILE} (e.g. {lacking[0]!r}); rerun `extract` to complete the cache"
        )
    normalized = normalized_captions(caption for record in records for caption in record.captions)
    if vocabulary is None:
        captions = list(normalized)
        word_counts = np.fromiter(map(len, captions), dtype=np.int64, count=len(captions))
    else:
        # Word ids as each caption is normalized: its words are freed at once.
        word_ids, counts, word_id = [], [], _WordIds(vocabulary.words).__getitem__
        for words in normalized:
            word_ids.extend(map(word_id, words))
            counts.append(len(words))
        word_counts = np.asarray(counts, dtype=np.int64)
    captions_of_record = np.fromiter((len(record.captions) for record in records), dtype=np.int64, count=len(records))
    image_of_caption = np.repeat(np.arange(len(records)), captions_of_record)
    with_words = np.bincount(image_of_caption[word_counts > 0], minlength=len(records))
    usable = with_words > 0
    kept_records = [record for record, keep in zip(records, usable) if keep]
    rows = np.asarray([row_of_image[record.image_id] for record in kept_records], dtype=np.int64)
    wordless_captions = int((word_counts == 0).sum())
    references = caption_ids = caption_lengths = None
    if vocabulary is None:
        references = [image_references for image_references, keep
                      in zip(references_by_image(captions, captions_of_record), usable) if keep]
    else:
        # A wordless caption adds no id (nor, then, an image all of whose captions are wordless).
        caption_lengths = word_counts[word_counts > 0]
        caption_ids = np.asarray(word_ids, dtype=np.int32)
    return UsableImages(kept_records, rows, references, len(split_records) - len(records),
                        len(records) - len(kept_records), wordless_captions, captions_per_image=with_words[usable],
                        caption_ids=caption_ids, caption_lengths=caption_lengths)


def trained_decoder_path(out_dir, decoder_file=DECODER_FILE):
    """OUT/`decoder_file` (Path); ArtifactError when no stage has written it yet."""
    path = Path(out_dir) / decoder_file
    if not path.is_file():
        raise errors.ArtifactError(f"{path}: no trained decoder; run `train` first")
    return path


def load_decoder(out_dir, decoder_file=DECODER_FILE, vocabulary_size=None):
    """A trained decoder of OUT (`models.decoder.build_decoder`'s keras.Model), uncompiled.

    decoder_file: DECODER_FILE or XE_DECODER_FILE.
    vocabulary_size: int, the words of vocab.json the decoder must predict; None: unchecked.
    Raises ArtifactError when the file is missing, unreadable or from another vocabulary.
    Call inside a distribution strategy's scope to place the variables there.
    """
    import keras

    from models import decoder  # noqa: F401  (registers the decoder's loss and metric with Keras)

    path = trained_decoder_path(out_dir, decoder_file)
    try:
        # compile=False: stages caption, fine-tune or export with it; none resumes its training.
        model = keras.saving.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as error:
        reason = " ".join(str(error).split())
        raise errors.ArtifactError(f"{path}: cannot load the decoder ({reason}); run `train` again") from None
    output_size = int(model.outputs[0].shape[-1])
    if vocabulary_size is not None and output_size != vocabulary_size:
        raise errors.ArtifactError(
            f"{path}: the decoder predicts {output_size} words but {VOCAB_FILE} has {vocabulary_size}; "
            "run `train` again after `extract`"
        )
    return model


def save_decoder(model, out_dir):
    """Writes `model` to OUT/decoder.keras under a temporary name renamed into place; returns the Path.

    A decoder trained in mixed precision is written in its float32 form (the same weights):
    the precision is a training choice (config.json records it), and evaluation, export and
    a CPU without bf16 instructions then compute exactly as for a float32-trained decoder.
    """
    from models import decoder

    path = Path(out_dir) / DECODER_FILE
    float32_model = decoder.with_dtype_policy(model, "float32")
    with io_utils.atomic_path(path, suffix=".tmp.keras") as temporary:
        _save_keras_archive(float32_model, temporary)
    if float32_model is not model:
        # A Keras model is a web of reference cycles (layers, nodes, tensors): without a full
        # collection here each save's copy would stay until Python's rare full pass, 57 MiB
        # apiece at COCO's vocabulary (docs/SCALING.md).
        del float32_model
        gc.collect()
    return path


def _save_keras_archive(model, path):
    """Writes `model` as a `.keras` archive at `path`, its weights passing through a file on disk.

    `model.save(path)` builds the weights file in memory before storing it in the archive
    whenever memory allows, as large again as the weights (44 MiB at COCO's vocabulary) at
    the moment training holds the most. Saved unzipped beside `path` and stored member by
    member, the archive holds the same files, as Keras' own low-memory path writes it.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=f"{path.name}.", dir=path.parent) as directory:
        model.save(directory, zipped=False)
        with zipfile.ZipFile(path, "w") as archive:
            for member in sorted(Path(directory).rglob("*")):
                if member.is_file():
                    archive.write(member, member.relative_to(directory).as_posix())


def read_training_history(out_dir):
    """The validation periods `train` recorded in OUT/history.json: list of dicts, [] if absent.

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


def write_training_history(out_dir, periods):
    """Writes OUT/history.json (atomically) with `periods`, the list `read_training_history` returns."""
    io_utils.write_json(Path(out_dir) / HISTORY_FILE,
                        {"format": HISTORY_FORMAT, "version": HISTORY_VERSION, "periods": periods})


def read_finetune_history(out_dir):
    """OUT/finetune_history.json as a dict, or None when absent.

    Keys (`write_finetune_history`): "source" (the decoder fine-tuning started from),
    "decoder_sha256" (of the decoder.keras it wrote, or None), "best_step",
    "best_val_cider", "initial_val_cider", "settings" (the finetune section) and "epochs"
    (one dict per epoch: epoch, step, mean_reward, loss, mean_sample_length, val_cider,
    val_bleu_4, best, seconds).
    """
    path = Path(out_dir) / FINETUNE_HISTORY_FILE
    if not path.exists():
        return None
    data = io_utils.read_json(path, "the fine-tuning history")
    if not isinstance(data, dict) or data.get("format") != FINETUNE_HISTORY_FORMAT or not isinstance(
            data.get("epochs"), list):
        raise errors.ArtifactError(f"{path}: not a fine-tuning history (expected format {FINETUNE_HISTORY_FORMAT!r})")
    return data


def write_finetune_history(out_dir, history):
    """Writes OUT/finetune_history.json (atomically): `history` holds the keys `read_finetune_history` lists."""
    io_utils.write_json(Path(out_dir) / FINETUNE_HISTORY_FILE,
                        {"format": FINETUNE_HISTORY_FORMAT, "version": FINETUNE_HISTORY_VERSION, **history})


def file_sha256(path):
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decoder_objective(out_dir):
    """"scst" when OUT/decoder.keras is the fine-tuned decoder `finetune` chose, else "xe".

    A later `train` replaces decoder.keras; the recorded digest then no longer matches.
    A fine-tuning whose best validation score was its starting point leaves the XE decoder.
    """
    out_dir = Path(out_dir)
    history = read_finetune_history(out_dir)
    decoder_path = out_dir / DECODER_FILE
    if not history or not history.get("decoder_sha256") or not decoder_path.is_file():
        return "xe"
    if history.get("best_step", 0) == 0 or file_sha256(decoder_path) != history["decoder_sha256"]:
        return "xe"
    return "scst"
