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
# The choices of settings that name one of several ways.
FEATURE_DTYPES = ("float32", "float16")
STRATEGIES = ("default", "mirrored", "multiworker")  # train.strategy, finetune.strategy
LR_SCHEDULES = ("plateau", "cosine")
SELECT_ON = ("cider", "loss")
BASELINES = ("mean", "greedy")


def _check(checks):
    """Raises PipelineError "<message>, got <value>" for the first (valid, message, value) that is not valid."""
    for valid, message, value in checks:
        if not valid:
            raise errors.PipelineError(f"{message}, got {value!r}")


@dataclasses.dataclass
class DataConfig:
    """Where the dataset is; its split sizes are checked against the data (`datasets.deterministic_split`)."""

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

    def check(self):
        """Raises PipelineError for a setting `train` cannot use."""
        _check([(self.max_caption_length >= 1, "text.max_caption_length (--max-caption-length) must be at least 1",
                 self.max_caption_length)])


@dataclasses.dataclass
class EncoderConfig:
    name: str = "resnet50"
    weights: str = "imagenet"  # "imagenet", "random" (seeded), or a path to a .h5 weights file
    image_size: int = 224
    pooling: str = "avg"
    feature_dim: int = 2048
    batch_size: int = 0  # images per encoder call; 0: sized for the device (device.extraction_batch_size)
    # "fp32", "bf16", "fp16" or "auto": fp16 on a GPU, bf16 on CPUs with AMX or AVX512-BF16, else
    # fp32. Saved resolved. auto by default: on an AVX512-BF16 CPU bf16 features have a cosine of
    # 0.99999 to fp32's, and the demo's decoders trained on them scored no lower (docs/GPU.md).
    precision: str = "auto"
    feature_dtype: str = "float32"  # storage dtype in features.h5: "float32" or "float16"

    def check(self):
        """Raises PipelineError for a setting `extract` cannot use (an unknown precision included)."""
        from models import encoder
        from pipeline.core import device

        if self.name != encoder.ENCODER_NAME:
            raise errors.PipelineError(f"encoder.name must be {encoder.ENCODER_NAME!r}, got {self.name!r}")
        if self.pooling != "avg":
            raise errors.PipelineError(f"encoder.pooling must be 'avg', got {self.pooling!r}")
        if self.feature_dim != encoder.FEATURE_DIM:
            raise errors.PipelineError(
                f"encoder.feature_dim must be {encoder.FEATURE_DIM} for ResNet50, got {self.feature_dim}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise errors.PipelineError(
                f"encoder.feature_dtype must be {' or '.join(FEATURE_DTYPES)}, got {self.feature_dtype!r}")
        if self.batch_size < 0:
            raise errors.PipelineError(f"encoder.batch_size must be positive (or 0: sized for the device), "
                                       f"got {self.batch_size}")
        device.resolve_precision(self.precision)


@dataclasses.dataclass
class DecoderConfig:
    embedding_dim: int = 256
    units: int = 512
    dropout: float = 0.5
    image_input: str = "init_state"  # "init_state" (h0, c0 from the image) or "first_step" (measured: docs/EXPERIMENTS.md)
    vocab_size: int = 0  # set by training from vocab.json

    def check(self):
        """Raises PipelineError for a shape `train` cannot build (the image inputs are `models.decoder`'s)."""
        from models import decoder

        _check([
            (0.0 <= self.dropout < 1.0, "decoder.dropout (--dropout) must be in [0, 1)", self.dropout),
            (self.units >= 1, "decoder.units (--units) must be at least 1", self.units),
            (self.embedding_dim >= 1, "decoder.embedding_dim (--embedding-dim) must be at least 1", self.embedding_dim),
            (self.image_input in decoder.IMAGE_INPUT_MODES,
             f"decoder.image_input (--image-input) must be {' or '.join(decoder.IMAGE_INPUT_MODES)}", self.image_input),
        ])


@dataclasses.dataclass
class TrainConfig:
    # A cap, in passes over the training captions (rounded up to whole validation periods):
    # training normally ends before it, by early stopping on validation (docs/EXPERIMENTS.md).
    epochs: int = 200
    # 128: on a 2-core CPU, twice the captions/s of 64 (benchmarks/bench_train.py).
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
    # Val images (the first ones) whose captions the validation loss is computed on each period, 0 = all:
    # a period's validation costs the same whatever the val split's size (docs/SCALING.md).
    validation_loss_images: int = 500
    strategy: str = "default"  # "default", "mirrored" or "multiworker"
    max_cache_memory_gb: float = 4.0  # larger caches stream from HDF5 instead of loading whole
    # The decoder's arithmetic: "fp32", "bf16", "fp16" (Keras mixed precision, loss scaling in
    # fp16) or "auto" (fp16 on a GPU, bf16 on CPUs with AMX or AVX512-BF16, else fp32); saved
    # resolved. auto by default: at Flickr8k size bf16 trains 1.36x as many captions/s here
    # (1.23-1.58x over runs), with the demo's test CIDEr-D 2.2% below fp32's and validation 4%
    # above (means of 4 seeds, docs/GPU.md).
    precision: str = "auto"
    device: str = ""  # recorded by `train`, not a setting: what it computed on (device.device_record)

    def check(self):
        """Raises PipelineError for a setting `train` cannot use."""
        _check([
            (self.epochs >= 1, "train.epochs (--epochs) must be at least 1", self.epochs),
            (self.batch_size >= 1, "train.batch_size (--batch-size) must be at least 1", self.batch_size),
            (self.learning_rate > 0, "train.learning_rate (--learning-rate) must be positive", self.learning_rate),
            (self.lr_schedule in LR_SCHEDULES,
             f"train.lr_schedule (--lr-schedule) must be one of {', '.join(LR_SCHEDULES)}", self.lr_schedule),
            (self.warmup_steps >= 0, "train.warmup_steps (--warmup-steps) must be >= 0", self.warmup_steps),
            (self.validate_every_steps >= 1, "train.validate_every_steps (--validate-every-steps) must be at least 1",
             self.validate_every_steps),
            (self.patience_steps >= 1, "train.patience_steps (--patience-steps) must be at least 1",
             self.patience_steps),
            (self.reduce_lr_patience_steps >= 1, "train.reduce_lr_patience_steps must be at least 1",
             self.reduce_lr_patience_steps),
            (0.0 < self.reduce_lr_factor < 1.0, "train.reduce_lr_factor must be in (0, 1)", self.reduce_lr_factor),
            (self.select_on in SELECT_ON, f"train.select_on (--select-on) must be one of {', '.join(SELECT_ON)}",
             self.select_on),
            (self.validation_beam_size >= 1, "train.validation_beam_size must be at least 1",
             self.validation_beam_size),
            (self.validation_images >= 0, "train.validation_images (--validation-images) must be >= 0 (0: all)",
             self.validation_images),
            (self.validation_loss_images >= 0, "train.validation_loss_images (--validation-loss-images) must be >= 0 (0: all)",
             self.validation_loss_images),
            (self.clipnorm > 0, "train.clipnorm must be positive", self.clipnorm),
            (self.max_cache_memory_gb > 0, "train.max_cache_memory_gb must be positive", self.max_cache_memory_gb),
            (self.strategy in STRATEGIES, f"train.strategy (--strategy) must be one of {', '.join(STRATEGIES)}",
             self.strategy),
        ])
        from pipeline.core import device

        device.resolve_precision(self.precision, setting="train.precision (--precision)")


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
    # 3 stopped it before its first gain (docs/EXPERIMENTS.md).
    early_stopping_patience: int = 5
    checkpoint_steps: int = 50  # steps between resumable checkpoints (and one at every epoch end)
    validation_images: int = 0  # validation images scored each epoch; 0 = all
    strategy: str = "default"  # "default", "mirrored" or "multiworker"
    # As train.precision, for the fine-tuning steps. auto by default: bf16 steps run 1.22x as many
    # captions/s at Flickr8k size, and from the same decoders (4 seeds, 2 caption sets) reached a
    # test CIDEr-D 0.8% and 1.3% above fp32's, validation 1.7% above and 2.5% below (docs/GPU.md).
    precision: str = "auto"
    device: str = ""  # recorded by `finetune`, not a setting: what it computed on

    def check(self):
        """Raises PipelineError for a setting `finetune` cannot use."""
        _check([
            (self.epochs >= 1, "finetune.epochs (--epochs) must be at least 1", self.epochs),
            (self.learning_rate > 0, "finetune.learning_rate (--learning-rate) must be positive", self.learning_rate),
            (self.baseline in BASELINES, f"finetune.baseline (--baseline) must be one of {', '.join(BASELINES)}",
             self.baseline),
            (self.samples >= (2 if self.baseline == "mean" else 1),
             "finetune.samples (--samples) must be at least 2 with the mean baseline (1 with greedy)", self.samples),
            (self.batch_size >= 1, "finetune.batch_size (--batch-size) must be at least 1", self.batch_size),
            (self.clipnorm > 0, "finetune.clipnorm must be positive", self.clipnorm),
            (self.early_stopping_patience >= 1, "finetune.early_stopping_patience must be at least 1",
             self.early_stopping_patience),
            (self.checkpoint_steps >= 1, "finetune.checkpoint_steps must be at least 1", self.checkpoint_steps),
            (self.validation_images >= 0, "finetune.validation_images must be >= 0", self.validation_images),
            (self.strategy in STRATEGIES, f"finetune.strategy (--strategy) must be one of {', '.join(STRATEGIES)}",
             self.strategy),
        ])
        from pipeline.core import device

        device.resolve_precision(self.precision, setting="finetune.precision (--precision)")


@dataclasses.dataclass
class DecodeConfig:
    beam_size: int = 3
    max_length: int = 20  # generated words, without <start>/<end>
    length_penalty: float = 0.7  # score = log p / length ** length_penalty; 0 turns it off
    no_repeat_ngram_size: int = 0  # > 0 forbids repeating any n-gram of this size

    def check(self):
        """Raises PipelineError for a setting `evaluate` and `export` cannot decode with."""
        _check([
            (self.beam_size >= 1, "decode.beam_size (--beam-size) must be at least 1", self.beam_size),
            (self.max_length >= 1, "decode.max_length (--max-length) must be at least 1", self.max_length),
            (self.length_penalty >= 0, "decode.length_penalty (--length-penalty) must be >= 0", self.length_penalty),
            (self.no_repeat_ngram_size >= 0, "decode.no_repeat_ngram_size must be >= 0", self.no_repeat_ngram_size),
        ])


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

    def check(self, *sections):
        """Raises PipelineError for the first setting a stage cannot use, in the named sections.

        sections: names of the sections the stage uses, e.g. "train", "text", "decoder".
        """
        for section in sections:
            getattr(self, section).check()

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
