"""Batched greedy and beam search in TF ops: the one decoding implementation.

Both run inside `tf.while_loop`, so the same code decodes eagerly in Python and inside
the exported SavedModel's `tf.function`s with an unknown batch size.

The step function is `step_fn(token_ids int32 [N], state) -> (log_probs float32 [N, V],
new_state)`, where `state` is any nested structure of [N, ...] tensors and `log_probs` are
log-softmax outputs (every entry <= 0). Decoding starts by feeding `start_id`.

Conventions shared by both searches:

- Returned `token_ids` int32 [B, max_length] hold the words only (no `<start>`, no
  `<end>`), padded with 0; `lengths` int32 [B] count those words.
- A hypothesis finishes when it emits `end_id`. One that fills `max_length` words without
  `<end>` is returned with those words, but scored as if it ended there: one more step
  allows only `<end>` and adds the model's log probability of stopping. Without that
  charge a truncated hypothesis would skip the cost every finished one pays, and
  degenerate loops ("a dog a dog a dog ...") would beat real captions.
- Length normalization: score = sum of log p / length ** length_penalty, where length
  counts the scored tokens, i.e. the words plus the `<end>`. Counting `<end>` keeps an
  immediately finished (empty) hypothesis at length 1, so the division is always
  defined, and treats the `<end>` decision like any other scored token.
  `scores` is that normalized value; with `length_penalty=0` it is the plain log
  probability.
- `banned_ids` (for captions: `<pad>`, `<start>`, `<unk>`) are never emitted.
- `no_repeat_ngram_size=n > 0` forbids any token that would complete an n-gram of words
  already present in the hypothesis.
"""

import tensorflow as tf

_NEG_INF = float("-inf")


def greedy_search(initial_state, step_fn, batch_size, *, beam_size=1, max_length, start_id, end_id,
                  banned_ids=(), length_penalty=0.0, no_repeat_ngram_size=0):
    """Picks the most probable allowed token at every step.

    Args:
        initial_state: nested structure of [B, ...] tensors.
        step_fn: see the module docstring.
        batch_size: B, a Python int or int32 scalar tensor.
        beam_size: ignored; accepted so both searches take the same arguments.
        max_length, start_id, end_id, banned_ids, length_penalty, no_repeat_ngram_size:
            see the module docstring.

    Returns:
        (token_ids int32 [B, max_length], scores float32 [B], lengths int32 [B]).
    """
    del beam_size
    _check_arguments(max_length, 1, no_repeat_ngram_size)
    batch_size = tf.convert_to_tensor(batch_size, tf.int32)
    banned = tf.constant(list(banned_ids), dtype=tf.int32, shape=[len(banned_ids)])

    def condition(position, tokens, last_tokens, log_prob_sums, finished, state):
        del tokens, last_tokens, log_prob_sums, state
        return tf.logical_and(position <= max_length, tf.logical_not(tf.reduce_all(finished)))

    def body(position, tokens, last_tokens, log_prob_sums, finished, state):
        log_probs, state = step_fn(last_tokens, state)
        log_probs = _mask_disallowed(log_probs, banned, tokens, position, no_repeat_ngram_size)
        log_probs = _end_only_at_limit(log_probs, position, max_length, end_id)
        next_tokens = tf.argmax(log_probs, axis=-1, output_type=tf.int32)
        next_log_probs = tf.gather(log_probs, next_tokens, batch_dims=1)
        log_prob_sums = tf.where(finished, log_prob_sums, log_prob_sums + next_log_probs)
        ends = tf.logical_and(tf.logical_not(finished), tf.equal(next_tokens, end_id))
        writes = tf.logical_not(tf.logical_or(finished, ends))
        tokens = _write_column(tokens, position, tf.where(writes, next_tokens, 0))
        finished = tf.logical_or(finished, ends)
        return position + 1, tokens, next_tokens, log_prob_sums, finished, state

    _, tokens, _, log_prob_sums, finished, _ = tf.while_loop(
        condition,
        body,
        loop_vars=(
            tf.constant(0),
            tf.zeros(tf.stack([batch_size, max_length]), tf.int32),
            tf.fill(tf.expand_dims(batch_size, 0), tf.constant(start_id, tf.int32)),
            tf.zeros(tf.expand_dims(batch_size, 0), tf.float32),
            tf.zeros(tf.expand_dims(batch_size, 0), tf.bool),
            initial_state,
        ),
        shape_invariants=(
            tf.TensorShape([]),
            tf.TensorShape([None, max_length]),
            tf.TensorShape([None]),
            tf.TensorShape([None]),
            tf.TensorShape([None]),
            tf.nest.map_structure(_relaxed_batch_shape, initial_state),
        ),
    )
    del finished  # every row ends by max_length + 1 steps
    lengths = tf.reduce_sum(tf.cast(tf.not_equal(tokens, 0), tf.int32), axis=1)
    return tokens, _normalize(log_prob_sums, lengths + 1, length_penalty), lengths


def beam_search(initial_state, step_fn, batch_size, *, beam_size, max_length, start_id, end_id,
                banned_ids=(), length_penalty=0.0, no_repeat_ngram_size=0):
    """Beam search keeping `beam_size` unfinished hypotheses and the best finished one.

    Each step expands the K live hypotheses of every batch row over the whole vocabulary,
    ranks the K*V candidates by summed log probability and takes the top 2K: at most K of
    them end with `<end>` (one `<end>` per parent), so at least K continue. Ended
    candidates compete, by normalized score, for the best finished hypothesis; the top K
    others become the next live beam. Live hypotheses never hold finished ones, so a short
    early caption cannot crowd better long ones out of the beam.

    A row is done when no live hypothesis can still beat its best finished one: log
    probabilities only decrease, so the best a live hypothesis can reach is its current
    sum divided by the most favourable length penalty over its possible final lengths.
    The loop stops when every row is done, or after step `max_length + 1`, which may
    only emit `<end>` and so finishes every hypothesis that filled `max_length` words.
    This stopping rule is exact: running on would not change any result.

    Args:
        initial_state: nested structure of [B, ...] tensors (one per image).
        step_fn: see the module docstring; called with N = B * beam_size.
        batch_size: B, a Python int or int32 scalar tensor.
        beam_size: K >= 1, a Python int.
        max_length, start_id, end_id, banned_ids, length_penalty, no_repeat_ngram_size:
            see the module docstring.

    Returns:
        (token_ids int32 [B, max_length], scores float32 [B], lengths int32 [B]).
    """
    _check_arguments(max_length, beam_size, no_repeat_ngram_size)
    batch_size = tf.convert_to_tensor(batch_size, tf.int32)
    banned = tf.constant(list(banned_ids), dtype=tf.int32, shape=[len(banned_ids)])
    # Row b's beams are rows b*K .. b*K+K-1 of the flat [B*K, ...] state.
    state = tf.nest.map_structure(lambda tensor: tf.repeat(tensor, beam_size, axis=0), initial_state)
    # Only beam 0 is live at first: K identical copies of `<start>` would otherwise fill the
    # beam with K copies of the same best continuation.
    first_scores = tf.concat([[0.0], tf.fill([beam_size - 1], _NEG_INF)], axis=0)
    flat_shape = tf.stack([batch_size * beam_size])

    def row_major(flat):  # [B*K, ...] -> [B, K, ...]
        return tf.reshape(flat, tf.concat([[batch_size, beam_size], tf.shape(flat)[1:]], axis=0))

    def condition(position, live_tokens, live_last, live_sums, state, best_tokens, best_scores, best_lengths):
        del live_tokens, live_last, state, best_tokens, best_lengths
        # The best normalized score a live hypothesis can still reach (sums are <= 0 and
        # only decrease, so the most favourable length is one of the two extremes).
        best_live = tf.reduce_max(live_sums, axis=1)
        reachable = tf.maximum(
            _normalize(best_live, position + 1, length_penalty),
            _normalize(best_live, max_length + 1, length_penalty),
        )
        rows_open = tf.logical_not(reachable < best_scores)
        return tf.logical_and(position <= max_length, tf.reduce_any(rows_open))

    def body(position, live_tokens, live_last, live_sums, state, best_tokens, best_scores, best_lengths):
        log_probs, state = step_fn(tf.reshape(live_last, flat_shape), state)
        history = tf.reshape(live_tokens, tf.stack([batch_size * beam_size, max_length]))
        log_probs = _mask_disallowed(log_probs, banned, history, position, no_repeat_ngram_size)
        log_probs = _end_only_at_limit(log_probs, position, max_length, end_id)
        vocab_size = tf.shape(log_probs)[-1]
        candidate_sums = live_sums[:, :, tf.newaxis] + row_major(log_probs)  # [B, K, V]
        top_sums, top_indices = tf.math.top_k(
            tf.reshape(candidate_sums, tf.stack([batch_size, beam_size * vocab_size])), k=2 * beam_size
        )  # [B, 2K], sorted descending
        top_parents = top_indices // vocab_size
        top_words = top_indices % vocab_size
        top_histories = tf.gather(live_tokens, top_parents, batch_dims=1)  # [B, 2K, L]
        ends = tf.equal(top_words, end_id)

        # Finished candidates: those ending now (`position` words, plus `<end>`).
        ended_scores = tf.where(ends, _normalize(top_sums, position + 1, length_penalty), _NEG_INF)
        best_tokens, best_scores, best_lengths = _keep_best(
            best_tokens, best_scores, best_lengths, top_histories, ended_scores, position
        )

        # Live candidates: the best K that did not end; ended ones sink to -inf.
        continuing_sums = tf.where(ends, _NEG_INF, top_sums)
        live_sums, kept = tf.math.top_k(continuing_sums, k=beam_size)  # [B, K]
        parents = tf.gather(top_parents, kept, batch_dims=1)
        live_last = tf.gather(top_words, kept, batch_dims=1)
        # At position == max_length the one-hot column is empty: nothing is written.
        live_tokens = _write_column(tf.gather(top_histories, kept, batch_dims=1), position, live_last)
        flat_parents = tf.reshape(parents + beam_size * tf.range(batch_size)[:, tf.newaxis], [-1])
        state = tf.nest.map_structure(lambda tensor: tf.gather(tensor, flat_parents), state)
        return position + 1, live_tokens, live_last, live_sums, state, best_tokens, best_scores, best_lengths

    outputs = tf.while_loop(
        condition,
        body,
        loop_vars=(
            tf.constant(0),
            tf.zeros(tf.stack([batch_size, beam_size, max_length]), tf.int32),
            tf.fill(tf.stack([batch_size, beam_size]), tf.constant(start_id, tf.int32)),
            tf.tile(first_scores[tf.newaxis, :], tf.stack([batch_size, 1])),
            state,
            tf.zeros(tf.stack([batch_size, max_length]), tf.int32),
            tf.fill(tf.expand_dims(batch_size, 0), tf.constant(_NEG_INF, tf.float32)),
            tf.zeros(tf.expand_dims(batch_size, 0), tf.int32),
        ),
        shape_invariants=(
            tf.TensorShape([]),
            tf.TensorShape([None, beam_size, max_length]),
            tf.TensorShape([None, beam_size]),
            tf.TensorShape([None, beam_size]),
            tf.nest.map_structure(_relaxed_batch_shape, state),
            tf.TensorShape([None, max_length]),
            tf.TensorShape([None]),
            tf.TensorShape([None]),
        ),
    )
    _, _, _, _, _, best_tokens, best_scores, best_lengths = outputs
    return best_tokens, best_scores, best_lengths


def _check_arguments(max_length, beam_size, no_repeat_ngram_size):
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
    if not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be an int >= 0, got {no_repeat_ngram_size!r}")


def _relaxed_batch_shape(tensor):
    """The loop may not assume a static batch size: [B, ...] -> [None, ...]."""
    shape = tensor.shape
    return tf.TensorShape([None]).concatenate(shape[1:]) if shape.rank else shape


def _normalize(log_prob_sums, lengths, length_penalty):
    """float32 [...] sums, int lengths (broadcastable, >= 1) -> sums / lengths ** penalty."""
    if length_penalty == 0.0:
        return log_prob_sums
    lengths = tf.cast(tf.maximum(lengths, 1), tf.float32)
    return log_prob_sums / tf.pow(lengths, length_penalty)


def _write_column(tokens, position, values):
    """tokens int32 [..., L] with column `position` replaced by `values` int32 [...]."""
    column = tf.one_hot(position, tf.shape(tokens)[-1], on_value=True, off_value=False, dtype=tf.bool)
    return tf.where(column, values[..., tf.newaxis], tokens)


def _keep_best(best_tokens, best_scores, best_lengths, candidate_tokens, candidate_scores, length):
    """Per row, the better of the kept hypothesis and the best of the candidates.

    best_*: [B, L], [B], [B]; candidate_tokens int32 [B, C, L]; candidate_scores float32
    [B, C] (-inf for non-candidates); length: int32 scalar, the candidates' word count.
    Ties keep the earlier (shorter) hypothesis.
    """
    index = tf.argmax(candidate_scores, axis=1, output_type=tf.int32)
    score = tf.gather(candidate_scores, index, batch_dims=1)
    better = score > best_scores
    tokens = tf.gather(candidate_tokens, index, batch_dims=1)
    return (
        tf.where(better[:, tf.newaxis], tokens, best_tokens),
        tf.where(better, score, best_scores),
        tf.where(better, length, best_lengths),
    )


def _end_only_at_limit(log_probs, position, max_length, end_id):
    """At position == max_length (all words used) only `<end>` keeps its log probability."""
    only_end = tf.logical_and(
        tf.equal(position, max_length), tf.not_equal(tf.range(tf.shape(log_probs)[-1]), end_id)
    )
    return tf.where(only_end[tf.newaxis, :], _NEG_INF, log_probs)


def _mask_disallowed(log_probs, banned, history, position, ngram_size):
    """Sets banned tokens and n-gram repeats to -inf.

    log_probs float32 [N, V]; banned int32 [M]; history int32 [N, L] words so far
    (columns >= position are 0); position int32 scalar, the number of words so far.
    """
    if banned.shape[0]:
        vocab_ids = tf.range(tf.shape(log_probs)[-1])
        is_banned = tf.reduce_any(tf.equal(vocab_ids[:, tf.newaxis], banned[tf.newaxis, :]), axis=1)
        log_probs = tf.where(is_banned[tf.newaxis, :], _NEG_INF, log_probs)
    max_length = history.shape[-1]
    if ngram_size == 0 or ngram_size > max_length:
        return log_probs
    # Window i (words i .. i+n-1) forbids its last word if its first n-1 words equal the
    # hypothesis' last n-1 words and it lies wholly in the past (i + n - 1 < position).
    num_windows = max_length - ngram_size + 1
    matches = tf.ones(tf.stack([tf.shape(history)[0], num_windows]), tf.bool)
    for offset in range(ngram_size - 1):
        suffix_position = tf.maximum(position - (ngram_size - 1) + offset, 0)
        suffix_word = history[:, suffix_position][:, tf.newaxis]
        matches = tf.logical_and(matches, tf.equal(history[:, offset:offset + num_windows], suffix_word))
    in_past = tf.range(num_windows) + ngram_size - 1 < position
    matches = tf.logical_and(matches, in_past[tf.newaxis, :])
    forbidden_words = history[:, ngram_size - 1:]  # [N, num_windows]
    rows = tf.broadcast_to(tf.range(tf.shape(history)[0])[:, tf.newaxis], tf.shape(forbidden_words))
    indices = tf.reshape(tf.stack([rows, forbidden_words], axis=-1), [-1, 2])
    # min(x, +inf) leaves x alone, so only matching windows change anything.
    updates = tf.reshape(tf.where(matches, _NEG_INF, float("inf")), [-1])
    return tf.tensor_scatter_nd_min(log_probs, indices, updates)
