"""Self-critical sequence training in TF ops: multinomial caption sampling, baselines, loss.

Sampling uses the step functions beam search uses (`models.decoder.DecodingFunctions`, or
any `step_fn(token_ids int32 [N], state) -> (log_probs float32 [N, V], new_state)`), so
what is sampled is exactly the distribution the decoder defines at inference. Randomness
is stateless (`tf.random.stateless_categorical`, one seed per call, folded with the
position), so a sample is a pure function of the weights, the images and the seed: a
resumed fine-tuning run draws the samples the uninterrupted one would have.

Layout of K samples of B images: row `b * K + k` is sample k of image b. A sample holds
its words, then `<end>`, then 0 (`<pad>`); its mask is 1 on the words and on `<end>`.

Worked example of the loss (Rennie et al. 2017; the "mean" baseline of Luo 2020). Two
samples of one image with rewards (CIDEr-D) 1.2 and 0.4: each sample's baseline is the
mean reward of the image's other samples, 0.4 and 1.2, so the advantages are +0.8 and
-0.8. With 3 and 2 tokens (`<end>` included) the loss is

    -(0.8 * (lp11 + lp12 + lp13) - 0.8 * (lp21 + lp22)) / 5

and descending it raises the log-probability of the better sample's tokens and lowers
the worse one's.
"""

import tensorflow as tf

BASELINES = ("mean", "greedy")
_NEG_INF = float("-inf")


def sample_captions(initial_state, step_fn, batch_size, *, num_samples, max_length, start_id, end_id,
                    seed, banned_ids=()):
    """Draws `num_samples` captions per image, token by token, until `<end>`.

    Args:
        initial_state: nested structure of [B, ...] tensors (`DecodingFunctions.initial_state`).
        step_fn: `(token_ids int32 [N], state) -> (log_probs float32 [N, V], new_state)`.
        batch_size: B, Python int or int32 scalar tensor.
        num_samples: K, Python int >= 1.
        max_length: Python int, words per caption at most; position `max_length` can only
            be `<end>`, so every sample ends within `max_length + 1` tokens.
        start_id, end_id: ids of `<start>` (first input) and `<end>` (stops a sample).
        seed: int32/int64 [2], the stateless seed of this draw.
        banned_ids: ids never drawn (`<pad>`, `<start>`, `<unk>`): their probability mass is
            left out and the rest renormalized, as greedy and beam search never emit them.
    Returns:
        (token_ids int32 [B*K, max_length + 1], log_probs float32 [B*K, max_length + 1]:
        the log-probability of each drawn token under the distribution it was drawn from
        (0 after `<end>`), mask float32 [B*K, max_length + 1]: 1 on words and `<end>`).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    rows = tf.convert_to_tensor(batch_size, tf.int32) * num_samples
    state = tf.nest.map_structure(lambda tensor: tf.repeat(tensor, num_samples, axis=0), initial_state)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    width = max_length + 1

    def body(position, last_tokens, finished, tokens, log_probs_out, state):
        log_probs, state = step_fn(last_tokens, state)
        allowed = allowed_tokens(tf.shape(log_probs)[-1], width, max_length, end_id, banned_ids)[position]
        log_probs = tf.nn.log_softmax(tf.where(allowed[tf.newaxis, :], log_probs, _NEG_INF), axis=-1)
        step_seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(position, tf.int64))
        drawn = tf.random.stateless_categorical(log_probs, 1, seed=step_seed, dtype=tf.int32)[:, 0]
        drawn_log_probs = tf.gather(log_probs, drawn, batch_dims=1)
        drawn = tf.where(finished, 0, drawn)
        drawn_log_probs = tf.where(finished, 0.0, drawn_log_probs)
        column = tf.one_hot(position, width, on_value=True, off_value=False, dtype=tf.bool)[tf.newaxis, :]
        tokens = tf.where(column, drawn[:, tf.newaxis], tokens)
        log_probs_out = tf.where(column, drawn_log_probs[:, tf.newaxis], log_probs_out)
        finished = tf.logical_or(finished, tf.equal(drawn, end_id))
        return position + 1, drawn, finished, tokens, log_probs_out, state

    def condition(position, last_tokens, finished, tokens, log_probs_out, state):
        del last_tokens, tokens, log_probs_out, state
        return tf.logical_and(position < width, tf.logical_not(tf.reduce_all(finished)))

    _, _, _, tokens, log_probs, _ = tf.while_loop(
        condition,
        body,
        loop_vars=(
            tf.constant(0),
            tf.fill(tf.expand_dims(rows, 0), tf.constant(start_id, tf.int32)),
            tf.zeros(tf.expand_dims(rows, 0), tf.bool),
            tf.zeros(tf.stack([rows, width]), tf.int32),
            tf.zeros(tf.stack([rows, width]), tf.float32),
            state,
        ),
        shape_invariants=(
            tf.TensorShape([]),
            tf.TensorShape([None]),
            tf.TensorShape([None]),
            tf.TensorShape([None, width]),
            tf.TensorShape([None, width]),
            tf.nest.map_structure(_relaxed_batch_shape, state),
        ),
    )
    mask = tf.cast(tf.not_equal(tokens, 0), tf.float32)
    return tokens, log_probs, mask


def _relaxed_batch_shape(tensor):
    shape = tensor.shape
    return tf.TensorShape([None]).concatenate(shape[1:]) if shape.rank else shape


def token_log_probs(log_probs, token_ids):
    """log_probs float32 [N, T, V], token_ids int [N, T] -> float32 [N, T], each token's log p."""
    return tf.gather(log_probs, tf.cast(token_ids, tf.int32), batch_dims=2)


def advantages(rewards, baseline="mean", greedy_rewards=None):
    """Reward minus baseline, per sample.

    Args:
        rewards: float [B, K], the reward of sample k of image b.
        baseline: "mean" (each sample against the mean reward of its image's other K - 1
            samples; needs K >= 2) or "greedy" (against the reward of the image's greedy
            caption, `greedy_rewards`).
        greedy_rewards: float [B], for "greedy".
    Returns:
        float32 [B, K].
    """
    rewards = tf.cast(rewards, tf.float32)
    if baseline == "mean":
        count = rewards.shape[1]
        if count is not None and count < 2:
            raise ValueError("the mean baseline needs at least 2 samples per image")
        others = (tf.reduce_sum(rewards, axis=1, keepdims=True) - rewards) / tf.cast(tf.shape(rewards)[1] - 1, tf.float32)
        return rewards - others
    if baseline == "greedy":
        if greedy_rewards is None:
            raise ValueError("the greedy baseline needs greedy_rewards")
        return rewards - tf.cast(greedy_rewards, tf.float32)[:, tf.newaxis]
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")


def self_critical_loss(log_probs, mask, advantage, total_tokens=None):
    """Minus the advantage-weighted log-likelihood of the samples, averaged over tokens.

    Args:
        log_probs: float32 [N, T], the log-probability of each sampled token (differentiable).
        mask: float [N, T], 1 on words and `<end>`, 0 after.
        advantage: float [N], reward minus baseline per sample (treated as a constant).
        total_tokens: float scalar, the divisor; defaults to `sum(mask)`. Under a
            distribution strategy pass the global batch's token count, so the replicas'
            summed gradients equal the single-device gradient.
    Returns:
        float32 scalar: -sum(log_probs * advantage * mask) / total_tokens (0 without tokens).
    """
    mask = tf.cast(mask, tf.float32)
    advantage = tf.stop_gradient(tf.cast(advantage, tf.float32))
    if total_tokens is None:
        total_tokens = tf.reduce_sum(mask)
    # tf.where, not a product: past `<end>` the log-probability of the padding id is -inf.
    weighted = tf.where(mask > 0, log_probs * advantage[:, tf.newaxis], 0.0)
    return tf.math.divide_no_nan(-tf.reduce_sum(weighted), tf.cast(total_tokens, tf.float32))


def allowed_tokens(vocab_size, length, max_length, end_id, banned_ids=()):
    """bool [length, V]: which tokens `sample_captions` may draw at each position.

    Banned ids never; at positions >= max_length only `<end>`.
    """
    vocab_ids = tf.range(vocab_size)
    allowed = tf.reduce_all(
        tf.not_equal(vocab_ids[:, tf.newaxis], tf.constant(list(banned_ids), tf.int32, shape=[len(banned_ids)])),
        axis=1,
    )
    positions = tf.range(length)[:, tf.newaxis]
    return tf.logical_and(allowed[tf.newaxis, :], tf.logical_or(positions < max_length, tf.equal(vocab_ids, end_id)))


def sequence_log_probs(decoder_model, image_features, token_ids, *, max_length, start_id, end_id, banned_ids=()):
    """The log-probability of each token of given captions, differentiable, in one model call.

    The teacher-forced decoder computes what `sample_captions` computed step by step (same
    weights, no dropout), with the same banned tokens and `<end>`-only last position, so
    on a sample it returns the sampler's log-probs (to float rounding), with gradients
    through one LSTM pass instead of through the sampling loop.

    Args:
        decoder_model: a Keras decoder (`models.decoder.build_decoder`).
        image_features: float32 [N, F], one row per caption.
        token_ids: int32 [N, T] words, `<end>`, then 0 (T <= max_length + 1).
    Returns:
        float32 [N, T] (values past `<end>` are meaningless: mask them).
    """
    from models import decoder as decoder_module

    token_ids = tf.cast(token_ids, tf.int32)
    image_features = tf.convert_to_tensor(image_features, tf.float32)
    starts = tf.fill(tf.stack([tf.shape(token_ids)[0], 1]), tf.constant(start_id, tf.int32))
    inputs = tf.concat([starts, token_ids[:, :-1]], axis=1)
    logits = decoder_model(
        {decoder_module.IMAGE_FEATURES_INPUT: image_features, decoder_module.CAPTION_TOKENS_INPUT: inputs},
        training=False,
    )
    allowed = allowed_tokens(tf.shape(logits)[-1], tf.shape(logits)[1], max_length, end_id, banned_ids)
    log_probs = tf.nn.log_softmax(tf.where(allowed[tf.newaxis], logits, _NEG_INF), axis=-1)
    return token_log_probs(log_probs, token_ids)
