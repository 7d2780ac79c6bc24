"""The export stage against the real exported demo model of the session (`exported_out`)."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import h5py
import pytest

from pipeline.core import config as config_module
from pipeline import export
from pipeline.core import errors
from pipeline.data import datasets, features, run_folder, text
from tests.helpers import as_version_1, python_captions

NUM_CHECKED_IMAGES = 6

# A whole program for a fresh interpreter: TensorFlow only, no project code on its path.
FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf

    request = json.load(open("request.json"))
    loaded = tf.saved_model.load(request["model_dir"])
    images = [open(path, "rb").read() for path in request["image_paths"]]
    by_images = loaded.signatures["serving_default"](images=tf.constant(images))
    by_features = loaded.signatures["caption_features"](features=tf.constant(request["features"], tf.float32))
    empty = loaded.signatures["serving_default"](images=tf.constant([], tf.string))
    project = sorted(name for name in sys.modules if name.split(".")[0] in ("pipeline", "models"))
    json.dump({
        "image_captions": [c.decode() for c in by_images["captions"].numpy().tolist()],
        "image_scores": by_images["scores"].numpy().tolist(),
        "feature_captions": [c.decode() for c in by_features["captions"].numpy().tolist()],
        "feature_scores": by_features["scores"].numpy().tolist(),
        "empty_shape": list(empty["captions"].shape),
        "signatures": sorted(loaded.signatures),
        "project_modules": project,
    }, open("answer.json", "w"))
""")


def _signature_blocks(cli_output):
    """{signature name: text of its block} from `saved_model_cli show --all` output."""
    parts = re.split(r"signature_def\['([^']+)'\]:", cli_output)
    return {parts[index]: parts[index + 1] for index in range(1, len(parts) - 1, 2)}


def _tensor(block, kind, name):
    """(dtype, shape) of inputs['name'] or outputs['name'] in a signature block."""
    match = re.search(rf"{kind}\['{name}'\] tensor_info:\s*dtype: (\w+)\s*shape: (\([^)]*\))", block)
    assert match, f"{kind}['{name}'] not in:\n{block}"
    return match.group(1), match.group(2)


def test_saved_model_cli_lists_both_signatures(exported_out):
    result = subprocess.run(
        ["saved_model_cli", "show", "--dir", str(exported_out / run_folder.SAVED_MODEL_DIR), "--all"],
        capture_output=True, text=True, check=True,
    )
    blocks = _signature_blocks(result.stdout)
    assert {"serving_default", "caption_features"} <= set(blocks)
    serving, by_features = blocks["serving_default"], blocks["caption_features"]
    assert _tensor(serving, "inputs", "images") == ("DT_STRING", "(-1)")
    assert _tensor(by_features, "inputs", "features") == ("DT_FLOAT", "(-1, 2048)")
    for block in (serving, by_features):
        assert _tensor(block, "outputs", "captions") == ("DT_STRING", "(-1)")
        assert _tensor(block, "outputs", "scores") == ("DT_FLOAT", "(-1)")
        assert len(re.findall(r"inputs\['", block)) == 1  # one input, no stray extras


def test_saved_model_loads_with_tensorflow_alone_and_matches_python_decode(exported_out, tmp_path):
    cache = features.read_features(exported_out)
    dataset = datasets.read_captions_json(exported_out)
    image_ids = cache.image_ids[:NUM_CHECKED_IMAGES]
    feature_rows = cache.features[:NUM_CHECKED_IMAGES]
    (tmp_path / "request.json").write_text(json.dumps({
        "model_dir": str(exported_out / run_folder.SAVED_MODEL_DIR),
        "image_paths": [str(dataset.image_dir / image_id) for image_id in image_ids],
        "features": feature_rows.tolist(),
    }))
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSTARTUP")}
    environment["TF_CPP_MIN_LOG_LEVEL"] = "2"
    completed = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT], cwd=tmp_path, env=environment,
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    answer = json.loads((tmp_path / "answer.json").read_text())

    expected_captions, expected_scores = python_captions(exported_out, feature_rows)
    assert answer["project_modules"] == []
    assert answer["signatures"] == ["caption_features", "serving_default"]
    assert all(expected_captions), expected_captions  # a trained decoder writes words
    assert answer["feature_captions"] == expected_captions
    assert answer["feature_scores"] == pytest.approx(expected_scores, abs=1e-5)
    # From the image bytes: decode + ResNet50 in the graph reproduce the cached features.
    assert answer["image_captions"] == expected_captions
    assert answer["image_scores"] == pytest.approx(expected_scores, abs=1e-3)
    assert all(math.isfinite(score) for score in answer["image_scores"] + answer["feature_scores"])
    assert answer["empty_shape"] == [0]


def test_export_writes_versioned_copy_and_self_description(exported_out):
    saved_model_dir = exported_out / run_folder.SAVED_MODEL_DIR
    serving_dir = exported_out / "serving" / "captioner" / "1"
    assert (serving_dir / "saved_model.pb").read_bytes() == (saved_model_dir / "saved_model.pb").read_bytes()
    assert (serving_dir / "variables" / "variables.index").is_file()
    metadata = json.loads((saved_model_dir / "assets.extra" / "captioner.json").read_text())
    assert metadata["format"] == "captioner.export"
    assert metadata["config"]["decode"]["beam_size"] == 3
    assert metadata["signatures"]["serving_default"]["inputs"] == {"images": {"dtype": "string", "shape": [-1]}}
    assert metadata["encoder"]["encoder_fingerprint"] == features.read_attrs(
        features.features_path(exported_out))["encoder_fingerprint"]
    shipped = text.Vocabulary.load(saved_model_dir / "assets.extra" / "vocab.json")
    assert shipped == text.Vocabulary.load(exported_out / text.VOCAB_FILE)
    assert metadata["vocabulary_size"] == len(shipped)


def test_reexport_with_beam_size_replaces_model_and_records_it(exported_out, copy_run, capsys):
    """Re-exported from a version 1 cache (the plain Keras graph of before folding), which exports with a note."""
    out = copy_run(exported_out)
    as_version_1(out / features.FEATURES_FILE)
    returned = export.run_export(out, {"decode.beam_size": 1, "decode.max_length": None})
    note = capsys.readouterr().out
    assert "note: features.h5 was written by the 'keras' encoder graph (cache version 1)" in note
    assert "'folded'" in note

    assert returned == out / "saved_model"
    assert sorted(path.name for path in out.iterdir() if path.name.startswith(".")) == []  # no temporaries
    metadata = json.loads((out / "saved_model" / "assets.extra" / "captioner.json").read_text())
    assert metadata["config"]["decode"]["beam_size"] == 1
    assert metadata["encoder"]["encoder_graph"] == "folded"
    assert config_module.PipelineConfig.load(out).decode.beam_size == 1
    served = json.loads((out / "serving" / "captioner" / "1" / "assets.extra" / "captioner.json").read_text())
    assert served["config"]["decode"]["beam_size"] == 1

    import tensorflow as tf

    feature_rows = features.read_features(out).features[:NUM_CHECKED_IMAGES]
    loaded = tf.saved_model.load(str(out / "saved_model"))
    exported = loaded.signatures["caption_features"](features=tf.constant(feature_rows))
    greedy_captions, _ = python_captions(out, feature_rows, beam_size=1)
    assert [caption.decode() for caption in exported["captions"].numpy().tolist()] == greedy_captions


def test_encoder_fingerprint_mismatch_is_refused_and_keeps_old_export(exported_out, copy_run):
    out = copy_run(exported_out)
    before = (out / "saved_model" / "saved_model.pb").read_bytes()
    with h5py.File(out / features.FEATURES_FILE, "a") as handle:
        handle.attrs["encoder_fingerprint"] = "0123456789abcdef"
    with pytest.raises(errors.ArtifactError, match="different encoder") as raised:
        export.run_export(out, {})
    assert "features.h5" in str(raised.value) and "0123456789abcdef" in str(raised.value)
    assert (out / "saved_model" / "saved_model.pb").read_bytes() == before


def test_missing_decoder_names_the_train_command(trained_out, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "vocab.json", "features.h5", "captions.json"):
        (out / name).write_bytes((trained_out / name).read_bytes())
    with pytest.raises(errors.ArtifactError, match=r"decoder\.keras: no trained decoder; run `train` first"):
        export.run_export(out, {})
    with pytest.raises(errors.PipelineError, match=r"decode\.beam_size \(--beam-size\) must be at least 1"):
        export.run_export(out, {"decode.beam_size": 0})
