"""The `export` stage: encoder, decoder and beam search as one SavedModel.

    python run_pipeline.py export --out OUT [--beam-size K]

writes

    OUT/saved_model/                      the SavedModel (replaced atomically)
        saved_model.pb, variables/, ...
        assets.extra/captioner.json       what the model is: signatures, settings, encoder
        assets.extra/vocab.json           the vocabulary it writes captions with
    OUT/serving/captioner/1/              the same model in the layout TF Serving loads
                                          (--model_base_path=OUT/serving/captioner)

Signatures (the contract in README.md, "The SavedModel"):
    serving_default   images   tf.string  [None] -> captions tf.string [None], scores tf.float32 [None]
    caption_features  features tf.float32 [None, 2048] -> the same outputs

The encoder is rebuilt from the run's settings and must have exactly the weights that made
`features.h5` (compared by `encoder_fingerprint`): otherwise the decoder, trained on those
features, would be paired with an encoder whose features it has never seen. It is the
folded inference form (BatchNorm folded into the convolutions) whichever form wrote the
cache: a cache of the plain Keras graph (version 1, before folding) exports too, with a
note, since the same weights give the same features (cosine >= 0.99999 at fp32).
"""

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path

import keras
import tensorflow as tf

from models import captioner as captioner_module
from models import encoder as encoder_module
from pipeline.core import device, encoder_loading, errors, io_utils
from pipeline.data import features, run_folder, text
from pipeline.serving import exported_model, server, tf_serving_files, warmup
from pipeline.serving.exported_model import FEATURES_SIGNATURE, METADATA_DIR, METADATA_FILE, SERVING_SIGNATURE

MODEL_NAME = "captioner"
MODEL_VERSION = 1
# TF Serving watches OUT/serving/<model name>/ and loads the highest numbered version.
SERVING_VERSION_DIR = Path(run_folder.SERVING_DIR) / MODEL_NAME / str(MODEL_VERSION)
METADATA_FORMAT = "captioner.export"
METADATA_VERSION = 1

# name -> (inputs, outputs), each {tensor name: (dtype name, shape)}; -1 is a free dimension.
_OUTPUTS = {"captions": ("string", [-1]), "scores": ("float32", [-1])}
SIGNATURES = {
    SERVING_SIGNATURE: ({"images": ("string", [-1])}, _OUTPUTS),
    FEATURES_SIGNATURE: ({"features": ("float32", [-1, encoder_module.FEATURE_DIM])}, _OUTPUTS),
}


def run_export(out_dir, overrides):
    """Exports the trained run in `out_dir` as a SavedModel; returns OUT/saved_model (Path).

    overrides: {"decode.beam_size": K, ...} from the command line (None values ignored);
    the decoding settings are fixed into the graph and saved back to config.json.
    Raises ArtifactError when an artifact is missing, damaged or belongs to another run.
    """
    out_dir = Path(out_dir)
    started = time.perf_counter()
    config = run_folder.read_config(out_dir, requires="`extract` and `train`").replace(overrides)
    config.check("decode")
    # The SavedModel is float32 (encoder and decoder) and pins no device; this is where it is traced.
    device.announce("export", "fp32")
    vocabulary = run_folder.read_vocabulary(out_dir)
    decoder_model = run_folder.load_decoder(out_dir, vocabulary_size=len(vocabulary))
    cache_path = out_dir / run_folder.FEATURES_FILE
    cache_attrs = run_folder.read_feature_attrs(out_dir)
    _log(started, f"building the encoder ({config.encoder.weights} weights, {config.encoder.image_size} px)")
    encoder_model = _build_matching_encoder(config, cache_attrs, cache_path)
    cache_graph, model_graph = features.cached_encoder_graph(cache_attrs), encoder_module.encoder_graph(encoder_model)
    if cache_graph != model_graph:
        print(f"  note: {cache_path.name} was written by the {cache_graph!r} encoder graph (cache version "
              f"{cache_attrs.get('version')}); the SavedModel holds the {model_graph!r} one with the same weights "
              f"(fingerprint {cache_attrs['encoder_fingerprint']}), whose features agree to cosine >= 0.99999 at fp32",
              flush=True)

    feature_captioner = captioner_module.FeatureCaptioner(
        decoder_model, list(vocabulary.words), config.decode,
        start_id=text.START_ID, end_id=text.END_ID, unk_id=text.UNK_ID, pad_id=text.PAD_ID,
    )
    image_captioner = captioner_module.ImageCaptioner(encoder_model, feature_captioner, config.encoder.image_size)
    signatures = serving_signatures(image_captioner)

    saved_model_dir = out_dir / run_folder.SAVED_MODEL_DIR
    _log(started, f"tracing and saving (beam size {config.decode.beam_size}, "
                  f"at most {config.decode.max_length} words)")
    # Each folder is written under a temporary name and renamed into place: a failed
    # write (disk full, no permission) leaves the previous export whole, if any.
    with _write_errors(saved_model_dir), io_utils.atomic_path(saved_model_dir) as temporary:
        tf.saved_model.save(image_captioner, str(temporary), signatures=signatures)
        signature_table = read_signatures(temporary)
        _check_signatures(signature_table)
        _write_metadata(temporary, config, vocabulary, cache_attrs, signature_table, model_graph)
        warmup.write_warmup_file(temporary, MODEL_NAME)
    serving_dir = out_dir / SERVING_VERSION_DIR
    with _write_errors(serving_dir), io_utils.atomic_path(serving_dir) as temporary:
        shutil.copytree(saved_model_dir, temporary)
    # TF Serving's model config and batching file beside the versioned folder; `serve` runs from them too.
    tf_serving_files.write_models_config(serving_dir.parent.parent, MODEL_NAME, MODEL_VERSION)
    tf_serving_files.write_batching_parameters(
        serving_dir.parent.parent / tf_serving_files.BATCHING_PARAMETERS_FILE, server.ServeSettings())
    config.save(out_dir)

    _log(started, f"exported {saved_model_dir}")
    print(f"  TF Serving copy: {serving_dir} (--model_name={MODEL_NAME} "
          f"--model_base_path={serving_dir.parent.resolve()})")
    for name, (inputs, outputs) in signature_table.items():
        print(f"  signature {name}: {_format_tensors(inputs)} -> {_format_tensors(outputs)}")
    return saved_model_dir


@contextlib.contextmanager
def _write_errors(directory):
    """Turns a failed write of `directory` into ArtifactError naming it and the OS reason.

    tf.saved_model.save raises tf.errors.OpError subclasses, not OSError, when a file
    cannot be written; shutil.copytree raises shutil.Error (an OSError) listing each file.
    """
    try:
        yield
    except (tf.errors.OpError, OSError) as error:
        raise errors.ArtifactError(f"{directory}: cannot write the SavedModel ({_write_reason(error)})") from None


def _write_reason(error):
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        error = error.args[0][0][2]  # [(source, destination, reason), ...]: the first says why
    if isinstance(error, OSError) and not isinstance(error, shutil.Error):
        return error.strerror or str(error)
    message = " ".join((getattr(error, "message", None) or str(error)).split())
    # "{{function_node ...}} <temporary file>; File too large [Op:SaveV2]": the OS reason
    # is last; the temporary file's name would only mislead.
    message = message.split("}}", 1)[-1].split(" [Op:")[0].strip()
    return message.rsplit("; ", 1)[-1][:300]


def serving_signatures(image_captioner):
    """The contract's signatures of an `ImageCaptioner`: {name: concrete function}.

    `serving_default` takes `images` (tf.string [None]); `caption_features` takes
    `features` (tf.float32 [None, 2048]); both return `captions` and `scores`.
    """
    return {
        SERVING_SIGNATURE: image_captioner.caption_images.get_concrete_function(
            tf.TensorSpec([None], tf.string, name="images")),
        FEATURES_SIGNATURE: image_captioner.caption_features.get_concrete_function(
            tf.TensorSpec([None, encoder_module.FEATURE_DIM], tf.float32, name="features")),
    }


def read_signatures(saved_model_dir):
    """The signatures in a SavedModel's saved_model.pb, as `saved_model_cli show` lists them.

    Returns {signature name: (inputs, outputs)}, each {tensor name: (dtype name, shape)}
    with -1 for unknown dimensions; the internal `__saved_model_init_op` is left out.
    """
    table = {}
    for name, signature in exported_model.read_signature_defs(saved_model_dir).items():
        if name.startswith("__"):
            continue
        table[name] = tuple(
            {key: (tf.dtypes.as_dtype(info.dtype).name,
                   [dimension.size for dimension in info.tensor_shape.dim])
             for key, info in sorted(tensors.items())}
            for tensors in (signature.inputs, signature.outputs)
        )
    return dict(sorted(table.items()))


def _check_signatures(signature_table):
    # Our own code built these functions: a difference is a bug here, not a user error.
    expected = {name: ({key: (dtype, list(shape)) for key, (dtype, shape) in inputs.items()},
                       {key: (dtype, list(shape)) for key, (dtype, shape) in outputs.items()})
                for name, (inputs, outputs) in SIGNATURES.items()}
    assert signature_table == expected, f"exported signatures {signature_table} differ from the contract {expected}"


def _build_matching_encoder(config, cache_attrs, cache_path):
    """Rebuilds the encoder that made `features.h5`; ArtifactError if its weights differ."""
    # The cache records the precision it was extracted with; only weights and sizes matter
    # here, so compare everything else under the cache's own precision.
    encoder_config = dataclasses.replace(config.encoder, precision=cache_attrs.get("precision", config.encoder.precision))
    features.check_attrs(cache_attrs, encoder_config, path=cache_path)
    cached_fingerprint = cache_attrs.get("encoder_fingerprint")
    if not cached_fingerprint:
        raise errors.ArtifactError(
            f"{cache_path}: has no encoder_fingerprint attribute, so the export cannot check that it rebuilds "
            f"the encoder the decoder was trained with; re-extract with `python run_pipeline.py extract --overwrite`")
    # float32 whatever the extraction used: the SavedModel must run on any CPU, and mixed
    # precision changes only the arithmetic, not the weights the fingerprint covers.
    encoder_model = encoder_loading.load_encoder(
        config.encoder.weights, config.encoder.image_size, seed=config.seed, precision="fp32")
    fingerprint = encoder_module.encoder_fingerprint(encoder_model)
    if fingerprint != cached_fingerprint:
        raise errors.ArtifactError(
            f"{cache_path}: the rebuilt encoder (weights={config.encoder.weights!r}, seed={config.seed}) has "
            f"fingerprint {fingerprint} but the features were extracted by one with fingerprint "
            f"{cached_fingerprint}: the SavedModel would pair the decoder with a different encoder than the "
            f"one it was trained on. Export with the same --weights and seed as `extract`, or re-extract and retrain")
    return encoder_model


def _write_metadata(saved_model_dir, config, vocabulary, cache_attrs, signature_table, encoder_graph):
    """Writes assets.extra/ so a served model describes itself (vocabulary, settings, encoder)."""
    metadata_dir = Path(saved_model_dir) / METADATA_DIR
    metadata_dir.mkdir(parents=True, exist_ok=True)
    vocabulary.save(metadata_dir / run_folder.VOCAB_FILE)
    encoder_keys = ("encoder", "weights", "image_size", "pooling", "feature_dim", "encoder_fingerprint")
    io_utils.write_json(metadata_dir / METADATA_FILE, {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "model_name": MODEL_NAME,
        "model_version": MODEL_VERSION,
        "signatures": {
            name: {"inputs": {key: {"dtype": dtype, "shape": shape} for key, (dtype, shape) in inputs.items()},
                   "outputs": {key: {"dtype": dtype, "shape": shape} for key, (dtype, shape) in outputs.items()}}
            for name, (inputs, outputs) in signature_table.items()
        },
        "vocabulary_size": len(vocabulary),
        "vocabulary_file": f"{METADATA_DIR}/{run_folder.VOCAB_FILE}",
        # encoder_graph: the form of ResNet50 inside this SavedModel ("folded"), which
        # may differ from the one that wrote the cache (features.cached_encoder_graph).
        "encoder": {**{key: cache_attrs[key] for key in encoder_keys if key in cache_attrs},
                    "encoder_graph": encoder_graph},
        "config": config.to_dict(),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    })


def _format_tensors(tensors):
    def dimensions(shape):
        return "[" + ", ".join("None" if size == -1 else str(size) for size in shape) + "]"

    return ", ".join(f"{name} {dtype} {dimensions(shape)}" for name, (dtype, shape) in tensors.items())


def _log(started, message):
    print(f"[export {time.perf_counter() - started:5.1f}s] {message}", flush=True)
