"""Caption metrics on tiny corpora whose scores can be worked out by hand."""

import math

import numpy as np
import pytest

from pipeline.evaluation import metrics

# Two images whose captions share no word, so every n-gram of one image's references is
# absent from the other's: CIDEr's document frequency is 1 of 2 images for all of them.
REFERENCES = [
    [["a", "dog", "runs", "on", "grass"]],
    [["two", "cats", "sleep", "inside", "today"]],
]


def test_identical_captions_score_one_and_cider_ten():
    scores, notes = metrics.caption_metrics(REFERENCES, [REFERENCES[0][0], REFERENCES[1][0]], include_meteor=False)
    assert notes == []
    for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4"):
        assert scores[name] == pytest.approx(1.0)
    # Every n-gram order 1..4 exists in the 5-word captions and the TF-IDF vectors of
    # candidate and reference are equal: cosine 1 for each order, mean 1, times 10.
    assert scores["cider"] == pytest.approx(10.0)
    assert "meteor" not in scores


def test_no_shared_word_scores_zero():
    hypotheses = [["blue", "kites", "fly"], ["red", "boats", "float"]]
    scores = metrics.bleu_scores(REFERENCES, hypotheses)
    assert scores == {"bleu_1": 0.0, "bleu_2": 0.0, "bleu_3": 0.0, "bleu_4": 0.0}
    assert metrics.cider_score(REFERENCES, hypotheses) == 0.0


def test_partial_match_bleu_by_hand():
    references = [[["a", "dog", "sleeps", "on", "sand"]]]
    hypotheses = [["a", "dog", "runs", "on", "grass"]]
    scores = metrics.bleu_scores(references, hypotheses)
    # Unigrams: a, dog, on of 5 match -> p1 = 3/5. Bigrams: only "a dog" of 4 -> p2 = 1/4.
    # Equal lengths -> brevity penalty 1. No trigram matches -> BLEU-3 is 0 (nltk stands
    # in the smallest positive float for the empty count, hence ~1e-103 rather than 0).
    assert scores["bleu_1"] == pytest.approx(0.6)
    assert scores["bleu_2"] == pytest.approx(math.sqrt(0.6 * 0.25))
    assert scores["bleu_3"] == pytest.approx(0.0, abs=1e-12)


def test_bleu_brevity_penalty_and_closest_reference():
    # The two-word candidate is fully matched (p1 = 1); the closest reference length is
    # 3 (not 6), so BP = exp(1 - 3/2).
    references = [[["a", "dog", "runs"], ["a", "big", "brown", "dog", "runs", "fast"]]]
    scores = metrics.bleu_scores(references, [["a", "dog"]])
    assert scores["bleu_1"] == pytest.approx(math.exp(1 - 3 / 2))


def test_cider_counts_document_frequency_over_images():
    # "a" is in both images' references, so its IDF is log(2/2) = 0; "cat" and "sits" keep
    # log 2. The 3-word caption has no 4-gram, so orders 1..3 give cosine 1 and order 4
    # gives 0: score = 10 * 3/4 for the second image; the first image's candidate shares
    # no word with its reference and scores 0. Corpus mean = 7.5 / 2.
    references = [[["a", "dog", "runs", "on", "grass"]], [["a", "cat", "sits"]]]
    hypotheses = [["blue", "kites"], ["a", "cat", "sits"]]
    assert metrics.cider_score(references, hypotheses) == pytest.approx(7.5 / 2)


def test_distinct_captions():
    assert metrics.distinct_captions(["a dog"] * 4) == pytest.approx(1 / 4)
    assert metrics.distinct_captions(["a dog", "a cat", "a dog", "two birds"]) == pytest.approx(3 / 4)
    assert metrics.distinct_captions([["a", "dog"], ["a", "dog"]]) == pytest.approx(1 / 2)
    with pytest.raises(ValueError):
        metrics.distinct_captions([])


@pytest.mark.parametrize("count", [2, 3, 10, 101])
def test_derangement_moves_every_index_and_is_seeded(count):
    permutation = metrics.derangement(count, seed=7)
    assert sorted(permutation.tolist()) == list(range(count))
    assert not np.any(permutation == np.arange(count))
    np.testing.assert_array_equal(permutation, metrics.derangement(count, seed=7))
    with pytest.raises(ValueError):
        metrics.derangement(1, seed=0)


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="2 reference sets for 1 hypotheses"):
        metrics.bleu_scores(REFERENCES, [["a"]])
    with pytest.raises(ValueError, match="image 1 has no reference"):
        metrics.cider_score([[["a"]], []], [["a"], ["b"]])


def test_meteor_without_java_is_left_out_with_a_note(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    scores, notes = metrics.caption_metrics(REFERENCES, [REFERENCES[0][0], REFERENCES[1][0]])
    assert "meteor" not in scores
    assert scores["bleu_4"] == pytest.approx(1.0)
    assert notes == ["METEOR left out: the Java scorer failed (OSError: no `java` on PATH)"]


def test_caption_shape_counts_bad_endings_repeats_length_and_words():
    hypotheses = [
        ["a", "dog", "runs", "on", "the"],  # ends in a function word
        ["a", "dog", "dog", "runs"],  # a word twice in a row
        ["two", "cats", "sleep"],
        [],  # neither
    ]
    shape = metrics.caption_shape(hypotheses)
    assert shape == {"bad_endings": 0.25, "immediate_repeats": 0.25, "mean_length": 3.0, "vocabulary_used": 8}
    assert metrics.caption_shape([["a", "cat", "is"], ["the", "cats", "are"]])["bad_endings"] == 1.0
    with pytest.raises(ValueError):
        metrics.caption_shape([])
