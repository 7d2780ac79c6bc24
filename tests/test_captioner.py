"""The in-graph captioners in Python (their SavedModel, loaded by TensorFlow alone, is
tested on the exported demo model in tests/test_export.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import beam_search, captioner, decoder, image_decoding
from pipeline.core.config import DecodeConfig, DecoderConfig

WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "on", "the", "grass", "cat", "sits"]
FEATURE_DIM = 2048
IMAGE_SIZE = 32


def random_decoder(seed=0, image_input="init_state"):
    keras.utils.set_random_seed(seed)
    config = DecoderConfig(embedding_dim=8, units=16, dropout=0.3, image_input=image_input)
    return decoder.build_decoder(config, len(WORDS), feature_dim=FEATURE_DIM)


def biased_decoder(bias_by_word):
    """A decoder whose next-word distribution is softmax(bias) at every step."""
    model = random_decoder()
    logits_layer = model.get_layer(decoder.LOGITS)
    kernel, bias = logits_layer.get_weights()
    bias = np.zeros_like(bias)
    for word, value in bias_by_word.items():
        bias[WORDS.index(word)] = value
    logits_layer.set_weights([np.zeros_like(kernel), bias])
    return model, bias


def features(count, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 5.0, (count, FEATURE_DIM)).astype("float32")


def test_greedy_caption_is_the_words_joined_without_special_tokens():
    # <unk> is the most probable token but banned; no_repeat_ngram_size=1 then forces
    # "dog", "runs" and <end> in that order.
    model, bias = biased_decoder({"<unk>": 10.0, "dog": 5.0, "runs": 4.0, "<end>": 3.0})
    settings = DecodeConfig(beam_size=1, max_length=6, length_penalty=0.0, no_repeat_ngram_size=1)
    module = captioner.FeatureCaptioner(model, WORDS, settings)
    result = module.caption_features(features(2))
    assert [caption.decode() for caption in result["captions"].numpy()] == ["dog runs", "dog runs"]
    log_probs = bias - np.log(np.exp(bias).sum())
    expected = sum(log_probs[WORDS.index(word)] for word in ("dog", "runs", "<end>"))
    np.testing.assert_allclose(result["scores"].numpy(), [expected, expected], atol=1e-5)


def test_beam_caption_and_score_follow_the_length_penalty():
    model, bias = biased_decoder({"dog": 5.0, "runs": 4.5, "<end>": 3.0})
    log_probs = bias - np.log(np.exp(bias).sum())
    plain = captioner.FeatureCaptioner(model, WORDS, DecodeConfig(beam_size=3, max_length=5, length_penalty=0.0))
    result = plain.caption_features(features(1))
    # Every word costs probability, so the unpenalized best is the empty caption.
    assert result["captions"].numpy().tolist() == [b""]
    assert result["scores"].numpy()[0] == pytest.approx(log_probs[WORDS.index("<end>")], abs=1e-5)

    penalized = captioner.FeatureCaptioner(
        model, WORDS, DecodeConfig(beam_size=3, max_length=5, length_penalty=1.0, no_repeat_ngram_size=1)
    )
    # Enumerate every caption the settings allow (distinct words, <= 5) to find the winner.
    allowed = [index for index, word in enumerate(WORDS) if index > 3]
    best, best_words = log_probs[2], []
    frontier = [([], 0.0)]
    for _ in range(5):
        frontier = [(words + [w], total + log_probs[w]) for words, total in frontier for w in allowed if w not in words]
        frontier = sorted(frontier, key=lambda item: -item[1])[:50]
        for words, total in frontier:
            score = (total + log_probs[2]) / (len(words) + 1)
            if score > best:
                best, best_words = score, words
    result = penalized.caption_features(features(1))
    assert result["captions"].numpy()[0].decode() == " ".join(WORDS[w] for w in best_words)
    assert [WORDS[w] for w in best_words] == ["dog", "runs"]  # the enumeration found a long winner
    assert result["scores"].numpy()[0] == pytest.approx(best, abs=1e-5)


def test_beam_size_one_uses_greedy_search_and_beam_search_otherwise():
    model = random_decoder(seed=3, image_input="first_step")
    batch = features(4, seed=1)
    decoding = decoder.DecodingFunctions(model)
    for beam_size, search in ((1, beam_search.greedy_search), (4, beam_search.beam_search)):
        settings = DecodeConfig(beam_size=beam_size, max_length=7, length_penalty=0.7)
        module = captioner.FeatureCaptioner(model, WORDS, settings)
        token_ids, scores, lengths = search(
            decoding.initial_state(batch), decoding.step, 4, beam_size=beam_size, max_length=7,
            start_id=1, end_id=2, banned_ids=(0, 1, 3), length_penalty=0.7,
        )
        expected = [" ".join(WORDS[i] for i in row[:length]) for row, length in zip(token_ids.numpy(), lengths.numpy())]
        result = module.caption_features(batch)
        assert [caption.decode() for caption in result["captions"].numpy()] == expected
        np.testing.assert_allclose(result["scores"].numpy(), scores.numpy(), atol=1e-5)


def test_join_words_drops_special_tokens_and_padding():
    module = captioner.FeatureCaptioner(random_decoder(), WORDS, DecodeConfig(beam_size=2))
    token_ids = tf.constant([[4, 5, 6, 0, 0], [3, 10, 2, 11, 0], [0, 0, 0, 0, 0]], tf.int32)
    assert module.join_words(token_ids).numpy().tolist() == [b"a dog runs", b"cat sits", b""]


def test_mismatched_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="vocabulary has 11 words but the decoder predicts 12"):
        captioner.FeatureCaptioner(random_decoder(), WORDS[:-1], DecodeConfig())


def stand_in_encoder():
    """Pixels float32 [B, 32, 32, 3] in 0..255 -> float32 [B, 2048]; small and fast."""
    keras.utils.set_random_seed(7)
    pixels = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    hidden = keras.layers.Rescaling(1.0 / 255.0)(pixels)
    hidden = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(hidden)
    hidden = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    return keras.Model(pixels, keras.layers.Dense(FEATURE_DIM, activation="relu")(hidden))


def stand_in_decode_image(image_bytes, image_size):
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size])


def encoded_images():
    rng = np.random.default_rng(11)
    images = []
    for index in range(3):
        pixels = rng.integers(0, 256, (20 + 7 * index, 24, 3), dtype=np.uint8)
        # Smooth blocks rather than noise so the images differ in what the encoder sees.
        pixels[:, : 8 * (index + 1)] = 40 * (index + 1)
        encode = tf.io.encode_png if index != 1 else tf.io.encode_jpeg
        images.append(encode(tf.constant(pixels)).numpy())
    return images


def test_default_image_decoding_is_the_one_extraction_uses():
    feature_captioner = captioner.FeatureCaptioner(random_decoder(seed=6), WORDS, DecodeConfig(beam_size=2))
    encoder = stand_in_encoder()
    module = captioner.ImageCaptioner(encoder, feature_captioner, IMAGE_SIZE)
    images = encoded_images()
    pixels = tf.stack([image_decoding.decode_image(tf.constant(image), IMAGE_SIZE) for image in images])
    expected = feature_captioner.caption_features(encoder(pixels))
    result = module.caption_images(tf.constant(images))
    assert result["captions"].numpy().tolist() == expected["captions"].numpy().tolist()
    np.testing.assert_allclose(result["scores"].numpy(), expected["scores"].numpy(), atol=1e-5)


def test_image_captioner_with_its_own_image_decoding_captions_as_caption_features():
    feature_captioner = captioner.FeatureCaptioner(
        random_decoder(seed=5), WORDS, DecodeConfig(beam_size=3, max_length=8, length_penalty=0.7)
    )
    encoder = stand_in_encoder()
    module = captioner.ImageCaptioner(encoder, feature_captioner, IMAGE_SIZE, decode_image=stand_in_decode_image)
    images = encoded_images()
    in_python = module.caption_images(tf.constant(images))
    pixels = tf.stack([stand_in_decode_image(image, IMAGE_SIZE) for image in images])
    image_features = encoder(pixels)
    by_features = module.caption_features(image_features)
    assert in_python["captions"].numpy().tolist() == by_features["captions"].numpy().tolist()
    assert in_python["captions"].shape == (3,) and in_python["scores"].dtype == tf.float32
    for caption in in_python["captions"].numpy():
        assert set(caption.decode().split()) <= set(WORDS[4:])
        assert len(caption.split()) <= 8
