"""Beam and greedy search against a hand-written model with known probabilities.

The fake model's next-word distribution is a table keyed by the whole prefix (batch row
included), kept in the decoding state as an integer code, so a search that gathers the
state from the wrong parent beam, or feeds the wrong token, reads the wrong row and fails.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from models import beam_search

PAD, START, END, UNK = 0, 1, 2, 3
A, B, C, D, E = 4, 5, 6, 7, 8
VOCAB_SIZE = 9
BANNED = (PAD, START, UNK)


class PrefixModel:
    """step_fn over a table {row: {words tuple: {next id: probability}}}.

    State: int64 [N] code of (row, <start>, words...). A prefix missing from the table
    ends with probability 1. `calls` counts step_fn calls (eager searches only).
    """

    def __init__(self, tables):
        keys, rows = [], []
        for row, table in tables.items():
            for prefix, distribution in table.items():
                probabilities = np.zeros(VOCAB_SIZE, np.float64)
                for word, probability in distribution.items():
                    probabilities[word] = probability
                assert abs(probabilities.sum() - 1.0) < 1e-9, (row, prefix)
                keys.append(self.code(row, prefix))
                with np.errstate(divide="ignore"):  # impossible words get log 0 = -inf
                    rows.append(np.log(probabilities))
        ends_only = np.full(VOCAB_SIZE, -np.inf)
        ends_only[END] = 0.0
        rows.append(ends_only)
        self.log_probs = tf.constant(np.array(rows), tf.float32)
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(keys, tf.int64), tf.range(len(keys), dtype=tf.int64)
            ),
            default_value=len(keys),
        )
        self.calls = 0

    @staticmethod
    def code(row, words):
        value = row * VOCAB_SIZE + START
        for word in words:
            value = value * VOCAB_SIZE + word
        return value

    def initial_state(self, rows):
        """rows int [B] -> the state before <start> is fed: code = row."""
        return (tf.cast(rows, tf.int64),)

    def step(self, token_ids, state):
        self.calls += 1
        (codes,) = state
        # The first call feeds <start> onto the bare row code; its code is row*V + START.
        new_codes = codes * VOCAB_SIZE + tf.cast(token_ids, tf.int64)
        return tf.gather(self.log_probs, self.table.lookup(new_codes)), (new_codes,)


def run(search, tables, rows=(0,), **options):
    model = PrefixModel(tables)
    settings = dict(beam_size=3, max_length=6, start_id=START, end_id=END, banned_ids=BANNED,
                    length_penalty=0.0, no_repeat_ngram_size=0)
    settings.update(options)
    rows = tf.constant(rows, tf.int32)
    token_ids, scores, lengths = search(model.initial_state(rows), model.step, tf.shape(rows)[0], **settings)
    assert token_ids.dtype == tf.int32 and scores.dtype == tf.float32 and lengths.dtype == tf.int32
    assert token_ids.shape == (len(rows), settings["max_length"])
    return token_ids.numpy(), scores.numpy(), lengths.numpy(), model


def words_of(token_ids, lengths):
    return [list(row[:length]) for row, length in zip(token_ids, lengths)]


# Greedy takes "a" (0.5) but every continuation of "a" is poor; "b c" is better overall.
TRAP = {
    (): {A: 0.5, B: 0.4, END: 0.1},
    (A,): {C: 0.3, D: 0.3, E: 0.4},
    (A, E): {END: 1.0},
    (B,): {C: 0.9, END: 0.1},
    (B, C): {END: 1.0},
}


def test_greedy_takes_the_locally_best_word_and_beam_finds_the_better_caption():
    greedy_ids, greedy_scores, greedy_lengths, _ = run(beam_search.greedy_search, {0: TRAP})
    assert words_of(greedy_ids, greedy_lengths) == [[A, E]]
    assert greedy_scores[0] == pytest.approx(math.log(0.5 * 0.4), abs=1e-6)
    assert list(greedy_ids[0]) == [A, E, 0, 0, 0, 0]

    beam_ids, beam_scores, beam_lengths, _ = run(beam_search.beam_search, {0: TRAP}, beam_size=3)
    assert words_of(beam_ids, beam_lengths) == [[B, C]]
    assert beam_scores[0] == pytest.approx(math.log(0.4 * 0.9), abs=1e-6)
    assert list(beam_ids[0]) == [B, C, 0, 0, 0, 0]


@pytest.mark.parametrize("length_penalty", [0.0, 0.7])
def test_beam_of_one_equals_greedy(length_penalty):
    chain = {
        (): {A: 0.6, B: 0.4},
        (A,): {B: 0.5, C: 0.3, END: 0.2},
        (A, B): {C: 0.7, END: 0.3},
        (A, B, C): {END: 0.9, D: 0.1},
        (B,): {END: 1.0},
    }
    # A one-wide beam still sets an early <end> aside and continues with the best other
    # word, so with a length penalty it could find a longer, better-normalized caption
    # than greedy; on this chain the greedy path is also the best, so both must agree.
    greedy = run(beam_search.greedy_search, {0: chain}, length_penalty=length_penalty)
    beam = run(beam_search.beam_search, {0: chain}, beam_size=1, length_penalty=length_penalty)
    assert words_of(greedy[0], greedy[2]) == words_of(beam[0], beam[2]) == [[A, B, C]]
    np.testing.assert_array_equal(greedy[0], beam[0])
    np.testing.assert_allclose(greedy[1], beam[1], atol=1e-6)
    expected = math.log(0.6 * 0.5 * 0.7 * 0.9) / (4 ** length_penalty)
    assert greedy[1][0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("search", [beam_search.greedy_search, beam_search.beam_search])
def test_stops_at_end_without_running_to_max_length(search):
    ids, scores, lengths, model = run(search, {0: {(): {A: 1.0}, (A,): {END: 1.0}}}, max_length=10, beam_size=2)
    assert words_of(ids, lengths) == [[A]]
    assert list(ids[0]) == [A] + [0] * 9
    assert scores[0] == pytest.approx(0.0, abs=1e-6)
    # <start> -> a, a -> <end>; nothing can beat a finished caption of probability 1.
    assert model.calls == 2


@pytest.mark.parametrize("search", [beam_search.greedy_search, beam_search.beam_search])
def test_hypothesis_reaching_max_length_without_end_is_returned(search):
    repeating = {(): {A: 1.0}, (A,): {A: 0.9, END: 0.1}, (A, A): {A: 0.9, END: 0.1}, (A, A, A): {A: 0.6, END: 0.4}}
    ids, scores, lengths, model = run(search, {0: repeating}, max_length=3)
    assert list(ids[0]) == [A, A, A]
    assert lengths[0] == 3
    # Scored as if it ended after its 3 words: 1 * 0.9 * 0.9 * P(<end> | a a a) = 0.324,
    # which beats "a <end>" (0.1) and "a a <end>" (0.09).
    assert scores[0] == pytest.approx(math.log(0.81 * 0.4), abs=1e-6)
    assert model.calls == 4


def test_truncated_hypothesis_pays_for_ending():
    # "a a a" never ends by itself (P(<end> | a a a) = 0.01): truncating it at max_length
    # must cost that, so the beam prefers "b <end>" (0.3) over 0.7 * 0.9 * 0.9 * 0.01.
    looping = {(): {A: 0.7, B: 0.3}, (A,): {A: 0.9, END: 0.1}, (A, A): {A: 0.9, END: 0.1},
               (A, A, A): {A: 0.99, END: 0.01}, (B,): {END: 1.0}}
    ids, scores, lengths, _ = run(beam_search.beam_search, {0: looping}, max_length=3, beam_size=2)
    assert words_of(ids, lengths) == [[B]]
    assert scores[0] == pytest.approx(math.log(0.3), abs=1e-6)


def test_length_penalty_changes_the_winner_from_short_to_long():
    short_or_long = {
        (): {A: 0.6, B: 0.4},
        (A,): {END: 1.0},
        (B,): {C: 1.0},
        (B, C): {D: 1.0},
        (B, C, D): {END: 1.0},
    }
    ids, scores, lengths, _ = run(beam_search.beam_search, {0: short_or_long}, beam_size=2, length_penalty=0.0)
    assert words_of(ids, lengths) == [[A]]
    assert scores[0] == pytest.approx(math.log(0.6), abs=1e-6)
    ids, scores, lengths, _ = run(beam_search.beam_search, {0: short_or_long}, beam_size=2, length_penalty=1.0)
    # log 0.6 / 2 = -0.255 < log 0.4 / 4 = -0.229: lengths count <end>.
    assert words_of(ids, lengths) == [[B, C, D]]
    assert scores[0] == pytest.approx(math.log(0.4) / 4, abs=1e-6)


@pytest.mark.parametrize("search", [beam_search.greedy_search, beam_search.beam_search])
def test_banned_ids_are_never_emitted_even_when_most_probable(search):
    unknown_first = {(): {UNK: 0.7, A: 0.3}, (A,): {START: 0.5, PAD: 0.3, B: 0.2}, (A, B): {END: 1.0}}
    ids, _, lengths, _ = run(search, {0: unknown_first}, banned_ids=())
    assert ids[0][0] == UNK  # the model's favourite, when nothing is banned
    ids, scores, lengths, _ = run(search, {0: unknown_first})
    assert words_of(ids, lengths) == [[A, B]]
    assert scores[0] == pytest.approx(math.log(0.3 * 0.2), abs=1e-6)


# "a b a b ...": each word is followed by the other with 0.99, <end> with 0.01.
ALTERNATING = {(): {A: 1.0}}
for _length in range(1, 8):
    _prefix = tuple(A if position % 2 == 0 else B for position in range(_length))
    ALTERNATING[_prefix] = {B if _length % 2 else A: 0.99, END: 0.01}


@pytest.mark.parametrize("search", [beam_search.greedy_search, beam_search.beam_search])
@pytest.mark.parametrize(
    "ngram_size, expected",
    [(0, [A, B, A, B, A, B]), (2, [A, B, A]), (3, [A, B, A, B]), (1, [A, B])],
)
def test_no_repeat_ngram_blocks_a_repeated_ngram(search, ngram_size, expected):
    # length_penalty=1 makes the beam prefer the longest allowed caption, like greedy.
    ids, _, lengths, _ = run(search, {0: ALTERNATING}, no_repeat_ngram_size=ngram_size, max_length=6,
                             length_penalty=1.0)
    assert words_of(ids, lengths) == [expected]


def test_batch_rows_decode_independently():
    other = {(): {C: 0.2, D: 0.8}, (D,): {E: 1.0}, (D, E): {END: 1.0}, (C,): {END: 1.0}}
    ids, scores, lengths, _ = run(beam_search.beam_search, {0: TRAP, 1: other}, rows=(0, 1))
    assert words_of(ids, lengths) == [[B, C], [D, E]]
    np.testing.assert_allclose(scores, [math.log(0.36), math.log(0.8)], atol=1e-6)
    # The same rows in the other order give the same answers, swapped.
    ids, scores, lengths, _ = run(beam_search.beam_search, {0: TRAP, 1: other}, rows=(1, 0))
    assert words_of(ids, lengths) == [[D, E], [B, C]]


@pytest.mark.parametrize("search", [beam_search.greedy_search, beam_search.beam_search])
def test_runs_in_a_tf_function_with_unknown_batch_size(search):
    other = {(): {C: 0.2, D: 0.8}, (D,): {E: 1.0}, (D, E): {END: 1.0}}
    model = PrefixModel({0: TRAP, 1: other})

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
    def decode(rows):
        return search(model.initial_state(rows), model.step, tf.shape(rows)[0], beam_size=3, max_length=6,
                      start_id=START, end_id=END, banned_ids=BANNED, length_penalty=0.7)

    graph = decode.get_concrete_function().graph
    assert any(op.type in ("While", "StatelessWhile") for op in graph.get_operations())
    rows = tf.constant([0, 1, 0], tf.int32)
    ids, scores, lengths = decode(rows)
    eager = run(search, {0: TRAP, 1: other}, rows=(0, 1, 0), length_penalty=0.7)
    np.testing.assert_array_equal(ids.numpy(), eager[0])
    np.testing.assert_allclose(scores.numpy(), eager[1], atol=1e-6)
    np.testing.assert_array_equal(lengths.numpy(), eager[2])
    assert decode(tf.constant([1], tf.int32))[0].shape == (1, 6)


def test_empty_batch_gives_empty_outputs():
    ids, scores, lengths, _ = run(beam_search.beam_search, {0: TRAP}, rows=())
    assert ids.shape == (0, 6) and scores.shape == (0,) and lengths.shape == (0,)


def test_bad_arguments_are_rejected():
    model = PrefixModel({0: TRAP})
    state = model.initial_state(tf.constant([0]))
    with pytest.raises(ValueError, match="beam_size"):
        beam_search.beam_search(state, model.step, 1, beam_size=0, max_length=5, start_id=START, end_id=END)
    with pytest.raises(ValueError, match="max_length"):
        beam_search.greedy_search(state, model.step, 1, max_length=0, start_id=START, end_id=END)
