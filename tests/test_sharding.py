"""Sharded extraction across processes: `extract --num-shards N --shard-index K` run as
concurrent processes into one OUT, then `merge-features`, equals one unsharded run
(failed images included: each is reported by the one shard it falls in)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from pipeline.data import feature_writer, features, run_folder
from tests.conftest import SMALL_EXTRACT_FLAGS

REPOSITORY = Path(__file__).resolve().parents[1]


def test_two_concurrent_shard_processes_merge_into_the_unsharded_cache(small_data, reference_cache, tmp_path):
    # small_data and two captioned files that are not images: each falls in one shard,
    # which reports it, and the merge equals the unsharded cache of the good images.
    data_dir = tmp_path / "data"
    shutil.copytree(small_data, data_dir)
    bad = {"empty.png": b"", "text.png": b"a caption file, not a picture\n"}
    for name, content in bad.items():
        (data_dir / "Images" / name).write_bytes(content)
    with open(data_dir / "captions.txt", "a") as captions:
        captions.writelines(f"{name},a picture that is not one\n" for name in bad)
    out = tmp_path / "sharded"
    processes = [
        subprocess.Popen(
            [sys.executable, "run_pipeline.py", "extract", "--data", str(data_dir), "--out", str(out),
             *SMALL_EXTRACT_FLAGS, "--num-shards", "2", "--shard-index", str(index)],
            cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for index in (0, 1)
    ]
    results = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr[-3000:]

    shard_ids = [features.read_features(None, path=out / run_folder.FEATURES_SHARD_PATTERN.format(index=index, count=2))
                 .image_ids for index in (0, 1)]
    failed_ids = [[entry["image_id"] for entry in json.loads(
        (out / run_folder.EXTRACT_ERRORS_SHARD_PATTERN.format(index=index, count=2)).read_text())] for index in (0, 1)]
    # A deterministic partition: every listed image in exactly one shard, both shards used.
    assert sorted(shard_ids[0] + shard_ids[1]) == sorted(reference_cache.image_ids)
    assert not set(shard_ids[0]) & set(shard_ids[1]) and all(shard_ids)
    assert sorted(failed_ids[0] + failed_ids[1]) == sorted(bad)

    merged = subprocess.run([sys.executable, "run_pipeline.py", "merge-features", "--out", str(out)],
                            cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert merged.returncode == 0, merged.stderr[-3000:]
    cache = features.read_features(out)
    assert cache.image_ids == reference_cache.image_ids == sorted(cache.image_ids)
    np.testing.assert_allclose(cache.features, reference_cache.features, rtol=0, atol=1e-5)
    assert cache.attrs["encoder_fingerprint"] == reference_cache.attrs["encoder_fingerprint"]
    with h5py.File(out / run_folder.FEATURES_FILE, "r") as merged_file, \
            h5py.File(out / run_folder.FEATURES_SHARD_PATTERN.format(index=0, count=2), "r") as shard_file:
        for name in ("encoder", "weights", "image_size", "encoder_fingerprint", "dtype"):
            assert merged_file.attrs[name] == shard_file.attrs[name], name


def test_merge_without_every_shard_names_the_missing_one(small_data, tmp_path):
    import pytest

    from pipeline import extract
    from pipeline.core import errors
    from tests.conftest import SMALL_EXTRACT_OVERRIDES

    out = tmp_path / "half"
    extract.run_extract(small_data, out, dict(SMALL_EXTRACT_OVERRIDES), num_shards=3, shard_index=1)
    with pytest.raises(errors.ArtifactError, match=r"features\.shard-0-of-3\.h5, features\.shard-2-of-3\.h5"):
        feature_writer.merge_shards(out)
