"""The decoder model, its loss and metric, and single-step decoding."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import decoder
from pipeline.core.config import DecoderConfig

VOCAB_SIZE = 11
FEATURE_DIM = 24
MODES = ["init_state", "first_step"]


def small_config(image_input, dropout=0.5):
    return DecoderConfig(embedding_dim=8, units=16, dropout=dropout, image_input=image_input)


def caption_batch(seed=0):
    """Features float32 [3, F] and full token rows int32 [3, 7] (<start> .. <end> 0 ..)."""
    rng = np.random.default_rng(seed)
    features = rng.uniform(0.0, 20.0, (3, FEATURE_DIM)).astype("float32")
    tokens = np.array(
        [[1, 4, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0, 0], [1, 8, 9, 10, 4, 5, 2]], dtype="int32"
    )
    return features, tokens


@pytest.mark.parametrize("image_input", MODES)
def test_output_is_logits_per_input_position_for_any_length(image_input):
    keras.utils.set_random_seed(0)
    model = decoder.build_decoder(small_config(image_input), VOCAB_SIZE, feature_dim=FEATURE_DIM)
    features, tokens = caption_batch()
    for length in (1, 4, 6):
        logits = model({"image_features": features, "caption_tokens": tokens[:, :length]})
        assert logits.shape == (3, length, VOCAB_SIZE)
        assert logits.dtype == tf.float32
    names = {layer.name for layer in model.layers}
    assert {decoder.EMBEDDING, decoder.LSTM, decoder.LOGITS, decoder.IMAGE_NORMALIZATION} <= names
    # The image conditions every position, not only the first.
    other = model({"image_features": features[::-1], "caption_tokens": tokens[:, :6]})
    same = model({"image_features": features, "caption_tokens": tokens[:, :6]})
    assert np.abs(other.numpy()[:, -1] - same.numpy()[:, -1]).max() > 1e-4


@pytest.mark.parametrize("image_input", MODES)
def test_outputs_are_causal_and_ignore_padding(image_input):
    keras.utils.set_random_seed(1)
    model = decoder.build_decoder(small_config(image_input), VOCAB_SIZE, feature_dim=FEATURE_DIM)
    features, tokens = caption_batch()
    changed = tokens.copy()
    changed[:, 3:] = 9  # later words must not change earlier logits
    first = model({"image_features": features, "caption_tokens": tokens}).numpy()
    second = model({"image_features": features, "caption_tokens": changed}).numpy()
    np.testing.assert_allclose(first[:, :3], second[:, :3], atol=1e-6)
    # More trailing padding leaves the real positions unchanged.
    padded = np.pad(tokens, ((0, 0), (0, 3)))
    third = model({"image_features": features, "caption_tokens": padded}).numpy()
    np.testing.assert_allclose(first, third[:, :7], atol=1e-5)


def test_feature_scale_does_not_matter():
    # The input LayerNormalization makes the model see one scale whatever the encoder.
    keras.utils.set_random_seed(2)
    model = decoder.build_decoder(small_config("init_state"), VOCAB_SIZE, feature_dim=FEATURE_DIM)
    features, tokens = caption_batch()
    base = model({"image_features": features, "caption_tokens": tokens}).numpy()
    scaled = model({"image_features": features * 1000.0, "caption_tokens": tokens}).numpy()
    np.testing.assert_allclose(base, scaled, atol=1e-4)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="image_input.*'side_input'"):
        decoder.build_decoder(small_config("side_input"), VOCAB_SIZE)
    with pytest.raises(ValueError, match="dropout"):
        decoder.build_decoder(small_config("init_state", dropout=1.0), VOCAB_SIZE)


def test_make_training_pair_shifts_by_one():
    # "a dog runs" = 4 5 6: <start> a dog runs <end> pad pad
    inputs, targets = decoder.make_training_pair(tf.constant([[1, 4, 5, 6, 2, 0, 0]], tf.int64))
    assert inputs.dtype == tf.int32 and targets.dtype == tf.int32
    assert inputs.numpy().tolist() == [[1, 4, 5, 6, 2, 0]]
    assert targets.numpy().tolist() == [[4, 5, 6, 2, 0, 0]]


def test_masked_loss_averages_over_non_pad_targets_only():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 4, 5)).astype("float32")
    targets = np.array([[3, 1, 0, 0], [2, 4, 1, 0]], "int32")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean([log_probs[b, t, targets[b, t]] for b in range(2) for t in range(4) if targets[b, t]])
    assert float(decoder.masked_loss(targets, logits)) == pytest.approx(expected, rel=1e-5)
    # Logits at padded positions carry no loss.
    changed = logits.copy()
    changed[0, 2:] = 100.0
    assert float(decoder.masked_loss(targets, changed)) == pytest.approx(expected, rel=1e-5)
    assert float(decoder.masked_loss(np.zeros((1, 3), "int32"), logits[:1, :3])) == 0.0


def test_masked_accuracy_counts_non_pad_positions():
    targets = np.array([[3, 1, 0], [2, 4, 0]], "int32")
    predicted = np.array([[3, 2, 0], [2, 4, 1]])  # 3 of 4 real positions right; pads ignored
    logits = np.eye(5, dtype="float32")[predicted]
    metric = decoder.MaskedAccuracy()
    metric.update_state(targets, logits)
    assert float(metric.result()) == pytest.approx(0.75)
    metric.update_state(targets[:1], np.eye(5, dtype="float32")[[[0, 0, 0]]])  # 0 of 2
    assert float(metric.result()) == pytest.approx(3 / 6)
    metric.reset_state()
    assert float(metric.result()) == 0.0


@pytest.mark.parametrize("image_input", MODES)
def test_stepping_reproduces_the_full_model(image_input):
    keras.utils.set_random_seed(4)
    model = decoder.build_decoder(small_config(image_input), VOCAB_SIZE, feature_dim=FEATURE_DIM)
    features, tokens = caption_batch()
    inputs, _ = (part.numpy() for part in decoder.make_training_pair(tokens))
    full = model({"image_features": features, "caption_tokens": inputs}, training=False).numpy()
    full_log_probs = tf.nn.log_softmax(full).numpy()

    decoding = decoder.DecodingFunctions(model)
    assert decoding.image_input == image_input and decoding.vocab_size == VOCAB_SIZE
    state = decoding.initial_state(features)
    assert len(state) == 2 and all(part.shape == (3, 16) for part in state)
    real = inputs != 0
    for position in range(inputs.shape[1]):
        log_probs, state = decoding.step(inputs[:, position], state)
        assert log_probs.shape == (3, VOCAB_SIZE)
        rows = real[:, position]
        np.testing.assert_allclose(log_probs.numpy()[rows], full_log_probs[rows, position], atol=1e-5)


def test_compiled_training_uses_the_masked_loss_and_saves_as_keras(tmp_path):
    keras.utils.set_random_seed(5)
    model = decoder.build_decoder(small_config("first_step", dropout=0.1), VOCAB_SIZE, feature_dim=FEATURE_DIM)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=decoder.masked_loss,
                  metrics=[decoder.MaskedAccuracy()])
    features, tokens = caption_batch()
    inputs, targets = (part.numpy() for part in decoder.make_training_pair(tokens))
    batch = {"image_features": features, "caption_tokens": inputs}
    before = model.evaluate(batch, targets, batch_size=3, verbose=0, return_dict=True)
    # One epoch of 40 identical batches: epochs cost more Keras overhead than steps.
    model.fit(tf.data.Dataset.from_tensors((batch, targets)).repeat(40), epochs=1, shuffle=False, verbose=0)
    results = model.evaluate(batch, targets, batch_size=3, verbose=0, return_dict=True)
    assert results["loss"] < 0.5 * before["loss"]
    assert results["masked_accuracy"] > before["masked_accuracy"]

    # Keras attaches the token mask to the logits; the reported loss must still be ours.
    logits = model(batch, training=False)
    assert results["loss"] == pytest.approx(float(decoder.masked_loss(targets, logits)), rel=1e-4)
    accuracy = decoder.MaskedAccuracy()
    accuracy.update_state(targets, logits)
    assert results["masked_accuracy"] == pytest.approx(float(accuracy.result()), abs=1e-6)

    path = tmp_path / "decoder.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert reloaded.loss is decoder.masked_loss
    np.testing.assert_allclose(reloaded(batch).numpy(), logits.numpy(), atol=1e-6)

    # compile=False needs no project code: only built-in layers are in the model.
    script = (
        "import sys, keras, numpy as np\n"
        "model = keras.saving.load_model(sys.argv[1], compile=False)\n"
        "features = np.load(sys.argv[2])\n"
        "out = model({'image_features': features['features'], 'caption_tokens': features['tokens']})\n"
        "np.save(sys.argv[3], np.asarray(out))\n"
    )
    np.savez(tmp_path / "batch.npz", features=features, tokens=inputs)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "batch.npz"), str(tmp_path / "out.npy")],
        cwd=tmp_path, env=environment, capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), logits.numpy(), atol=1e-5)
