"""One typed configuration for every setting of the pipeline.

Every stage reads `OUT/config.json`, applies the command line's overrides, and writes the
result back, so the file always holds every setting that produced the artifacts beside
it. Later stages read sizes from here (and from the artifacts' own attributes) instead of
restating them.
"""

import dataclasses
import typing
from pathlib import Path

from pipeline.core import errors, io_utils
from pipeline.core.run_files import CONFIG_FILE

CONFIG_VERSION = 1


@dataclasses.dataclass
class DataConfig:
    data_dir: str = ""  # as given on the command line, made absolute
    layout: str = ""  # detected: "flickr8k", "kaggle" or "karpathy"
    image_dir: str = ""  # absolute folder the image ids are relative to
    # Kaggle layout without split lists: deterministic share of images for val and test.
    val_images: int = 1000
    test_images: int = 1000


@dataclasses.dataclass
class TextConfig:
    min_word_count: int = 5  # words seen fewer times in the training split become <unk>
    max_caption_length: int = 30  # words per caption kept for training (without <start>/<end>)


@dataclasses.dataclass
class EncoderConfig:
    name: str = "resnet50"
    weights: str = "imagenet"  # "imagenet", "random" (seeded), or a path to a .h5 weights file
    image_size: int = 224
    pooling: str = "avg"
    feature_dim: int = 2048
    batch_size: int = 32
    precision: str = "fp32"  # "fp32", "bf16", "fp16" or "auto" (fp16 on a GPU, bf16 on CPUs with AMX or AVX512-BF16, else fp32)
    feature_dtype: str = "float32"  # storage dtype in features.h5: "float32" or "float16"


@dataclasses.dataclass
class DecoderConfig:
    embedding_dim: int = 256
    units: int = 512
    dropout: float = 0.5
    image_input: str = "init_state"  # "init_state" (h0, c0 from the image) or "first_step" (measured: README)
    vocab_size: int = 0  # set by training from vocab.json


@dataclasses.dataclass
class TrainConfig:
    # A cap, in passes over the training captions (rounded up to whole validation periods):
    # training normally ends before it, by early stopping on validation (README).
    epochs: int = 200
    # 128: on a 2-core CPU, twice the captions/s of 64 (benchmarks/bench_train.py, README).
    batch_size: int = 128
    learning_rate: float = 1e-3  # the peak rate, reached at the end of the warm-up
    lr_schedule: str = "plateau"  # "plateau" (warm-up, then cuts when validation stalls) or "cosine" (over the cap)
    warmup_steps: int = 100  # optimizer steps of linear warm-up from learning_rate / warmup_steps
    clipnorm: float = 5.0
    # Sizes in optimizer steps, so they mean the same on 2,400 captions as on 600k.
    validate_every_steps: int = 200  # one validation period (Keras' epoch)
    patience_steps: int = 1000  # stop when the selected score has not improved for this many steps
    reduce_lr_patience_steps: int = 400  # "plateau": cut the rate after this many steps without improvement
    reduce_lr_factor: float = 0.5
    select_on: str = "cider"  # "cider" (greedy validation CIDEr-D) or "loss" (validation loss)
    validation_images: int = 1000  # val images captioned for CIDEr-D each period (the first ones), 0 = all
    validation_beam_size: int = 1  # 1: greedy validation captions; more: beam search (slower)
    strategy: str = "default"  # "default", "mirrored" or "multiworker"
    max_cache_memory_gb: float = 4.0  # larger caches stream from HDF5 instead of loading whole


@dataclasses.dataclass
class FinetuneConfig:
    """Self-critical fine-tuning on CIDEr-D (`finetune`); defaults follow the reference implementation."""

    epochs: int = 20  # a cap: early stopping on validation CIDEr-D usually ends the run first
    learning_rate: float = 5e-5  # Adam, no decay (ruotianluo/self-critical.pytorch)
    samples: int = 5  # captions sampled per image
    baseline: str = "mean"  # "mean" (the other samples' mean reward, Luo 2020) or "greedy" (Rennie 2017)
    batch_size: int = 32  # images per step (samples x batch_size captions)
    clipnorm: float = 5.0
    # Epochs without a better validation CIDEr-D. Self-critical training often dips below its
    # starting point for its first epochs; on the demo's alternate frames (12 steps per epoch)
    # 3 stopped it before its first gain (README).
    early_stopping_patience: int = 5
    checkpoint_steps: int = 50  # steps between resumable checkpoints (and one at every epoch end)
    validation_images: int = 0  # validation images scored each epoch; 0 = all
    strategy: str = "default"  # "default", "mirrored" or "multiworker"


@dataclasses.dataclass
class DecodeConfig:
    beam_size: int = 3
    max_length: int = 20  # generated words, without <start>/<end>
    length_penalty: float = 0.7  # score = log p / length ** length_penalty; 0 turns it off
    no_repeat_ngram_size: int = 0  # > 0 forbids repeating any n-gram of this size


@dataclasses.dataclass
class PipelineConfig:
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)

    def to_dict(self):
        return {"version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data, source="config"):
        """Builds a config from a dict; unknown or mistyped fields raise PipelineError naming them."""
        data = dict(data)
        data.pop("version", None)
        return _from_dict(cls, data, source)

    def replace(self, overrides):
        """Returns a copy with `overrides` applied: {"section.field": value} or {"seed": value}.

        None values are ignored, so argparse defaults of None leave the config alone.
        """
        data = self.to_dict()
        for dotted, value in overrides.items():
            if value is None:
                continue
            target = data
            *sections, name = dotted.split(".")
            for section in sections:
                target = target[section]
            if name not in target:
                raise errors.PipelineError(f"unknown setting {dotted!r}")
            target[name] = value
        return PipelineConfig.from_dict(data)

    def save(self, out_dir):
        io_utils.write_json(Path(out_dir) / CONFIG_FILE, self.to_dict())

    @classmethod
    def load(cls, out_dir, required=True):
        """Reads OUT/config.json; a fresh default config if it is absent and not required."""
        path = Path(out_dir) / CONFIG_FILE
        if not path.exists() and not required:
            return cls()
        return cls.from_dict(io_utils.read_json(path, "the run's configuration"), source=str(path))


# Settings that no longer exist, dropped when an older config.json is read: training's
# epoch-counted patiences became step-counted ones (train.patience_steps, ...).
RETIRED_FIELDS = {"TrainConfig": ("early_stopping_patience", "reduce_lr_patience")}


def load_run_config(out_dir, overrides, earlier_stages):
    """OUT/config.json with `overrides` applied, for a stage that needs `earlier_stages` run first.

    Args:
        out_dir: Path of the run folder.
        overrides: {"section.field": value} (None values ignored).
        earlier_stages: str naming what must have run, e.g. "`extract` and `train`" (for the message).
    Raises:
        ArtifactError: no OUT/config.json.
    """
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise errors.ArtifactError(f"{path}: no run configuration; run {earlier_stages} into {out_dir} first")
    return PipelineConfig.load(out_dir).replace(overrides)


def _from_dict(cls, data, source):
    hints = typing.get_type_hints(cls)
    data = dict(data)
    for name in RETIRED_FIELDS.get(cls.__name__, ()):
        data.pop(name, None)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise errors.PipelineError(f"{source}: unknown setting(s) {', '.join(unknown)} in {cls.__name__}")
    values = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise errors.PipelineError(f"{source}: field {name!r} must be an object")
            values[name] = _from_dict(kind, value, source)
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise errors.PipelineError(
                f"{source}: field {cls.__name__}.{name} must be {kind.__name__}, got {value!r}"
            )
        else:
            values[name] = value
    return cls(**values)
