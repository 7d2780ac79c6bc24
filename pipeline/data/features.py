"""The feature cache `OUT/features.h5`: one encoder vector per image, written as it goes.

Schema (checked on every open):
    features   float32 or float16 [N, 2048], chunked and resizable
    image_ids  UTF-8 variable-length strings [N], paths relative to the image folder
    attributes format="captioner.features", version, encoder, weights, image_size,
               pooling, dtype, feature_dim, precision, encoder_graph,
               encoder_fingerprint, num_rows, tensorflow_version, keras_version,
               h5py_version

Versions: 2 adds `encoder_graph`, the form of ResNet50 that computed the rows: "folded"
(BatchNorm folded into the convolutions, `models.encoder.fold_encoder`; what `extract`
uses since version 2) or "keras" (the plain Keras model). Version 1 caches lack it and
were all written by the plain model: they read as encoder_graph="keras" and stay valid
for train, evaluate and export (the same weights, the same fingerprint, features equal
to cosine >= 0.99999 at fp32). Only adding rows to one is refused (see `check_graph`).
Version 2 also marks the decoding that turns a JPEG with an EXIF orientation upright
before the resize (`models.image_decoding.exif_orientation`); a version 1 cache saw such photos
as stored (sideways), one more reason new rows are never added to it.

Crash safety: a batch is appended (datasets resized and written, file flushed) before
`num_rows` is raised and flushed again, so `num_rows` only ever counts rows whose
feature vector and id are both on disk. Readers ignore anything past `num_rows`, and a
writer reopening the file cuts it back there: a run killed mid-batch loses only that
batch. The file keeps HDF5's default (earliest) format: files written with
libver="latest" stay marked "open for writing" after a crash and then refuse to open
until `h5clear` is run on them.

Full disk: before each batch the writer checks that the disk (and the file size limit,
`ulimit -f`) has room for it, and stops with a "disk full" error before HDF5 writes a
byte: a write HDF5 sees fail leaves the file unreadable (its superblock already names
an end of file the data never reached). Should a write fail anyway (the disk filled
between the check and the write), the writer's file drops every later write, so the
file can still be closed (see `_GuardedFile`).
"""

import dataclasses
import io
import os
import resource
import shutil
from pathlib import Path

import h5py
import numpy as np

from pipeline.core import errors

FEATURES_FILE = "features.h5"
FEATURES_FORMAT = "captioner.features"
FEATURES_VERSION = 2
# Versions this code reads; version 1 is version 2 without `encoder_graph` ("keras").
READABLE_VERSIONS = (1, 2)
ENCODER_GRAPH_OF_VERSION_1 = "keras"
SHARD_PATTERN = "features.shard-{index}-of-{count}.h5"
# Rows per HDF5 chunk: 64 x 2048 float32 = 512 KiB, a good unit for both appends and reads.
CHUNK_ROWS = 64
ID_CHUNK_ROWS = 1024
# Room asked beyond a batch's own bytes, for HDF5's metadata (chunk index nodes, object
# headers, string heap collections): measured at under 5 KB a batch, so 50 times that.
WRITE_MARGIN_BYTES = 256 << 10
MB = 1 << 20
# Attributes that must agree between a cache and the encoder settings asking for it.
CHECKED_ATTRIBUTES = ("encoder", "weights", "image_size", "pooling", "dtype", "feature_dim", "precision")
# `encoder_graph` values, as messages name them.
_GRAPH_NAMES = {"folded": "folded ResNet50 (BatchNorm folded into the convolutions)", "keras": "plain Keras ResNet50"}


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


def expected_attrs(encoder_config, fingerprint=None, encoder_graph="folded"):
    """The attributes a cache made with `encoder_config` (an EncoderConfig) carries.

    `encoder_config.precision` should already be resolved ("auto" -> "bf16"/"fp16"/"fp32",
    `pipeline.core.device.resolve_precision`): the attribute records what was computed.
    encoder_graph: "folded" or "keras" (`models.encoder.encoder_graph` of the model).
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
        "encoder_graph": encoder_graph,
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


def cached_encoder_graph(attrs):
    """The `encoder_graph` of a cache's attributes: "folded" or "keras" (version 1 caches)."""
    return attrs.get("encoder_graph", ENCODER_GRAPH_OF_VERSION_1)


def check_graph(attrs, encoder_graph, path=FEATURES_FILE):
    """Raises ArtifactError if rows computed by `encoder_graph` ("folded" or "keras") may not
    join a cache with these attributes: those of another graph.

    One cache holds the rows of one encoder graph, as it holds those of one precision:
    its attributes must describe every row. At fp32 the folded and plain graphs agree to
    cosine >= 0.99999, but in bf16 or fp16 they round at different points (as bf16 and
    fp32 do), and a mixed file could no longer say what it holds. Reading a cache of
    the other graph (train, evaluate, export) is fine: the same weights, the same features.
    `FeatureWriter.append_to(..., encoder_graph=...)` calls this before its first row.
    """
    cached = cached_encoder_graph(attrs)
    if cached != encoder_graph:
        version = attrs.get("version")
        origin = f"an earlier version of Captioner (cache version {version})" if version == 1 else "another run"
        raise errors.ArtifactError(
            f"{path}: the feature cache's {attrs.get('num_rows')} rows were computed by the "
            f"{_GRAPH_NAMES.get(cached, cached)} of {origin}, and this run would add rows computed by the "
            f"{_GRAPH_NAMES.get(encoder_graph, encoder_graph)}; a cache holds the rows of one graph, so rerun with "
            f"--overwrite to re-extract every image, or choose another --out (the cache stays valid as it is for "
            f"train, evaluate and export)"
        )


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
    if attrs.get("version") not in READABLE_VERSIONS:
        raise errors.ArtifactError(
            f"{path}: feature cache version {attrs.get('version')!r} is not supported "
            f"(expected one of {', '.join(map(str, READABLE_VERSIONS))})"
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

    def __init__(self, handle, path, file, encoder_graph=None):
        self._handle = handle
        self._file = file
        self.path = Path(path)
        self._features = handle["features"]
        self._image_ids = handle["image_ids"]
        self.num_rows = int(handle.attrs["num_rows"])
        # Checked at the first row, not on opening: a rerun whose only pending images
        # fail to decode again adds no row, and may then use a cache of the other graph.
        self._encoder_graph = encoder_graph

    @classmethod
    def create(cls, path, attrs):
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _check_room(path, 0, WRITE_MARGIN_BYTES, "nothing was written")
            file = _GuardedFile(path, "w+b")
        except OSError as error:
            raise _write_error(path, error) from None
        handle = None
        try:
            handle = h5py.File(file, "w")
            feature_dim = int(attrs["feature_dim"])
            handle.create_dataset(
                "features", shape=(0, feature_dim), maxshape=(None, feature_dim),
                dtype=np.dtype(attrs["dtype"]), chunks=(CHUNK_ROWS, feature_dim),
            )
            handle.create_dataset(
                "image_ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"), chunks=(ID_CHUNK_ROWS,),
            )
            for name, value in attrs.items():
                handle.attrs[name] = value
            handle.attrs["num_rows"] = 0
            handle.flush()
        except (OSError, RuntimeError) as error:
            file.close_after_failure(handle)
            raise _write_error(path, file.failure or error) from None
        return cls(handle, path, file)

    @classmethod
    def append_to(cls, path, encoder_graph=None):
        """Reopens the cache at `path`; with `encoder_graph`, its first row must be of the
        cache's own graph (`check_graph`, raised from `append`)."""
        path = Path(path)
        if not path.is_file():
            raise errors.ArtifactError(f"{path}: the feature cache is missing (run the extract stage first)")
        try:
            file = _GuardedFile(path, "r+b")
        except OSError as error:
            raise _write_error(path, error) from None
        try:
            handle = h5py.File(file, "r+")
        except (OSError, ValueError) as error:
            file.close()
            raise errors.ArtifactError(
                f"{path}: not a readable HDF5 feature cache (damaged, truncated or another kind of file: {error})"
            ) from None
        try:
            _, num_rows = _validate(handle, path)
            # Rows past num_rows belong to a batch a killed run never finished.
            handle["features"].resize(num_rows, axis=0)
            handle["image_ids"].resize(num_rows, axis=0)
            handle.flush()
        except (OSError, RuntimeError) as error:
            file.close_after_failure(handle)
            raise _write_error(path, file.failure or error) from None
        except BaseException:
            handle.close()
            file.close()
            raise
        return cls(handle, path, file, encoder_graph)

    def append(self, image_ids, features):
        count = len(image_ids)
        assert features.shape == (count, self._features.shape[1]), (features.shape, count)
        if count == 0:
            return
        if self._encoder_graph is not None:
            check_graph({name: _plain(value) for name, value in self._handle.attrs.items()},
                        self._encoder_graph, self.path)
            self._encoder_graph = None  # the same answer for every later batch
        if self._file.failure is not None:
            raise _write_error(self.path, self._file.failure)
        stop = self.num_rows + count
        _check_room(self.path, self._file.size(), self._bytes_needed(image_ids, stop),
                    f"the {self.num_rows} rows written so far are kept and a rerun of `extract` continues from them")
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
            raise _write_error(self.path, self._file.failure or error) from None
        self.num_rows = stop

    def _bytes_needed(self, image_ids, stop):
        """Bytes the file may grow by when rows num_rows..stop are appended, margin included.

        HDF5 allocates a whole chunk when a batch first touches it; a string costs its
        UTF-8 bytes plus a heap object header (16 bytes, aligned to 8).
        """
        def new_chunks(rows_per_chunk):
            return -(-stop // rows_per_chunk) - -(-self.num_rows // rows_per_chunk)

        row_bytes = self._features.shape[1] * self._features.dtype.itemsize
        id_bytes = sum(len(image_id.encode("utf-8")) + 24 for image_id in image_ids)
        return (new_chunks(CHUNK_ROWS) * CHUNK_ROWS * row_bytes + new_chunks(ID_CHUNK_ROWS) * ID_CHUNK_ROWS * 16
                + id_bytes + WRITE_MARGIN_BYTES)

    def set_attr(self, name, value):
        self._handle.attrs[name] = value
        self._handle.flush()

    def close(self):
        if self._file.closed:
            return
        if self._file.failure is not None:
            self._file.close_after_failure(self._handle)
            return  # the failed write was reported when it happened
        try:
            self._handle.close()
        except (OSError, RuntimeError) as error:
            self._file.close_after_failure(self._handle)
            raise _write_error(self.path, self._file.failure or error) from None
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            self.close()
        except errors.ArtifactError:
            if exc_type is None:
                raise  # else the write error already on its way says more than the close's echo of it
        return False


class _GuardedFile(io.RawIOBase):
    """The cache file as h5py's "fileobj" driver writes it: unbuffered OS I/O until a
    write fails, and from then on every write and truncation is dropped.

    Why: HDF5 cannot close a file one of whose writes failed. Each close retries the
    flush, fails again and leaves the file's ids open; HDF5's shutdown at process exit
    then closes them once more and crashes (a segfault after the error line; h5py
    issues #914, #2160). Dropping the writes lets the close finish in memory without
    touching the file again. `failure` is the first OSError (its strerror names the
    reason: "No space left on device", "File too large").
    """

    def __init__(self, path, mode):
        super().__init__()
        self._raw = open(path, mode, buffering=0)
        self.failure = None

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        return self._raw.readinto(buffer)

    def seek(self, offset, whence=io.SEEK_SET):
        return self._raw.seek(offset, whence)

    def tell(self):
        return self._raw.tell()

    def size(self):
        return os.fstat(self._raw.fileno()).st_size

    def write(self, data):
        if self.failure is not None:
            return len(data)
        return self._guard(self._raw.write, data)

    def truncate(self, size=None):
        if self.failure is not None:
            return self._raw.tell() if size is None else size
        return self._guard(self._raw.truncate, size)

    def flush(self):
        if self.failure is None:
            self._raw.flush()

    def _guard(self, operation, argument):
        try:
            return operation(argument)
        except OSError as error:
            self.failure = error
            raise

    def close_after_failure(self, handle):
        """After a failed write: closes `handle` (an h5py.File or None) without writing, then the file."""
        if self.failure is None:  # h5py failed without a failed write of ours: write nothing more either
            self.failure = OSError("HDF5 could not write the feature cache")
        if handle is not None and handle.id.valid:
            try:
                handle.close()
            except (OSError, RuntimeError):
                pass
        self.close()

    def close(self):
        super().close()  # first: IOBase.close flushes, which needs the file still open
        self._raw.close()


def _check_room(path, file_size, need, consequence):
    """ArtifactError, before anything is written, if `path` (now `file_size` bytes) cannot grow by `need` bytes.

    The room is the smaller of the free space of the disk and what the file size limit
    (RLIMIT_FSIZE, `ulimit -f`) leaves; two system calls, cheap enough for every batch.
    """
    directory = Path(path).parent
    free = shutil.disk_usage(directory).free
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY and limit - file_size < free:
        if limit - file_size >= need:
            return
        raise errors.ArtifactError(
            f"{path}: file size limit reached: need {need / MB:.1f} MB more but the limit (ulimit -f, "
            f"{limit / MB:.1f} MB) leaves {max(0, limit - file_size) / MB:.1f} MB; {consequence}"
        )
    if free < need:
        raise errors.ArtifactError(
            f"{path}: disk full: need {need / MB:.1f} MB in {directory}, {free / MB:.1f} MB free; {consequence}"
        )


def _write_error(path, error):
    """ArtifactError for a failed HDF5 write; the OS reason (e.g. 'File too large') comes from
    the OSError itself or from h5py's message."""
    return errors.ArtifactError(
        f"{path}: cannot write the feature cache ({errors.write_failure_reason(error)}); the rows written so far are kept and "
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
        comparable["encoder_graph"] = cached_encoder_graph(attrs)
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
