"""Caption metrics on word tokens: corpus BLEU-1..4 (nltk), CIDEr-D and METEOR (pycocoevalcap).

Every metric comes from its reference library; this module only shapes our data for them.
Both sides are lists of words from `pipeline.data.text.normalize_caption` (no `<start>`/`<end>`),
so the scores do not depend on the COCO Java tokenizer, which is not used.

Shapes used throughout:
    references: list over images of list over that image's captions of list[str] words.
    hypotheses: list over images of list[str] words, one generated caption per image.

Example:
    >>> references = [[["a", "dog", "runs", "on", "grass"]], [["two", "cats", "sleep", "inside", "now"]]]
    >>> hypotheses = [["a", "dog", "runs", "on", "grass"], ["two", "cats", "sleep", "inside", "now"]]
    >>> bleu_scores(references, hypotheses)["bleu_4"]
    1.0
"""

import warnings

import numpy as np

BLEU_WEIGHTS = {
    "bleu_1": (1.0, 0.0, 0.0, 0.0),
    "bleu_2": (0.5, 0.5, 0.0, 0.0),
    "bleu_3": (1 / 3, 1 / 3, 1 / 3, 0.0),
    "bleu_4": (0.25, 0.25, 0.25, 0.25),
}


def _check_pairs(references, hypotheses):
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no captions to score")
    for index, captions in enumerate(references):
        if not captions:
            raise ValueError(f"image {index} has no reference caption")


def bleu_scores(references, hypotheses):
    """Corpus BLEU-1..4 with all references of each image (nltk's `corpus_bleu`, no smoothing).

    Args:
        references: list[list[list[str]]], see the module docstring.
        hypotheses: list[list[str]].
    Returns:
        dict "bleu_1".."bleu_4" -> float in [0, 1].
    """
    from nltk.translate import bleu_score

    _check_pairs(references, hypotheses)
    with warnings.catch_warnings():
        # nltk warns when an n-gram order has no match and the score is 0; that is the
        # correct corpus BLEU for a poor model, not a problem to report on the console.
        warnings.simplefilter("ignore", UserWarning)
        scores = bleu_score.corpus_bleu(references, hypotheses, weights=list(BLEU_WEIGHTS.values()))
    return {name: float(score) for name, score in zip(BLEU_WEIGHTS, scores)}


def _as_coco_dicts(references, hypotheses):
    """The {image index: [sentence str, ...]} dicts pycocoevalcap's scorers take."""
    gts = {index: [" ".join(words) for words in captions] for index, captions in enumerate(references)}
    res = {index: [" ".join(words)] for index, words in enumerate(hypotheses)}
    return gts, res


def cider_score(references, hypotheses):
    """Corpus CIDEr-D (pycocoevalcap's `Cider`: n = 1..4, sigma = 6, clipped, times 10).

    The document frequencies come from the references of the scored images, so the value
    depends on the whole test set: an n-gram found in every image's references weighs 0.

    Returns:
        float >= 0 (10 is a candidate equal to its references in every n-gram order).
    """
    from pycocoevalcap.cider.cider import Cider

    _check_pairs(references, hypotheses)
    gts, res = _as_coco_dicts(references, hypotheses)
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def meteor_score(references, hypotheses):
    """METEOR 1.5 through pycocoevalcap's `Meteor` (a Java subprocess, ~10 s to start).

    Returns:
        float in [0, 1].
    Raises:
        OSError, ValueError, BrokenPipeError...: Java is missing or the scorer failed; the
        caller decides whether that is fatal (`caption_metrics` leaves the metric out).
    """
    import shutil

    from pycocoevalcap.meteor.meteor import Meteor

    _check_pairs(references, hypotheses)
    # Meteor() without Java fails half-built and then raises again from its __del__.
    if shutil.which("java") is None:
        raise OSError("no `java` on PATH")
    gts, res = _as_coco_dicts(references, hypotheses)
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        # Meteor holds its lock while scoring and its __del__ takes it again: release it
        # if scoring failed half way, then stop the Java process now rather than at exit.
        if scorer.lock.locked():
            scorer.lock.release()
        process = scorer.meteor_p
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()
    return float(score)


def distinct_captions(captions):
    """Share of different captions: number of distinct strings / number of captions.

    Args:
        captions: list[str] (or list of token lists), one generated caption per image.
    Returns:
        float in (0, 1]; 1 / n when the model writes the same caption for every image.
    """
    if not captions:
        raise ValueError("no captions")
    distinct = {" ".join(caption) if isinstance(caption, list) else caption for caption in captions}
    return len(distinct) / len(captions)


def derangement(count, seed):
    """A fixed permutation of range(count) that moves every index (no fixed point).

    Used for the grounding control: image i is captioned from the features of image
    `derangement[i]`, never its own. A shuffled cycle: a random order of the indices,
    each sent to the next one in that order, is a derangement by construction.

    Args:
        count: int >= 2.
        seed: int, same seed -> same permutation.
    Returns:
        np.ndarray int64 [count].
    """
    if count < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {count}")
    order = np.random.default_rng(seed).permutation(count)
    permutation = np.empty(count, dtype=np.int64)
    permutation[order] = np.roll(order, -1)
    return permutation


def caption_metrics(references, hypotheses, include_meteor=True):
    """BLEU-1..4, CIDEr-D and (if `include_meteor`) METEOR of one set of generated captions.

    Args:
        references: list[list[list[str]]], see the module docstring.
        hypotheses: list[list[str]].
        include_meteor: bool; METEOR is left out with a note when Java or the scorer fails.
    Returns:
        (dict name -> float, list[str] notes about metrics left out).
    """
    metrics = bleu_scores(references, hypotheses)
    metrics["cider"] = cider_score(references, hypotheses)
    notes = []
    if include_meteor:
        try:
            metrics["meteor"] = meteor_score(references, hypotheses)
        except (OSError, ValueError) as error:
            # BrokenPipeError and FileNotFoundError (no `java`) are OSErrors; a crashed
            # scorer answers an empty line, which float() rejects with ValueError.
            notes.append(f"METEOR left out: the Java scorer failed ({type(error).__name__}: {error})")
    return metrics, notes


# Words a finished English caption does not end on; a caption ending on one was cut off.
FUNCTION_WORDS = frozenset(("a", "an", "the", "of", "with", "in", "on", "at", "to", "and", "is", "are"))


def caption_shape(hypotheses):
    """Guardrails on the form of generated captions (the failures a CIDEr-optimised decoder shows).

    Args:
        hypotheses: list[list[str]], one generated caption per image.
    Returns:
        dict: "bad_endings" (share of captions whose last word is in FUNCTION_WORDS),
        "immediate_repeats" (share with one word twice in a row), "mean_length" (words per
        caption), "vocabulary_used" (distinct words over all captions). Empty captions
        count as neither a bad ending nor a repeat.
    """
    if not hypotheses:
        raise ValueError("no captions")
    count = len(hypotheses)
    return {
        "bad_endings": sum(1 for words in hypotheses if words and words[-1] in FUNCTION_WORDS) / count,
        "immediate_repeats": sum(
            1 for words in hypotheses if any(first == second for first, second in zip(words, words[1:]))
        ) / count,
        "mean_length": sum(len(words) for words in hypotheses) / count,
        "vocabulary_used": len({word for words in hypotheses for word in words}),
    }
