"""Mixed-precision decoders: 16-bit arithmetic, float32 variables and outputs, a float32 copy that captions alike."""

import gc
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import captioner, decoder
from pipeline.core.config import DecodeConfig, DecoderConfig
from pipeline.data import run_folder

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


def test_save_decoder_writes_keras_archive_of_the_float32_form_and_frees_the_copy(tmp_path):
    keras.utils.set_random_seed(0)
    model = decoder.build_decoder(CONFIG, len(WORDS), FEATURE_DIM, dtype_policy="mixed_bfloat16")
    model.save(tmp_path / "by_keras.keras")
    path = run_folder.save_decoder(model, tmp_path)
    with zipfile.ZipFile(path) as ours, zipfile.ZipFile(tmp_path / "by_keras.keras") as keras_own:
        assert sorted(ours.namelist()) == sorted(keras_own.namelist())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by_keras.keras", run_folder.DECODER_FILE]
    loaded = keras.saving.load_model(path, compile=False)
    assert decoder.dtype_policy_of(loaded) == "float32"
    for ours, theirs in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    del loaded

    # Each save's float32 copy is freed with it, not at Python's next full collection.
    def models_alive():
        return sum(isinstance(thing, keras.Model) for thing in gc.get_objects())

    gc.collect()
    before = models_alive()
    for _ in range(3):
        run_folder.save_decoder(model, tmp_path)
    assert models_alive() == before


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


def _signature_devices(saved_model_dir):
    """{device string: node count} over the nodes the SavedModel's signatures run: the graph
    nodes their outputs depend on and every function those call, recursively. TF's own
    checkpoint save/restore functions, which pin their file ops to the host CPU in every
    SavedModel and which serving never runs, are not among them."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0]
    nodes = {node.name: node for node in graph.graph_def.node}
    functions = {function.signature.name: function for function in graph.graph_def.library.function}
    pending = [tensor.name.split(":")[0] for signature in graph.signature_def.values()
               for tensor in signature.outputs.values()]
    seen, devices = set(), {}

    def visit(node, inputs_in_graph):
        devices[node.device] = devices.get(node.device, 0) + 1
        if inputs_in_graph:
            pending.extend(name.lstrip("^").split(":")[0] for name in node.input)
        for attr in node.attr.values():
            for name in [attr.func.name] + [function.name for function in attr.list.func]:
                if name in functions and name not in seen:
                    seen.add(name)
                    for inner in functions[name].node_def:
                        visit(inner, inputs_in_graph=False)

    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            visit(nodes[name], inputs_in_graph=True)
    return devices


def test_bf16_training_records_its_device_saves_float32_and_exports_an_unpinned_float32_model(
        extracted_out, copy_run, capsys):
    from pipeline import export, train
    from pipeline.data import run_folder
    from tests.conftest import TRAIN_OVERRIDES

    out = copy_run(extracted_out)
    train.run_train(out, {**TRAIN_OVERRIDES, "train.precision": "bf16", "train.epochs": 2})
    device_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: CPU")]
    assert len(device_lines) == 1 and device_lines[0].endswith("(bf16)")
    config = run_folder.read_config(out, requires="`train`")
    assert config.train.precision == "bf16" and device_lines[0] == f"train: {config.train.device}"
    history = run_folder.read_training_history(out)
    assert history and all(entry["device"] == config.train.device and entry["precision"] == "bf16"
                           for entry in history)
    # The decoder is saved in its float32 form: readers compute as for a float32-trained one.
    model = run_folder.load_decoder(out)
    assert decoder.dtype_policy_of(model) == "float32" and {w.dtype for w in model.weights} == {"float32"}

    saved_model = export.run_export(out, {"decode.beam_size": 2})
    devices = _signature_devices(saved_model)
    assert sum(devices.values()) > 1000 and set(devices) == {""}  # nothing pinned: TF Serving's GPU image places it
    loaded = tf.saved_model.load(str(saved_model))
    by_features = loaded.signatures["caption_features"]
    assert by_features.structured_input_signature[1]["features"].dtype == tf.float32
    assert by_features.structured_outputs["scores"].dtype == tf.float32
    with tf.device("/CPU:0"):
        features = np.random.default_rng(0).uniform(0, 3, (2, model.get_layer("image_features").output.shape[-1]))
        assert by_features(features=tf.constant(features, tf.float32))["captions"].shape == (2,)


def test_fp16_training_scales_the_loss_and_says_what_it_does_on_a_cpu(extracted_out, copy_run, capsys):
    from pipeline import train
    from pipeline.training import objective
    from tests.conftest import TRAIN_OVERRIDES

    out = copy_run(extracted_out)
    summary = train.run_train(out, {**TRAIN_OVERRIDES, "train.precision": "fp16", "train.epochs": 1})
    err = capsys.readouterr().err
    if not tf.config.list_physical_devices("GPU"):
        assert "fp16 is for GPUs" in err and "Running in fp16 as asked" in err
    assert np.isfinite(summary["best_score"])
    model = objective.build_model(_fp16_config(), 12, 8)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    with pytest.raises(Exception, match="train.precision \\(--precision\\) must be one of bf16, fp16, fp32 or auto"):
        train.run_train(out, {"train.precision": "int8"})


def _fp16_config():
    from pipeline.core import config as config_module

    return config_module.PipelineConfig().replace({"train.precision": "fp16", "decoder.units": 8,
                                                   "decoder.embedding_dim": 4})


def test_bf16_finetuning_records_its_device_and_saves_float32(trained_out, copy_run, capsys):
    from pipeline import finetune
    from pipeline.data import run_folder
    from tests.conftest import FINETUNE_SETTINGS

    out = copy_run(trained_out)
    finetune.run_finetune(out, {**FINETUNE_SETTINGS, "finetune.epochs": 1, "finetune.precision": "bf16"})
    device_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune: CPU")]
    assert len(device_lines) == 1 and device_lines[0].endswith("(bf16)")
    settings = run_folder.read_finetune_history(out)["settings"]
    assert settings["precision"] == "bf16" and device_lines[0] == f"finetune: {settings['device']}"
    assert decoder.dtype_policy_of(run_folder.load_decoder(out)) == "float32"
    with pytest.raises(Exception, match="--resume cannot change finetune.precision"):
        finetune.run_finetune(out, {"finetune.precision": "fp32"}, resume=True)


def test_extraction_defaults_to_the_machines_precision_and_records_it(small_data, tmp_path):
    import h5py

    from pipeline import extract
    from pipeline.core import device
    from tests.conftest import SMALL_EXTRACT_OVERRIDES

    # The defaults: precision "auto", and a batch sized for the device.
    overrides = {name: value for name, value in SMALL_EXTRACT_OVERRIDES.items()
                 if name not in ("encoder.precision", "encoder.batch_size")}
    extract.run_extract(small_data, tmp_path / "out", overrides)
    with h5py.File(tmp_path / "out" / "features.h5", "r") as handle:
        precision, computed_on = handle.attrs["precision"], handle.attrs["device"]
    assert precision == device.resolve_precision("auto")  # bf16 on this AVX512-BF16 machine
    assert computed_on.endswith(f"({precision})")


def test_the_defaults_are_the_measured_ones():
    from pipeline.core import config as config_module

    defaults = config_module.PipelineConfig()
    # docs/GPU.md: bf16 cost no caption quality in extraction and fine-tuning, within 3% in training.
    precisions = (defaults.encoder.precision, defaults.train.precision, defaults.finetune.precision)
    assert precisions == ("auto", "auto", "auto")
