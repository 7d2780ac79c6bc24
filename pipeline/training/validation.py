"""Validation on caption quality, and the stopping state that training and fine-tuning share.

`ValidationScorer` captions the images of one split greedily (beam 1, batched, in the
graph: `models.captioner.FeatureCaptioner`, the decoding that evaluation and the
SavedModel use) and scores the captions with corpus CIDEr-D and BLEU-4 against the
split's own references (`pipeline.evaluation.metrics`, the test metrics' code, so a validation
CIDEr-D is comparable to the test one on a split of the same size). `EarlyStopper` is the
plain-Python stopping state (best score, step of the best, patience in optimizer steps)
whose `state_dict` goes into checkpoints, so a resumed run stops where an uninterrupted
one would.

Determinism: greedy decoding of the same vectors with the same weights gives the same
captions, and the metrics are pure Python on them, so every worker of a distributed run
that calls the scorer on the same split gets the same score. Workers on machines of
different kinds could still round differently, so a multi-worker run goes by the chief's
scores alone (`chief_scores`): the chief decides, and every worker takes its decision.
"""

import math
import time
from pathlib import Path

import numpy as np

from pipeline.core import errors
from pipeline.data import run_folder, text
from pipeline.evaluation import metrics

DEFAULT_BATCH_SIZE = 256
STOPPER_MODES = ("max", "min")


class ValidationScorer:
    """Greedy-captions a split's images in the graph (models.captioner.FeatureCaptioner, beam 1,
    batched) and scores them with corpus CIDEr-D (pycocoevalcap, df from the split's own refs, as the
    test metric) plus BLEU-4."""

    def __init__(self, image_features, references, words, max_length, batch_size=DEFAULT_BATCH_SIZE, beam_size=1,
                 length_penalty=0.0):
        """
        Args:
            image_features: np.ndarray float32 [N, F], one vector per image.
            references: list over the N images of list of captions, each a list[str] of
                words (`pipeline.data.text.normalize_caption`); every image has at least one.
            words: list[str], the vocabulary (index = id, special tokens first).
            max_length: int >= 1, generated words at most (`decode.max_length`).
            batch_size: int >= 1, images per call of the captioner.
            beam_size: int >= 1; 1 (the default) is greedy search, more a beam search as
                the test captions use (several times the cost).
            length_penalty: float >= 0, for beam search (`decode.length_penalty`).
        """
        image_features = np.asarray(image_features, dtype=np.float32)
        if image_features.ndim != 2 or len(image_features) != len(references):
            raise ValueError(
                f"image_features must be [N, F] with N = {len(references)} references, got {image_features.shape}"
            )
        if not len(references):
            raise ValueError("no images to validate on")
        if any(not captions for captions in references):
            raise ValueError("every validation image needs at least one reference caption")
        if max_length < 1 or batch_size < 1 or beam_size < 1:
            raise ValueError(f"max_length, batch_size and beam_size must be >= 1, got {max_length}, {batch_size} "
                             f"and {beam_size}")
        self.image_features = image_features
        self.references = [[list(words_) for words_ in captions] for captions in references]
        self.words = list(words)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.beam_size = int(beam_size)
        self.length_penalty = float(length_penalty)
        self._model = None
        self._captioner = None

    def __len__(self):
        return len(self.image_features)

    def captions(self, decoder_model):
        """The captions of the split (greedy unless beam_size > 1): list over the N images of list[str] words."""
        if decoder_model is not self._model:
            # One captioner (one traced tf.function) per model: the weights it reads are the
            # model's variables, so later calls see the training's updates without a retrace.
            from models import captioner
            from pipeline.core import config as config_module

            decode_config = config_module.DecodeConfig(
                beam_size=self.beam_size, max_length=self.max_length, length_penalty=self.length_penalty)
            self._captioner = captioner.FeatureCaptioner(
                decoder_model, self.words, decode_config,
                start_id=text.START_ID, end_id=text.END_ID, unk_id=text.UNK_ID, pad_id=text.PAD_ID,
            )
            self._model = decoder_model
        generated = []
        for start in range(0, len(self.image_features), self.batch_size):
            result = self._captioner.caption_features(self.image_features[start:start + self.batch_size])
            generated.extend(value.decode("utf-8").split() for value in result["captions"].numpy())
        return generated

    def __call__(self, decoder_model):
        """Scores `decoder_model` (a `models.decoder.build_decoder` model) on the split.

        Returns:
            dict: "val_cider" (float >= 0, corpus CIDEr-D), "val_bleu_4" (float in [0, 1]),
            "val_distinct" (share of distinct captions), "val_seconds" (wall time of
            captioning and scoring).
        """
        started = time.monotonic()
        hypotheses = self.captions(decoder_model)
        cider = metrics.cider_score(self.references, hypotheses)
        bleu_4 = metrics.bleu_scores(self.references, hypotheses)["bleu_4"]
        return {
            "val_cider": cider,
            "val_bleu_4": bleu_4,
            "val_distinct": metrics.distinct_captions(hypotheses),
            "val_seconds": round(time.monotonic() - started, 3),
        }


def build_validation_scorer(out_dir, config, split="val", max_images=None, batch_size=DEFAULT_BATCH_SIZE,
                            beam_size=1, data=None):
    """The ValidationScorer of one split of OUT, on its first `max_images` usable images.

    The images are the split's usable ones (`run_folder.usable_images`: extraction did not
    fail on them, they have a feature row and a caption with a word). `max_images` (int or
    None) keeps the first of them in captions.json order, so the subset is the same in every
    run and every process. `config` supplies `decode.max_length` (and `decode.length_penalty`
    for `beam_size` > 1) and the encoder settings the cache is checked against.
    `data`: the `inputs.TrainingData` of this run (split "val" only): its vocabulary, val
    images and feature rows are used, and no file is read again; None reads captions.json,
    vocab.json and only the needed rows of features.h5.
    Raises ArtifactError (damaged or foreign cache, missing rows) or PipelineError (no
    usable image in the split).
    """
    out_dir = Path(out_dir)
    if max_images is not None and max_images < 1:
        raise errors.PipelineError(f"validation max_images must be at least 1, got {max_images!r}")
    if data is not None and split != "val":
        raise ValueError(f"training data holds the val split, not {split!r}")
    if data is not None:
        vocabulary, images = data.vocabulary, data.val_images
        _check_usable(out_dir, split, images)
        image_features = data.feature_rows.read(images.rows[:max_images])
    else:
        vocabulary = run_folder.read_vocabulary(out_dir)
        with run_folder.open_feature_cache(out_dir, config.encoder) as reader:
            images = run_folder.usable_images(out_dir, split, reader.image_ids)
            _check_usable(out_dir, split, images)
            image_features = reader.read(images.rows[:max_images])
    return ValidationScorer(image_features, images.references[:max_images], vocabulary.words,
                            config.decode.max_length, batch_size, beam_size=beam_size,
                            length_penalty=config.decode.length_penalty)


def _check_usable(out_dir, split, images):
    if not len(images):
        raise errors.PipelineError(
            f"{out_dir / run_folder.CAPTIONS_FILE}: the {split} split has no image with features and a caption "
            "to validate on"
        )


class EarlyStopper:
    """Plain-Python stopping state: best score, step of the best, patience in optimizer steps.

    `update(step, score)` after each validation: an improvement is a score better than the
    best by more than `min_delta` (higher for mode "max", lower for "min"; NaN never
    improves). Training should stop once `patience_steps` optimizer steps have passed
    since the best without a new one. Example with patience 200 and validation every 100
    steps, scores 1, 2, 2, 2 at steps 100..400: improved at 100 and 200, stop at 400.
    """

    def __init__(self, patience_steps, mode="max", min_delta=0.0):
        if mode not in STOPPER_MODES:
            raise ValueError(f"mode must be one of {', '.join(STOPPER_MODES)}, got {mode!r}")
        if patience_steps < 1:
            raise ValueError(f"patience_steps must be at least 1, got {patience_steps!r}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.patience_steps = int(patience_steps)
        self.mode = mode
        self.min_delta = float(min_delta)
        self.best = None  # float, or None before the first finite score
        self.best_step = None  # int, the step of `best`
        self.steps_since_best = 0  # steps from the best to the last update
        self.last_step = None

    def is_better(self, score):
        """Whether `score` (float) would count as an improvement now."""
        if score is None or not math.isfinite(score):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return score > self.best + self.min_delta
        return score < self.best - self.min_delta

    def update(self, step, score):
        """Records the validation score at optimizer step `step` (int, increasing).

        Returns:
            (improved, should_stop): bools.
        """
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"validation steps must increase: {step} after {self.last_step}")
        self.last_step = step
        improved = self.is_better(score)
        if improved:
            self.best, self.best_step = float(score), step
        reference = self.best_step if self.best_step is not None else 0
        self.steps_since_best = step - reference
        return improved, self.steps_since_best >= self.patience_steps

    def state_dict(self):
        """The state as a JSON-able dict (for checkpoints and `--resume`)."""
        return {
            "patience_steps": self.patience_steps, "mode": self.mode, "min_delta": self.min_delta,
            "best": self.best, "best_step": self.best_step, "steps_since_best": self.steps_since_best,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state):
        """Restores what `state_dict` gave; the settings (patience, mode, min_delta) stay this
        object's own, so a resumed run may extend the patience."""
        if not isinstance(state, dict) or state.get("mode", self.mode) != self.mode:
            raise ValueError(f"not an EarlyStopper state for mode {self.mode!r}: {state!r}")
        best, best_step, last_step = state.get("best"), state.get("best_step"), state.get("last_step")
        self.best = None if best is None else float(best)
        self.best_step = None if best_step is None else int(best_step)
        self.last_step = None if last_step is None else int(last_step)
        self.steps_since_best = int(state.get("steps_since_best", 0))


def chief_scores(strategy, scores):
    """The chief's validation scores, on every worker of a multi-worker run.

    Args:
        strategy: the run's tf.distribute strategy.
        scores: {name: float} this worker computed (`ValidationScorer.__call__`).
    Returns:
        `scores` itself under any other strategy; under `MultiWorkerMirroredStrategy` a new
        dict with the same names and the values of global replica 0, which lives on the
        chief (worker 0, or the "chief" task), sent to all workers in one collective. So
        every worker selects, cuts the learning rate and stops on the chief's numbers, and
        all stop at the same step even if their own scores differ in the last bit.
    """
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or not scores:
        return scores
    names = sorted(scores)
    values = tf.constant([float(scores[name]) for name in names], tf.float64)

    def replica_value(values):
        context = tf.distribute.get_replica_context()
        # tf.where, not a product: a NaN elsewhere must not reach the chief's values.
        return tf.where(tf.equal(context.replica_id_in_sync_group, 0), values, tf.zeros_like(values))

    @tf.function  # the collective strategy runs eagerly only with a warning
    def broadcast(values):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_value, args=(values,)), axis=None)

    return dict(zip(names, (float(value) for value in broadcast(values).numpy())))
