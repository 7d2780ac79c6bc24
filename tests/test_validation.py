"""Validation on caption quality (`ValidationScorer`) and the stopping state (`EarlyStopper`)."""

import json

import numpy as np
import pytest

from pipeline import evaluate
from pipeline.core import config as config_module
from pipeline.core import errors, io_utils
from pipeline.data import run_folder, text
from pipeline.evaluation import metrics
from pipeline.training import validation


def _run_stopper(stopper, scores, every=100, start=0):
    """Feeds scores at steps start+every, start+2*every...; returns the (improved, stop) pairs."""
    return [stopper.update(start + every * (index + 1), score) for index, score in enumerate(scores)]


def test_stopper_stops_once_patience_steps_pass_without_a_new_best():
    stopper = validation.EarlyStopper(patience_steps=300)
    decisions = _run_stopper(stopper, [1.0, 2.0, 1.5, 2.0, 3.0, 2.9, 2.9, 2.9])
    assert [improved for improved, _ in decisions] == [True, True, False, False, True, False, False, False]
    # The best at step 500 (an equal score at 400 is no improvement); 300 steps later
    # (step 800) without a better one: stop there, not before.
    assert [stop for _, stop in decisions] == [False] * 7 + [True]
    assert (stopper.best, stopper.best_step, stopper.steps_since_best) == (3.0, 500, 300)


def test_stopper_min_mode_min_delta_and_nan():
    stopper = validation.EarlyStopper(patience_steps=2, mode="min", min_delta=0.1)
    decisions = _run_stopper(stopper, [float("nan"), 1.0, 0.95, 0.8, float("inf")], every=1)
    # NaN and inf never improve; 0.95 is not 0.1 below 1.0; with no best yet the count starts at step 0.
    assert decisions == [(False, False), (True, False), (False, False), (True, False), (False, False)]
    assert stopper.best == 0.8 and stopper.best_step == 4
    assert stopper.update(6, 0.9) == (False, True)
    with pytest.raises(ValueError, match="must increase"):
        stopper.update(6, 0.1)
    with pytest.raises(ValueError, match="mode"):
        validation.EarlyStopper(10, mode="up")


def test_stopper_state_resumes_with_its_counters():
    scores = [0.5, 0.7, 0.6, 0.65, 0.8, 0.7, 0.75, 0.7, 0.79, 0.6]
    uninterrupted = validation.EarlyStopper(patience_steps=400, min_delta=0.01)
    expected = _run_stopper(uninterrupted, scores)

    first = validation.EarlyStopper(patience_steps=400, min_delta=0.01)
    decisions = _run_stopper(first, scores[:6])
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = validation.EarlyStopper(patience_steps=400, min_delta=0.01)
    resumed.load_state_dict(saved)
    assert (resumed.best, resumed.best_step, resumed.steps_since_best) == (0.8, 500, 100)
    decisions += _run_stopper(resumed, scores[6:], start=600)
    assert decisions == expected
    assert decisions.index((False, True)) == 8  # step 900: 400 steps after the best at 500
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_scorer_on_a_trained_run_matches_the_test_metrics_code_and_is_deterministic(trained_out):
    config = config_module.PipelineConfig.load(trained_out)
    scorer = validation.build_validation_scorer(trained_out, config)
    model = run_folder.load_decoder(trained_out)
    first, second = scorer(model), scorer(model)
    assert set(first) >= {"val_cider", "val_bleu_4", "val_seconds"}
    assert first["val_cider"] == second["val_cider"] and first["val_bleu_4"] == second["val_bleu_4"]
    assert 0.0 <= first["val_cider"] <= 10.0 and 0.0 <= first["val_bleu_4"] <= 1.0
    assert first["val_seconds"] >= 0

    # The same numbers as evaluation's code path, beam 1, on the val images in captions.json order.
    val_records = [record for record in run_folder.read_captions(trained_out).split_images("val")]
    assert len(scorer) == len(val_records) > 0
    greedy = config.replace({"decode.beam_size": 1})
    captioner = evaluate.load_feature_captioner(trained_out, greedy, text.Vocabulary.load(trained_out / text.VOCAB_FILE))
    generated, _ = evaluate.caption_rows(captioner, scorer.image_features)
    references = [[text.normalize_caption(caption) for caption in record.captions] for record in val_records]
    hypotheses = [caption.split() for caption in generated]
    assert scorer.captions(model) == hypotheses
    assert first["val_cider"] == pytest.approx(metrics.cider_score(references, hypotheses), abs=1e-12)
    assert first["val_bleu_4"] == pytest.approx(metrics.bleu_scores(references, hypotheses)["bleu_4"], abs=1e-12)

    # Batching does not change the captions; max_images keeps the first images.
    small_batches = validation.ValidationScorer(scorer.image_features, scorer.references, scorer.words,
                                                scorer.max_length, batch_size=3)
    assert small_batches(model)["val_cider"] == first["val_cider"]
    capped = validation.build_validation_scorer(trained_out, config, max_images=4)
    np.testing.assert_array_equal(capped.image_features, scorer.image_features[:4])
    assert capped.captions(model) == hypotheses[:4]


def test_scorer_of_a_split_without_usable_images_is_a_clear_error(trained_out, copy_run):
    out = copy_run(trained_out)
    config = config_module.PipelineConfig.load(out)
    with pytest.raises(errors.PipelineError, match="max_images"):
        validation.build_validation_scorer(out, config, max_images=0)
    val_ids = [record.image_id for record in run_folder.read_captions(out).split_images("val")]
    io_utils.write_json(out / run_folder.EXTRACT_ERRORS_FILE,
                        [{"image_id": image_id, "error": "x"} for image_id in val_ids])
    with pytest.raises(errors.PipelineError, match="the val split has no image with features"):
        validation.build_validation_scorer(out, config)
