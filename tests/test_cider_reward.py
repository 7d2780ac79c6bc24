"""CIDEr-D reward set-up: document frequencies against a plain count, and the saved state
(`CiderD.state`, and `scst.reward_scorer`, which keeps it with fine-tuning's checkpoints).

Agreement of the rewards with pycocoevalcap is tested in tests/test_sampling.py.
"""

import collections

import numpy as np
import pytest

from pipeline.training import cider_reward
from pipeline.training.cider_reward import CiderD

END = 2


def _corpus(rng, images, vocab_size, most_references=7, longest=14):
    """Images with 1..most_references captions of 0..longest-1 words (+ <end> for most)."""
    return [[list(rng.integers(3, vocab_size, size=rng.integers(0, longest))) + [END] * int(rng.random() < 0.8)
             for _ in range(rng.integers(1, most_references + 1))] for _ in range(images)]


def _plain_document_frequencies(corpus, vocab_size, order=4):
    """{key: images whose captions hold the n-gram}, with the module's key packing, by sets."""
    base = vocab_size + 1
    counts = collections.Counter()
    for captions in corpus:
        seen = set()
        for caption in captions:
            for n in range(1, order + 1):
                for start in range(len(caption) - n + 1):
                    key = 0
                    for token in caption[start:start + n]:
                        key = key * base + int(token) + 1
                    seen.add(key)
        counts.update(seen)
    keys = np.asarray(sorted(counts), dtype=np.int64)
    return keys, np.asarray([counts[key] for key in keys.tolist()], dtype=np.int64)


@pytest.mark.parametrize("block_cells", [cider_reward.BLOCK_CELLS, 64])
def test_document_frequencies_equal_a_plain_count(monkeypatch, block_cells):
    # 64 cells a block: many blocks of a few images, and images wider than one block.
    monkeypatch.setattr(cider_reward, "BLOCK_CELLS", block_cells)
    rng = np.random.default_rng(3)
    vocab_size = 9  # few words, so n-grams repeat within and across images
    corpus = _corpus(rng, 60, vocab_size) + [[[]], [[4]], [[4, 4, 4, 4, 4, 4]]]
    scorer = CiderD(corpus, vocab_size)
    keys, counts = _plain_document_frequencies(corpus, vocab_size)
    np.testing.assert_array_equal(scorer.df_keys, keys)
    np.testing.assert_array_equal(scorer.df_counts, counts)
    assert scorer.corpus_size == len(corpus)


def test_document_frequencies_from_their_own_corpus():
    rng = np.random.default_rng(4)
    references, corpus = _corpus(rng, 10, 20), _corpus(rng, 30, 20)
    scorer = CiderD(references, 20, document_frequency_references=corpus)
    keys, counts = _plain_document_frequencies(corpus, 20)
    np.testing.assert_array_equal(scorer.df_keys, keys)
    np.testing.assert_array_equal(scorer.df_counts, counts)
    assert scorer.corpus_size == 30


def test_state_round_trips_through_npz_without_counting_again(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    references = [[np.asarray(caption, dtype=np.int32) for caption in captions] for captions in _corpus(rng, 40, 15)]
    scorer = CiderD(references, 15)
    np.savez(tmp_path / "reward.npz", **scorer.state())

    def must_not_count(*args, **kwargs):
        raise AssertionError("document frequencies counted again")

    monkeypatch.setattr(cider_reward.Captions, "document_frequencies", must_not_count)
    with np.load(tmp_path / "reward.npz") as saved:
        restored = CiderD.from_state(dict(saved), references, 15)
    np.testing.assert_array_equal(restored.df_keys, scorer.df_keys)
    np.testing.assert_array_equal(restored.df_counts, scorer.df_counts)
    candidates = rng.integers(3, 15, size=(50, 12))
    lengths, images = rng.integers(1, 13, size=50), rng.integers(0, 40, size=50)
    np.testing.assert_array_equal(restored.scores(candidates, lengths, images),
                                  scorer.scores(candidates, lengths, images))


def test_state_of_other_captions_or_settings_is_refused():
    rng = np.random.default_rng(6)
    references = _corpus(rng, 12, 15)
    state = CiderD(references, 15).state()
    changed = [list(captions) for captions in references]
    changed[5] = [list(caption) for caption in changed[5]]
    changed[5][0] = changed[5][0][:-1] + [3 if changed[5][0][-1:] != [3] else 4]  # one id differs
    with pytest.raises(ValueError, match="fingerprint"):
        CiderD.from_state(state, changed, 15)
    with pytest.raises(ValueError, match="fingerprint"):
        CiderD.from_state(state, references[:-1] + [references[-1] + [[4]]], 15)  # one caption more
    with pytest.raises(ValueError, match="vocabulary_size|fingerprint"):
        CiderD.from_state(state, references, 16)
    # The references scored may differ from the corpus the frequencies came from.
    CiderD.from_state(state, references[:3], 15, document_frequency_references=references)
    with pytest.raises(ValueError, match="no 'fingerprint'"):
        CiderD.from_state({key: value for key, value in state.items() if key != "fingerprint"}, references, 15)


def test_bad_references_are_refused():
    with pytest.raises(ValueError, match="at least one reference"):
        CiderD([[[4, END]], []], 9)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 9\)"):
        CiderD([[[4, 9, END]]], 9)
    with pytest.raises(ValueError, match=r"token ids must be in"):
        CiderD([[[4, -1, END]]], 9)
    with pytest.raises(ValueError, match="vocabulary_size must be below"):
        CiderD([[[4, END]]], cider_reward.MAX_VOCABULARY)


def test_reward_scorer_counts_once_then_reads_its_state_and_recounts_for_other_captions(tmp_path, monkeypatch,
                                                                                      capsys):
    from pipeline.training import scst

    rng = np.random.default_rng(7)
    references = cider_reward.Captions.from_lists(_corpus(rng, 30, 15), 15)
    path = tmp_path / "checkpoints" / "reward_state.npz"
    counted = scst.reward_scorer(references, 15, path)
    assert "counted" in capsys.readouterr().err and path.is_file()
    candidates = rng.integers(3, 15, size=(40, 12))
    lengths, images = rng.integers(1, 13, size=40), rng.integers(0, 30, size=40)

    with monkeypatch.context() as patch:
        patch.setattr(cider_reward.Captions, "document_frequencies",
                      lambda *args: pytest.fail("document frequencies counted again"))
        read = scst.reward_scorer(references, 15, path)
    assert "read from" in capsys.readouterr().err
    np.testing.assert_array_equal(read.scores(candidates, lengths, images), counted.scores(candidates, lengths, images))

    other = cider_reward.Captions.from_lists(_corpus(rng, 30, 15), 15)
    recounted = scst.reward_scorer(other, 15, path)
    assert "does not belong to these captions" in capsys.readouterr().err
    np.testing.assert_array_equal(recounted.df_keys, CiderD(other, 15).df_keys)
    path.write_bytes(b"not a zip")
    scst.reward_scorer(other, 15, path)
    assert "is unreadable" in capsys.readouterr().err
    assert scst.reward_scorer(other, 15, path).fingerprint == recounted.fingerprint
