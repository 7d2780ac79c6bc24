"""The feature cache `OUT/features.h5`: one encoder vector per image, written as it goes.

Schema (checked on every open):
    features   float32 or float16 [N, 2048], chunked and resizable
    image_ids  UTF-8 variable-length strings [N], paths relative to the image folder
    attributes format="captioner.features", version, encoder, weights, image_size,
               pooling, dtype, feature_dim, precision, encoder_fingerprint, num_rows,
               tensorflow_version, keras_version, h5py_version

Crash safety: a batch is appended (datasets resized and written, file flushed) before
`num_rows` is raised and flushed again, so `num_rows` only ever counts rows whose
feature vector and id are both on disk. Readers ignore anything past `num_rows`, and a
writer reopening the file cuts it back there: a run killed mid-batch loses only that
batch. The file keeps HDF5's default (earliest) format: files written with
libver="latest" stay marked "open for writing" after a crash and then refuse to open
until `h5clear` is run on them.
"""

import dataclasses
import os
from pathlib import Path

import h5py
import numpy as np

from pipeline import errors

FEATURES_FILE = "features.h5"
FEATURES_FORMAT = "captioner.features"
FEATURES_VERSION = 1
SHARD_PATTERN = "features.shard-{index}-of-{count}.h5"
# Rows per HDF5 chunk: 64 x 2048 float32 = 512 KiB, a good unit for both appends and reads.
CHUNK_ROWS = 64
# Attributes that must agree between a cache and the encoder settings asking for it.
CHECKED_ATTRIBUTES = ("encoder", "weights", "image_size", "pooling", "dtype", "feature_dim", "precision")


@dataclasses.dataclass
class FeatureCache:
    """The whole cache in memory.

    image_ids: N strings (row order of the file).
    features: float32 [N, feature_dim] (float16 storage is widened on read).
    attrs: the file's attributes as plain Python values.
    """

    image_ids: list
    features: np.ndarray
    attrs: dict

    def index(self):
        """{image_id: row} for lookups by id."""
        return {image_id: row for row, image_id in enumerate(self.image_ids)}


def features_path(out_dir, num_shards=1, shard_index=0):
    """OUT/features.h5, or OUT/features.shard-K-of-N.h5 for one shard of a sharded run."""
    if num_shards == 1:
        return Path(out_dir) / FEATURES_FILE
    return Path(out_dir) / SHARD_PATTERN.format(index=shard_index, count=num_shards)


def expected_attrs(encoder_config, fingerprint=None):
    """The attributes a cache made with `encoder_config` (an EncoderConfig) carries.

    `encoder_config.precision` should already be resolved ("auto" -> "bf16"/"fp16"/"fp32",
    `models.encoder.resolve_precision`): the attribute records what was computed.
    """
    import h5py as h5py_module
    import keras
    import tensorflow

    attrs = {
        "format": FEATURES_FORMAT,
        "version": FEATURES_VERSION,
        "encoder": encoder_config.name,
        "weights": _weights_attr(encoder_config.weights),
        "image_size": int(encoder_config.image_size),
        "pooling": encoder_config.pooling,
        "dtype": encoder_config.feature_dtype,
        "feature_dim": int(encoder_config.feature_dim),
        "precision": encoder_config.precision,
        "tensorflow_version": tensorflow.__version__,
        "keras_version": keras.__version__,
        "h5py_version": h5py_module.__version__,
    }
    if fingerprint is not None:
        attrs["encoder_fingerprint"] = fingerprint
    return attrs


def _weights_attr(weights):
    # A weights file is recorded by absolute path; its identity is checked by fingerprint.
    if weights in ("imagenet", "random"):
        return weights
    return str(Path(weights).resolve())


def check_attrs(attrs, encoder_config, fingerprint=None, path=FEATURES_FILE):
    """Raises ArtifactError if a cache's attributes do not match the requested encoder.

    attrs: the cache's attributes (dict). encoder_config: an EncoderConfig.
    fingerprint: the built encoder's `encoder_fingerprint`, checked when both are known.
    The message names the attribute, the cached and the requested value, and the way out.
    """
    wanted = expected_attrs(encoder_config, fingerprint)
    for name in CHECKED_ATTRIBUTES:
        if name not in attrs:
            continue  # older caches lack "precision"; everything else is checked on open
        cached, requested = attrs[name], wanted[name]
        if name == "weights" and _is_file(cached) and _is_file(requested):
            continue  # the same weights may have moved; the fingerprint decides
        if cached != requested:
            # Rows of one cache come from one arithmetic, so its `precision` attribute
            # stays true; bf16 and fp32 vectors differ by ~1e-3 relative, which a
            # decoder would not notice, but a mixed file could no longer say what it holds.
            hint = f" or --precision {cached}" if name == "precision" else ""
            _mismatch(path, name, cached, requested, hint)
    cached_fingerprint = attrs.get("encoder_fingerprint")
    if fingerprint is not None and cached_fingerprint and cached_fingerprint != fingerprint:
        _mismatch(path, "encoder_fingerprint", cached_fingerprint, fingerprint)


def _is_file(weights):
    return weights not in ("imagenet", "random")


def _mismatch(path, name, cached, requested, hint=""):
    raise errors.ArtifactError(
        f"{path}: the feature cache was made with {name}={cached!r} but this run asks for "
        f"{name}={requested!r}; rerun with --overwrite to replace it{hint}, or choose another --out"
    )


def _open_h5(path, mode):
    path = Path(path)
    if mode == "r" and not path.is_file():
        raise errors.ArtifactError(f"{path}: the feature cache is missing (run the extract stage first)")
    try:
        return h5py.File(path, mode)
    except (OSError, ValueError) as error:
        raise errors.ArtifactError(
            f"{path}: not a readable HDF5 feature cache (damaged, truncated or another kind of file: {error})"
        ) from None


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _validate(handle, path):
    """Checks the schema; returns (attrs as a dict, number of valid rows)."""
    attrs = {name: _plain(value) for name, value in handle.attrs.items()}
    if attrs.get("format") != FEATURES_FORMAT:
        raise errors.ArtifactError(f"{path}: not a Captioner feature cache (attribute format={attrs.get('format')!r})")
    if attrs.get("version") != FEATURES_VERSION:
        raise errors.ArtifactError(
            f"{path}: feature cache version {attrs.get('version')!r} is not supported (expected {FEATURES_VERSION})"
        )
    for name in ("features", "image_ids"):
        if name not in handle:
            raise errors.ArtifactError(f"{path}: the dataset {name!r} is missing")
    features, image_ids = handle["features"], handle["image_ids"]
    feature_dim = attrs.get("feature_dim")
    if features.ndim != 2 or features.shape[1] != feature_dim:
        raise errors.ArtifactError(
            f"{path}: dataset 'features' has shape {features.shape}, expected (N, {feature_dim})"
        )
    if features.dtype != np.dtype(attrs.get("dtype", "")):
        raise errors.ArtifactError(f"{path}: dataset 'features' is {features.dtype}, attribute dtype says {attrs.get('dtype')!r}")
    num_rows = attrs.get("num_rows")
    if not isinstance(num_rows, int) or not 0 <= num_rows <= min(features.shape[0], image_ids.shape[0]):
        raise errors.ArtifactError(
            f"{path}: attribute num_rows={num_rows!r} does not fit the datasets "
            f"({features.shape[0]} feature rows, {image_ids.shape[0]} ids)"
        )
    return attrs, num_rows


def _check_expect(attrs, expect, path):
    if expect is None:
        return
    if isinstance(expect, dict):
        for name, value in expect.items():
            if attrs.get(name) != value:
                _mismatch(path, name, attrs.get(name), value)
    else:
        check_attrs(attrs, expect, path=path)


def read_features(out_dir, expect=None, path=None):
    """Loads the whole cache of OUT into memory.

    expect: None, an EncoderConfig (checked with check_attrs), or a dict of attribute
        values that must match (e.g. {"encoder_fingerprint": "..."}).
    path: an explicit file instead of OUT/features.h5 (shards).
    Returns a FeatureCache with float32 [N, feature_dim] features; raises ArtifactError
    if the file is missing, damaged, foreign or does not match `expect`.
    """
    path = Path(path) if path is not None else features_path(out_dir)
    with _open_h5(path, "r") as handle:
        attrs, num_rows = _validate(handle, path)
        _check_expect(attrs, expect, path)
        features = handle["features"][:num_rows].astype(np.float32, copy=False)
        image_ids = [value.decode("utf-8") for value in handle["image_ids"][:num_rows]]
    return FeatureCache(image_ids=image_ids, features=features, attrs=attrs)


class FeatureReader:
    """Streaming access to a cache too large for memory; use as a context manager.

    image_ids: list of N strings; attrs: dict; len(reader) == N.
    `read(rows)` -> float32 [len(rows), feature_dim] for row indices (any order).
    `batches(batch_size)` yields (image_ids, float32 [b, feature_dim]) in file order.
    """

    def __init__(self, path, expect=None):
        self.path = Path(path)
        self._handle = _open_h5(self.path, "r")
        try:
            self.attrs, self.num_rows = _validate(self._handle, self.path)
            _check_expect(self.attrs, expect, self.path)
            self.image_ids = [value.decode("utf-8") for value in self._handle["image_ids"][: self.num_rows]]
        except BaseException:
            self._handle.close()
            raise
        self._features = self._handle["features"]

    def __len__(self):
        return self.num_rows

    def read(self, rows):
        """float32 [len(rows), feature_dim] for the given row indices (ints < N)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"row indices must be in [0, {self.num_rows})")
        # h5py wants increasing unique indices; read those, then put them in the asked order.
        unique, inverse = np.unique(rows, return_inverse=True)
        block = self._features[unique] if unique.size else np.zeros((0, self._features.shape[1]))
        return np.asarray(block, dtype=np.float32)[inverse]

    def batches(self, batch_size):
        for start in range(0, self.num_rows, batch_size):
            stop = min(start + batch_size, self.num_rows)
            yield self.image_ids[start:stop], np.asarray(self._features[start:stop], dtype=np.float32)

    def close(self):
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


def open_features(out_dir, expect=None, path=None):
    """A FeatureReader on OUT/features.h5 (or `path`), checked as read_features does."""
    return FeatureReader(Path(path) if path is not None else features_path(out_dir), expect)


def read_attrs(path):
    """The attributes of an existing cache file, validated (ArtifactError if damaged)."""
    with _open_h5(path, "r") as handle:
        attrs, _ = _validate(handle, path)
    return attrs


class FeatureWriter:
    """Appends rows to a cache file, flushing after every batch (see the module docstring).

    `FeatureWriter.create(path, attrs)` starts a new file; `FeatureWriter.append_to(path)`
    reopens one (cutting it back to `num_rows`). `append(image_ids, features)` writes a
    batch: features float [b, feature_dim], stored in the file's dtype.
    """

    def __init__(self, handle, path):
        self._handle = handle
        self.path = Path(path)
        self._features = handle["features"]
        self._image_ids = handle["image_ids"]
        self.num_rows = int(handle.attrs["num_rows"])

    @classmethod
    def create(cls, path, attrs):
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = h5py.File(path, "w")
        except OSError as error:
            raise _write_error(path, error) from None
        feature_dim = int(attrs["feature_dim"])
        handle.create_dataset(
            "features", shape=(0, feature_dim), maxshape=(None, feature_dim),
            dtype=np.dtype(attrs["dtype"]), chunks=(CHUNK_ROWS, feature_dim),
        )
        handle.create_dataset(
            "image_ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"), chunks=(1024,),
        )
        for name, value in attrs.items():
            handle.attrs[name] = value
        handle.attrs["num_rows"] = 0
        handle.flush()
        return cls(handle, path)

    @classmethod
    def append_to(cls, path):
        handle = _open_h5(path, "r+")
        try:
            _, num_rows = _validate(handle, path)
            # Rows past num_rows belong to a batch a killed run never finished.
            handle["features"].resize(num_rows, axis=0)
            handle["image_ids"].resize(num_rows, axis=0)
            handle.flush()
        except BaseException:
            handle.close()
            raise
        return cls(handle, path)

    def append(self, image_ids, features):
        count = len(image_ids)
        assert features.shape == (count, self._features.shape[1]), (features.shape, count)
        if count == 0:
            return
        stop = self.num_rows + count
        try:
            self._features.resize(stop, axis=0)
            self._image_ids.resize(stop, axis=0)
            self._features[self.num_rows:stop] = features.astype(self._features.dtype, copy=False)
            self._image_ids[self.num_rows:stop] = list(image_ids)
            self._handle.flush()
            # Only now, with both datasets on disk, do the rows count.
            self._handle.attrs["num_rows"] = stop
            self._handle.flush()
        except (OSError, RuntimeError) as error:  # h5py raises RuntimeError when a flush fails (disk full)
            raise _write_error(self.path, error) from None
        self.num_rows = stop

    def set_attr(self, name, value):
        self._handle.attrs[name] = value
        self._handle.flush()

    def close(self):
        if self._handle.id.valid:
            try:
                self._handle.close()
            except (OSError, RuntimeError) as error:
                raise _write_error(self.path, error) from None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            self.close()
        except errors.ArtifactError:
            if exc_type is None:
                raise  # else the write error already on its way says more than the close's echo of it
        return False


def _write_error(path, error):
    """ArtifactError for a failed HDF5 write; h5py's message holds the OS reason (e.g. 'File too large')."""
    message = " ".join(str(error).split())
    reason = next((part.split("=", 1)[1].strip(" '") for part in message.split(", ")
                   if part.startswith("error message =")), message)
    return errors.ArtifactError(
        f"{path}: cannot write the feature cache ({reason}); the rows written so far are kept and "
        "a rerun of `extract` continues from them"
    )


def merge_shards(out_dir):
    """Joins OUT/features.shard-K-of-N.h5 (all K of one N) into OUT/features.h5.

    Rows are ordered by image id, as an unsharded run orders them, so the merged cache
    equals an unsharded one. Returns the path of features.h5.
    """
    out_dir = Path(out_dir)
    shards = sorted(out_dir.glob("features.shard-*-of-*.h5"))
    if not shards:
        raise errors.ArtifactError(f"{out_dir}: no shard files features.shard-K-of-N.h5 to merge")
    counts = set()
    indices = {}
    for shard in shards:
        parts = shard.name[len("features.shard-"): -len(".h5")].split("-of-")
        try:
            index, count = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            raise errors.ArtifactError(f"{shard}: shard file name is not features.shard-K-of-N.h5") from None
        counts.add(count)
        indices[index] = shard
    if len(counts) != 1:
        raise errors.ArtifactError(f"{out_dir}: shard files of different shard counts {sorted(counts)}: remove the stale ones")
    (count,) = counts
    absent = sorted(set(range(count)) - set(indices))
    if absent:
        names = ", ".join(SHARD_PATTERN.format(index=index, count=count) for index in absent)
        raise errors.ArtifactError(f"{out_dir}: missing shard file(s) {names}: run those shards first")
    first_attrs = None
    rows = []  # (image_id, shard index, row) -> rows can be streamed shard by shard
    for index in range(count):
        attrs = read_attrs(indices[index])
        comparable = {name: attrs.get(name) for name in CHECKED_ATTRIBUTES + ("encoder_fingerprint",)}
        if first_attrs is None:
            first_attrs, first_comparable = attrs, comparable
        elif comparable != first_comparable:
            differing = sorted(name for name in comparable if comparable[name] != first_comparable[name])
            raise errors.ArtifactError(
                f"{indices[index]}: made with other encoder settings than shard 0 ({', '.join(differing)})"
            )
        with open_features(out_dir, path=indices[index]) as reader:
            rows.extend((image_id, index, row) for row, image_id in enumerate(reader.image_ids))
    rows.sort()
    destination = features_path(out_dir)
    temporary = destination.with_name(f".{destination.name}.merge.tmp")
    attrs = {name: value for name, value in first_attrs.items() if name != "num_rows"}
    readers = [open_features(out_dir, path=indices[index]) for index in range(count)]
    try:
        with FeatureWriter.create(temporary, attrs) as writer:
            for start in range(0, len(rows), 1024):
                block = rows[start:start + 1024]
                vectors = np.stack([readers[shard].read([row])[0] for _, shard, row in block])
                writer.append([image_id for image_id, _, _ in block], vectors)
        os.replace(temporary, destination)
    finally:
        for reader in readers:
            reader.close()
        if temporary.exists():
            temporary.unlink()
    return destination
