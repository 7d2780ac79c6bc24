"""`verify`: artifacts checked against each other, one line per finding, exit 0 or 2.

Damaged runs are copies of the session's runs with one thing broken. Most cases call
`run_verify` in-process without the SavedModel (loading ResNet50's graph costs seconds);
the command line runs twice: on a whole good export, and on a truncated cache.
"""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import verify
from pipeline.core import errors
from pipeline.data import text

REPOSITORY = Path(__file__).resolve().parents[1]


def _verify(out):
    stream = io.StringIO()
    code = verify.run_verify(out, stream=stream)
    return code, stream.getvalue().splitlines()


def _problems(lines):
    return [line for line in lines if line.startswith("problem: ")]


def _cli(out):
    return subprocess.run([sys.executable, "run_pipeline.py", "verify", "--out", str(out)],
                          cwd=REPOSITORY, capture_output=True, text=True, check=False)


@pytest.fixture
def trained_copy(trained_out, tmp_path):
    """A private copy of the trained run (decoder, no SavedModel): cheap to verify."""
    target = tmp_path / "run"
    shutil.copytree(trained_out, target)
    return target


def test_good_export_passes_on_the_command_line_and_nothing_is_written(exported_out, copy_run):
    out = copy_run(exported_out)
    before = sorted((path.relative_to(out), path.stat().st_mtime_ns) for path in out.rglob("*"))
    completed = _cli(out)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert not _problems(lines) and not [line for line in lines if line.startswith("skip: ")], lines
    assert any(line.startswith("ok: every usable image of captions.json has a row") for line in lines)
    assert any(line.startswith("ok: saved_model loads and captions one vector: '") for line in lines)
    assert lines[-1] == f"{out}: artifacts are consistent"
    assert sorted((path.relative_to(out), path.stat().st_mtime_ns) for path in out.rglob("*")) == before


def test_truncated_cache_is_one_problem_line_on_the_command_line(extracted_out, copy_run):
    out = copy_run(extracted_out)
    cache = out / "features.h5"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    completed = _cli(out)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr + completed.stdout
    problems = _problems(completed.stdout.splitlines())
    assert len(problems) == 1 and problems[0].startswith(f"problem: features.h5: {cache}: not a readable HDF5"), problems
    assert completed.stdout.splitlines()[-1] == f"1 problem(s) in {out}"


def _foreign_hdf5(out):
    (out / "features.h5").unlink()
    with h5py.File(out / "features.h5", "w") as handle:
        handle["images"] = np.zeros((3, 8), np.float32)


def _drop_image_ids(out):
    with h5py.File(out / "features.h5", "r+") as handle:
        del handle["image_ids"]


def _vocabulary_of_another_run(out):
    text.Vocabulary.build([["a", "cat"], ["a", "dog", "sits"]], 1).save(out / "vocab.json")


def _damage_config(out):
    path = out / "config.json"
    path.write_text(path.read_text()[:-40])


def _config_of_another_encoder(out):
    data = json.loads((out / "config.json").read_text())
    data["encoder"]["image_size"] = 299
    (out / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("damage, expected", [
    (_foreign_hdf5, "problem: features.h5: {out}/features.h5: not a Captioner feature cache (attribute format=None)"),
    (_drop_image_ids, "problem: features.h5: {out}/features.h5: the dataset 'image_ids' is missing"),
    (_vocabulary_of_another_run, "problem: decoder.keras predicts {vocab_size} words but vocab.json has 8: "
                                 "the vocabulary of another run? (rerun `train`)"),
    (_damage_config, "problem: config.json: {out}/config.json: the run's configuration is not valid JSON"),
    (_config_of_another_encoder, "problem: features.h5 against config.json: features.h5: the feature cache was "
                                 "made with image_size=224 but this run asks for image_size=299"),
])
def test_each_damage_is_one_named_problem(trained_copy, damage, expected):
    from pipeline.data import features

    vocab_size = len(text.Vocabulary.load(trained_copy / "vocab.json"))
    damage(trained_copy)
    code, lines = _verify(trained_copy)
    assert code == 2
    problems = _problems(lines)
    assert len(problems) == 1, lines
    assert problems[0].startswith(expected.format(out=trained_copy, vocab_size=vocab_size)), problems
    assert lines[-1] == f"1 problem(s) in {trained_copy}"
    # Checks that do not depend on the damaged artifact still run and pass.
    assert "ok: captions.json" in "\n".join(lines)
    if damage is not _foreign_hdf5 and damage is not _drop_image_ids:
        assert f"ok: {features.FEATURES_FILE}: " in "\n".join(lines)


def test_missing_rows_are_a_problem_unless_extraction_listed_them(trained_copy):
    with h5py.File(trained_copy / "features.h5", "r+") as handle:
        last = handle["image_ids"][int(handle.attrs["num_rows"]) - 1].decode()
        handle.attrs["num_rows"] = int(handle.attrs["num_rows"]) - 1  # as if a run died before it
    code, lines = _verify(trained_copy)
    assert code == 2
    assert _problems(lines) == [
        f"problem: features.h5 lacks 1 image(s) of captions.json not listed in extract_errors.json, "
        f"e.g. {last!r} (rerun `extract`)"
    ]
    failures = json.loads((trained_copy / "extract_errors.json").read_text())
    failures.append({"image_id": last, "path": last, "reason": "unreadable"})
    (trained_copy / "extract_errors.json").write_text(json.dumps(failures))
    code, lines = _verify(trained_copy)
    assert code == 0 and not _problems(lines), lines


def test_saved_model_of_another_vocabulary_is_caught(exported_out, tmp_path):
    # Only what verify reads: no TF Serving copy, decoder left out to isolate the SavedModel check.
    out = tmp_path / "run"
    shutil.copytree(exported_out, out, ignore=shutil.ignore_patterns("serving", "decoder.keras"))
    _vocabulary_of_another_run(out)
    code, lines = _verify(out)
    assert code == 2
    assert "skip: decoder.keras is not there yet (run `train`)" in lines
    problems = _problems(lines)
    exported_size = len(text.Vocabulary.load(exported_out / "vocab.json"))
    assert f"problem: saved_model was exported with {exported_size} words but vocab.json has 8: rerun `export`" \
        in problems, lines
    # The caption of one vector may also hold words the foreign vocabulary lacks: no other problem.
    assert all(problem.startswith("problem: saved_model ") for problem in problems), problems


def test_not_a_folder_is_a_pipeline_error(tmp_path):
    with pytest.raises(errors.PipelineError, match="no such folder"):
        verify.run_verify(tmp_path / "absent")
