"""The feature cache's row readers: HDF5's own read and a memory map of the file give the same rows.

Caches here are real HDF5 files written by `FeatureWriter`, in batches that do not line up
with its 64-row chunks, so rows cross chunk boundaries and the last chunk is partly filled.
"""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.data import feature_writer, features

REPOSITORY = Path(__file__).resolve().parents[1]
FEATURE_DIM = 24
NUM_ROWS = 150  # two whole chunks of 64 rows and part of a third


def _values(seed):
    """float64 [NUM_ROWS, FEATURE_DIM], the rows `_write_cache(..., seed=seed)` writes."""
    return np.random.default_rng(seed).normal(size=(NUM_ROWS, FEATURE_DIM))


def _write_cache(path, dtype="float32", seed=0, batch=7):
    """A cache of the `_values(seed)` rows at `path`, appended `batch` rows at a time; returns the rows."""
    values = _values(seed)
    attrs = {"format": features.FEATURES_FORMAT, "version": features.FEATURES_VERSION, "feature_dim": FEATURE_DIM,
             "dtype": dtype}
    with feature_writer.FeatureWriter.create(path, attrs) as writer:
        for start in range(0, NUM_ROWS, batch):
            stop = min(start + batch, NUM_ROWS)
            writer.append([f"image_{row}.jpg" for row in range(start, stop)], values[start:stop])
    return values


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_mapped_rows_are_the_rows_hdf5_reads_in_any_order(tmp_path, dtype):
    values = _write_cache(tmp_path / "features.h5", dtype)
    rows = np.random.default_rng(1).integers(0, NUM_ROWS, 400)  # every chunk, repeats, any order
    with features.open_features(tmp_path) as reader:
        mapped = reader.map_rows(rows)
        assert isinstance(mapped, features.MappedRows) and mapped.shape == (400, FEATURE_DIM)
        positions = np.array([399, 0, 17, 17, 250])
        got = mapped[positions]
        assert got.dtype == np.float32 and got.shape == (5, FEATURE_DIM)
        np.testing.assert_array_equal(got, reader.read(rows[positions]))
        np.testing.assert_array_equal(mapped[np.arange(400)], values[rows].astype(dtype).astype(np.float32))
        with pytest.raises(IndexError, match=r"\[0, 150\)"):
            reader.map_rows([0, NUM_ROWS])


def test_rows_stored_compressed_are_not_mapped_and_an_unchunked_dataset_is(tmp_path):
    values = _write_cache(tmp_path / "features.h5")
    with h5py.File(tmp_path / "features.h5", "r+") as handle:
        del handle["features"]
        handle.create_dataset("features", data=values.astype(np.float32), chunks=(64, FEATURE_DIM), compression="gzip")
    rows = np.arange(NUM_ROWS)[::-3]
    with features.open_features(tmp_path) as reader:
        assert reader.map_rows(rows) is None
        np.testing.assert_array_equal(reader.read(rows), values[rows].astype(np.float32))

    with h5py.File(tmp_path / "features.h5", "r+") as handle:
        del handle["features"]
        handle.create_dataset("features", data=values.astype(np.float32))  # contiguous
    with features.open_features(tmp_path) as reader:
        assert reader._features.chunks is None
        np.testing.assert_array_equal(reader.map_rows(rows)[np.arange(len(rows))], values[rows].astype(np.float32))


REPLACE_SCRIPT = """
import sys
import numpy as np
from pathlib import Path
from pipeline.data import features
from tests import test_feature_cache as cache_tests

folder = Path(sys.argv[1])
old = cache_tests._write_cache(folder / "features.h5", seed=0)
with features.open_features(folder) as reader:
    mapped = reader.map_rows(np.arange(cache_tests.NUM_ROWS))
cache_tests._write_cache(folder / "features.h5", seed=1, batch=150)
everything = mapped[np.arange(cache_tests.NUM_ROWS)]
print("old" if np.array_equal(everything, old.astype(np.float32)) else "changed")
"""


def test_a_cache_replaced_while_mapped_leaves_the_map_reading_the_rows_it_opened(tmp_path):
    # In a child: truncating the mapped file in place would end it with SIGBUS.
    completed = subprocess.run([sys.executable, "-c", REPLACE_SCRIPT, str(tmp_path)], cwd=REPOSITORY,
                               capture_output=True, text=True, check=False)
    assert (completed.returncode, completed.stdout.strip()) == (0, "old"), completed.stderr[-2000:]
    with features.open_features(tmp_path) as reader:  # the file at the path is the new cache
        np.testing.assert_array_equal(reader.read([3]), _values(1)[[3]].astype(np.float32))
