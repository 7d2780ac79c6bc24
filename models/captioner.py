"""In-graph captioners: image vectors (or encoded images) in, caption strings out.

Both classes are `tf.Module`s whose public methods are `tf.function`s with fixed input
signatures, built only from TF ops (the decoder's layers, `models.beam_search`, a string
constant for the vocabulary). `tf.saved_model.save` can therefore export them as
signatures that load with TensorFlow alone, and evaluation in Python calls the very same
functions, so Python and the SavedModel write the same captions.
"""

import tensorflow as tf

from models import beam_search as beam_search_module
from models import decoder as decoder_module
from models import image_decoding


class FeatureCaptioner(tf.Module):
    """Captions image feature vectors with a trained decoder.

    `caption_features(features float32 [None, F])` -> `{"captions": string [None],
    "scores": float32 [None]}`: the words of the best hypothesis joined by single spaces
    (special tokens removed) and its length-normalized log probability. Beam search when
    `decode_config.beam_size > 1`, greedy search otherwise; `<pad>`, `<start>` and `<unk>`
    are never generated.
    """

    def __init__(self, decoder_model, words, decode_config, start_id=1, end_id=2, unk_id=3, pad_id=0):
        """
        Args:
            decoder_model: a Keras model from `models.decoder.build_decoder`.
            words: list[str], the vocabulary; index = id, special tokens included.
            decode_config: a `DecodeConfig` (beam_size, max_length, length_penalty,
                no_repeat_ngram_size); read once, here.
            start_id, end_id, unk_id, pad_id: ids of the special tokens in `words`.
        """
        super().__init__(name="feature_captioner")
        self.decoder_model = decoder_model
        self._decoding = decoder_module.DecodingFunctions(decoder_model)
        words = list(words)
        if len(words) != self._decoding.vocab_size:
            raise ValueError(
                f"the vocabulary has {len(words)} words but the decoder predicts "
                f"{self._decoding.vocab_size}: they come from different runs"
            )
        special_ids = {"start_id": start_id, "end_id": end_id, "unk_id": unk_id, "pad_id": pad_id}
        for name, value in special_ids.items():
            if not 0 <= value < len(words):
                raise ValueError(f"{name}={value} is outside the vocabulary of {len(words)} words")
        if decode_config.beam_size < 1 or decode_config.max_length < 1:
            raise ValueError(
                f"decode.beam_size and decode.max_length must be >= 1, got "
                f"{decode_config.beam_size} and {decode_config.max_length}"
            )
        self.feature_dim = self._decoding.feature_dim
        self.beam_size = int(decode_config.beam_size)
        self.max_length = int(decode_config.max_length)
        self.length_penalty = float(decode_config.length_penalty)
        self.no_repeat_ngram_size = int(decode_config.no_repeat_ngram_size)
        self._start_id, self._end_id = start_id, end_id
        self._banned_ids = (pad_id, start_id, unk_id)
        self._special_ids = tf.constant(sorted(special_ids.values()), tf.int32)
        # A graph constant, not a variable: the SavedModel carries the words inside the
        # function graph, and the table cannot be changed apart from the weights.
        self._words = tf.constant(words, tf.string)
        self.caption_features = tf.function(
            self._caption_features,
            input_signature=[tf.TensorSpec([None, self.feature_dim], tf.float32, name="features")],
        )

    def _caption_features(self, features):
        token_ids, scores, _ = self.decode(features)
        return {"captions": self.join_words(token_ids), "scores": scores}

    def decode(self, features):
        """features float32 [B, F] -> (token_ids int32 [B, max_length], scores float32 [B],
        lengths int32 [B]), as `models.beam_search` returns them."""
        search = beam_search_module.beam_search if self.beam_size > 1 else beam_search_module.greedy_search
        return search(
            self._decoding.initial_state(features),
            self._decoding.step,
            tf.shape(features)[0],
            beam_size=self.beam_size,
            max_length=self.max_length,
            start_id=self._start_id,
            end_id=self._end_id,
            banned_ids=self._banned_ids,
            length_penalty=self.length_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
        )

    def join_words(self, token_ids):
        """token_ids int32 [B, L] -> string [B]: words joined by one space, special ids dropped."""
        is_word = tf.reduce_all(tf.not_equal(token_ids[:, :, tf.newaxis], self._special_ids), axis=-1)
        kept = tf.ragged.boolean_mask(token_ids, is_word)
        return tf.strings.reduce_join(tf.gather(self._words, kept), axis=1, separator=" ")


class ImageCaptioner(tf.Module):
    """Captions encoded images: decode_image + encoder + `FeatureCaptioner`.

    `caption_images(images string [None])` (JPEG/PNG/GIF/BMP bytes) -> `{"captions":
    string [None], "scores": float32 [None]}`; `caption_features` is the feature
    captioner's, exposed here too so one module carries both signatures.
    """

    def __init__(self, encoder_model, feature_captioner, image_size, decode_image=None):
        """
        Args:
            encoder_model: Keras model, float32 [B, S, S, 3] pixels 0..255 -> float32 [B, F].
            feature_captioner: a `FeatureCaptioner` whose F matches the encoder's output.
            image_size: S.
            decode_image: `(bytes string scalar, image_size) -> float32 [S, S, 3]`; defaults
                to `models.image_decoding.decode_image`, the decoding that feature extraction uses.
        """
        super().__init__(name="image_captioner")
        encoder_dim = encoder_model.outputs[0].shape[-1]
        if encoder_dim != feature_captioner.feature_dim:
            raise ValueError(
                f"the encoder outputs {encoder_dim}-d vectors but the decoder reads "
                f"{feature_captioner.feature_dim}-d features"
            )
        if decode_image is None:
            decode_image = image_decoding.decode_image
        self.encoder_model = encoder_model
        self.feature_captioner = feature_captioner
        self.image_size = int(image_size)
        self._decode_image = decode_image
        self.caption_features = feature_captioner.caption_features
        self.caption_images = tf.function(
            self._caption_images,
            input_signature=[tf.TensorSpec([None], tf.string, name="images")],
        )

    def _caption_images(self, images):
        size = self.image_size
        pixels = tf.map_fn(
            lambda image_bytes: self._decode_image(image_bytes, size),
            images,
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
        )
        feature_dim = self.feature_captioner.feature_dim
        # TF's CPU convolution mishandles an empty batch (it returns its input unchanged,
        # so the next layer fails), hence no encoder call for an empty request.
        features = tf.cond(
            tf.shape(images)[0] > 0,
            lambda: tf.cast(self.encoder_model(pixels, training=False), tf.float32),
            lambda: tf.zeros([0, feature_dim], tf.float32),
        )
        return self.feature_captioner.caption_features(features)
