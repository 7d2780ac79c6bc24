"""Mixed-precision decoders: 16-bit arithmetic, float32 variables and outputs, a float32 copy that captions alike."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import captioner, decoder
from pipeline.core.config import DecodeConfig, DecoderConfig

FEATURE_DIM = 16
WORDS = ["<pad>", "<start>", "<end>", "<unk>", "red", "green", "blue", "square", "circle", "a"]
CONFIG = DecoderConfig(embedding_dim=16, units=32, dropout=0.0)
MIXED = ["mixed_bfloat16", "mixed_float16"]


def batch(rows=3):
    """inputs of `build_decoder` models: features float32 [rows, F], tokens int32 [rows, 4]."""
    features = np.random.default_rng(0).uniform(0.0, 5.0, (rows, FEATURE_DIM)).astype("float32")
    return {"image_features": features, "caption_tokens": np.tile(np.array([[1, 9, 4, 7]], "int32"), (rows, 1))}


@pytest.mark.parametrize("policy", MIXED)
def test_mixed_decoder_computes_in_16_bits_and_returns_float32_logits(policy, tmp_path):
    keras.utils.set_random_seed(0)
    model = decoder.build_decoder(CONFIG, len(WORDS), FEATURE_DIM, dtype_policy=policy)
    assert decoder.dtype_policy_of(model) == policy
    assert model.get_layer(decoder.LOGITS).compute_dtype == policy.removeprefix("mixed_")
    assert {weight.dtype for weight in model.weights} == {"float32"}
    logits = model(batch())
    assert logits.dtype == tf.float32 and logits.shape == (3, 4, len(WORDS))
    # Saved and loaded, the policy stays (a resumed run trains as it started).
    model.save(tmp_path / "mixed.keras")
    loaded = keras.saving.load_model(tmp_path / "mixed.keras", compile=False)
    assert decoder.dtype_policy_of(loaded) == policy
    np.testing.assert_array_equal(loaded(batch()), logits)


@pytest.mark.parametrize("policy, image_input", [("mixed_bfloat16", "init_state"), ("mixed_float16", "first_step")])
def test_float32_copy_has_the_same_weights_and_close_logits(policy, image_input):
    keras.utils.set_random_seed(0)
    config = DecoderConfig(embedding_dim=16, units=32, dropout=0.25, image_input=image_input)
    model = decoder.build_decoder(config, len(WORDS), FEATURE_DIM, dtype_policy=policy)
    copy = decoder.with_dtype_policy(model, "float32")
    assert decoder.dtype_policy_of(copy) == "float32" and decoder.LOGITS_FLOAT32 not in {l.name for l in copy.layers}
    assert copy.get_config()["name"] == model.get_config()["name"]  # the same image input, sizes from the layers
    assert copy.get_layer(decoder.IMAGE_DROPOUT).rate == 0.25
    for ours, theirs in zip(model.get_weights(), copy.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # bfloat16 keeps 8 bits of mantissa: ~0.4% of each logit; float16 11 bits.
    np.testing.assert_allclose(model(batch()), copy(batch()), atol=0.05 if policy == "mixed_bfloat16" else 0.005)
    assert decoder.with_dtype_policy(copy, "float32") is copy
    with pytest.raises(ValueError, match="dtype_policy must be one of float32, mixed_bfloat16, mixed_float16"):
        decoder.build_decoder(CONFIG, len(WORDS), FEATURE_DIM, dtype_policy="bfloat16")


@pytest.fixture(scope="module")
def trained_bf16_decoder():
    """A decoder trained in mixed_bfloat16 until each of 4 images has one caption (margins far above bf16's error)."""
    keras.utils.set_random_seed(0)
    captions = [[1, 9, 4, 7, 2], [1, 9, 5, 8, 2], [1, 9, 6, 7, 2], [1, 9, 4, 8, 2]]
    features = np.eye(4, FEATURE_DIM, dtype="float32") * 3.0
    tokens = np.array(captions, "int32")
    model = decoder.build_decoder(CONFIG, len(WORDS), FEATURE_DIM, dtype_policy="mixed_bfloat16")
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=decoder.masked_loss)
    inputs, targets = decoder.make_training_pair(tokens)
    model.fit({"image_features": features, "caption_tokens": inputs}, targets, epochs=120, batch_size=4, verbose=0)
    return model, features, ["a red square", "a green circle", "a blue square", "a red circle"]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_beam_search_of_the_float32_copy_gives_the_mixed_decoders_captions(beam_size, trained_bf16_decoder):
    model, features, expected = trained_bf16_decoder
    decode = DecodeConfig(beam_size=beam_size, max_length=6, length_penalty=0.0)
    results = [
        captioner.FeatureCaptioner(form, WORDS, decode, start_id=1, end_id=2, unk_id=3, pad_id=0)
        .caption_features(features) for form in (model, decoder.with_dtype_policy(model, "float32"))
    ]
    for result in results:
        assert [caption.decode() for caption in result["captions"].numpy()] == expected
        assert result["scores"].dtype == tf.float32
    np.testing.assert_allclose(results[0]["scores"].numpy(), results[1]["scores"].numpy(), atol=0.05)
