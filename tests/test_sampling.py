"""Self-critical training pieces: CIDEr-D reward against pycocoevalcap, baselines, sampler, loss."""

import numpy as np
import pytest
import tensorflow as tf

from models import sampling
from pipeline.training.cider_reward import CiderD

END = 2


def _random_captions(rng, count, vocab_size, longest=9):
    return [list(rng.integers(3, vocab_size, size=rng.integers(1, longest))) + [END] for _ in range(count)]


def _as_words(ids):
    return " ".join(f"w{index}" for index in ids)


def _padded(captions):
    lengths = np.asarray([len(caption) for caption in captions])
    token_ids = np.zeros((len(captions), lengths.max() + 3), dtype=np.int32)  # extra padding is ignored
    for row, caption in enumerate(captions):
        token_ids[row, :len(caption)] = caption
    return token_ids, lengths


def test_cider_reward_equals_pycocoevalcap_with_the_same_document_frequencies():
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    rng = np.random.default_rng(0)
    vocab_size = 12  # small, so n-grams repeat and clipping, idf and the length penalty all matter
    corpus = [[caption for caption in _random_captions(rng, rng.integers(1, 6), vocab_size)] for _ in range(40)]
    scored_images = rng.integers(0, 40, size=60)  # several candidates per image, as with K samples
    candidates = _random_captions(rng, 60, vocab_size, longest=14) + [[END], [4, 4, 4, 4, 4, END]]
    scored_images = np.append(scored_images, [0, 1])
    token_ids, lengths = _padded(candidates)

    # 1. Document frequencies from the scored references themselves: pycocoevalcap's own setting.
    references = [corpus[image] for image in scored_images]
    theirs = CiderScorer(n=4, sigma=6.0)
    for candidate, refs in zip(candidates, references):
        theirs += (_as_words(candidate), [_as_words(ref) for ref in refs])
    _, expected = theirs.compute_score()
    ours = CiderD(references, vocab_size).scores(token_ids, lengths, np.arange(len(candidates)))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)

    # 2. Fixed document frequencies and N from a corpus (fine-tuning: the training split).
    class FixedCorpus(CiderScorer):
        # compute_cider assigns ref_len = log(number of scored images); keep the corpus' N.
        ref_len = property(lambda self: np.log(float(len(corpus))), lambda self, value: None)

    theirs = FixedCorpus(n=4, sigma=6.0)
    for candidate, image in zip(candidates, scored_images):
        theirs += (_as_words(candidate), [_as_words(ref) for ref in corpus[image]])
    for refs in corpus:
        for ngram in {ngram for ref in refs for ngram in _precook(_as_words(ref))}:
            theirs.document_frequency[ngram] += 1
    expected = np.asarray(theirs.compute_cider())
    ours = CiderD(corpus, vocab_size).scores(token_ids, lengths, scored_images)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert expected.std() > 0.1 and expected.max() > 1.0  # the case is not degenerate


def _precook(sentence):
    from pycocoevalcap.cider.cider_scorer import precook

    return precook(sentence, 4)


def test_cider_reward_counts_end_so_a_cut_off_caption_loses():
    # ids: 4 a, 5 dog, 6 runs, 7 on, 8 the, 9 grass, 10 cat, 11 sleeps
    corpus = [[[4, 5, 6, 7, 8, 9, END]] * 3, [[4, 10, 11, END]] * 3, [[4, 5, 11, END]] * 3]
    scorer = CiderD(corpus, 12)
    full, cut = [4, 5, 6, 7, 8, 9, END], [4, 5, 6, 7, 8, END]
    token_ids, lengths = _padded([full, cut])
    with_end = scorer.scores(token_ids, lengths, [0, 0])
    # The same references and candidate words without <end>: the cut-off caption loses less.
    no_end = CiderD([[ref[:-1] for ref in refs] for refs in corpus], 12)
    token_ids, lengths = _padded([full[:-1], cut[:-1]])
    without_end = no_end.scores(token_ids, lengths, [0, 0])
    assert with_end[0] == pytest.approx(10.0) and without_end[0] == pytest.approx(10.0)
    assert with_end[1] < without_end[1] < 10.0


def test_mean_and_greedy_baselines_with_hand_set_rewards():
    rewards = np.array([[1.2, 0.4, 0.8], [0.0, 0.0, 3.0]])
    np.testing.assert_allclose(sampling.advantages(rewards, "mean").numpy(),
                               [[0.6, -0.6, 0.0], [-1.5, -1.5, 3.0]], atol=1e-6)
    np.testing.assert_allclose(sampling.advantages(rewards, "greedy", greedy_rewards=[1.0, 0.5]).numpy(),
                               [[0.2, -0.6, -0.2], [-0.5, -0.5, 2.5]], atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        sampling.advantages(np.ones((2, 1)), "mean")
    with pytest.raises(ValueError, match="greedy_rewards"):
        sampling.advantages(rewards, "greedy")


# Fake decoder over ids 0 <pad>, 1 <start>, 2 <end>, 3 <unk>, 4 "a", 5 "b": the next-token
# distribution depends on the last token only, and the state counts steps.
NEXT = {
    1: [0.0, 0.0, 0.1, 0.2, 0.5, 0.2],  # after <start>: <unk> is banned, so a 0.625, b 0.25, <end> 0.125
    4: [0.0, 0.0, 0.6, 0.0, 0.0, 0.4],  # after a
    5: [0.0, 0.0, 0.3, 0.0, 0.0, 0.7],  # after b: b again until <end> or the length limit
}


def _fake_step(token_ids, state):
    table = np.full((6, 6), 1.0 / 6, dtype=np.float32)
    for token, probabilities in NEXT.items():
        table[token] = probabilities
    log_table = tf.math.log(tf.constant(table))
    return tf.gather(log_table, token_ids), (state[0] + 1.0,)


def _draw(count, seed, max_length=3):
    initial_state = (tf.zeros([count, 1]),)
    return [value.numpy() for value in sampling.sample_captions(
        initial_state, _fake_step, count, num_samples=2, max_length=max_length, start_id=1, end_id=END,
        seed=tf.constant(seed, tf.int64), banned_ids=(0, 1, 3))]


def test_sampler_draws_with_the_step_probabilities_and_stops_at_end():
    token_ids, log_probs, mask = _draw(2000, [7, 0])  # 4000 samples
    assert token_ids.shape == log_probs.shape == mask.shape == (4000, 4)
    first = token_ids[:, 0]
    for token, expected in ((4, 0.625), (5, 0.25), (END, 0.125)):
        assert abs(np.mean(first == token) - expected) < 0.025, token
    assert not np.isin(token_ids, (1, 3)).any()
    after_a = token_ids[first == 4, 1]
    assert abs(np.mean(after_a == END) - 0.6) < 0.03
    # "b b b" reaches max_length 3 with probability 0.25 * 0.7 * 0.7 and must then end.
    forced = np.all(token_ids[:, :3] == 5, axis=1)
    assert abs(np.mean(forced) - 0.25 * 0.49) < 0.02 and np.all(token_ids[forced, 3] == END)
    # Every sample ends with exactly one <end>; nothing but padding after it; the mask covers <end>.
    lengths = mask.sum(axis=1).astype(int)
    assert np.all(token_ids[np.arange(4000), lengths - 1] == END)
    assert np.all((token_ids != 0) == (mask > 0))
    # The log-probabilities are those of the (renormalised) distribution drawn from.
    rows = np.flatnonzero((first == 4) & (token_ids[:, 1] == END))
    np.testing.assert_allclose(log_probs[rows, :2], np.log([[0.625, 0.6]] * len(rows)), rtol=1e-5)
    assert np.all(log_probs[mask == 0] == 0) and np.all(log_probs[forced, 3] == 0)  # the forced <end> is certain


def test_sampler_is_a_pure_function_of_its_seed():
    first, _, _ = _draw(50, [3, 5])
    again, _, _ = _draw(50, [3, 5])
    other, _, _ = _draw(50, [3, 6])
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


def test_loss_sign_and_masking():
    log_probs = tf.Variable([[-1.0, -2.0, -np.inf], [-0.5, -0.5, -0.5]])
    mask = tf.constant([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantage = tf.constant([2.0, -1.0])
    with tf.GradientTape() as tape:
        loss = sampling.self_critical_loss(log_probs, mask, advantage)
    # -(2 * (-1 - 2) + (-1) * (-1.5)) / 5 tokens; the -inf past <end> is masked out.
    assert float(loss) == pytest.approx(-(2 * -3.0 + -1 * -1.5) / 5)
    gradient = tape.gradient(loss, log_probs).numpy()
    # Descending the loss raises the log-probs of the better-than-baseline sample and
    # lowers the others'; masked positions get no gradient.
    np.testing.assert_allclose(gradient, [[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]], atol=1e-6)
    # The global token count divides instead when given (one replica's share of the batch).
    assert float(sampling.self_critical_loss(log_probs, mask, advantage, total_tokens=10.0)) == pytest.approx(
        float(loss) / 2)


def test_teacher_forced_log_probs_equal_the_samplers_on_a_real_decoder():
    from models import decoder
    from pipeline.core import config

    model = decoder.build_decoder(config.DecoderConfig(embedding_dim=8, units=16, dropout=0.0), 9, feature_dim=6)
    decoding = decoder.DecodingFunctions(model)
    features = tf.random.stateless_normal([4, 6], seed=[1, 2])
    token_ids, log_probs, mask = sampling.sample_captions(
        decoding.initial_state(features), decoding.step, 4, num_samples=3, max_length=5, start_id=1, end_id=END,
        seed=tf.constant([0, 1], tf.int64), banned_ids=(0, 1, 3))
    recomputed = sampling.sequence_log_probs(model, tf.repeat(features, 3, axis=0), token_ids, max_length=5,
                                             start_id=1, end_id=END, banned_ids=(0, 1, 3))
    kept = mask.numpy() > 0
    np.testing.assert_allclose(recomputed.numpy()[kept], log_probs.numpy()[kept], atol=1e-5)
