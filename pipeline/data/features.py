"""The feature cache `OUT/features.h5`, one encoder vector per image: its schema, attribute checks and readers.

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

Readers use the first `num_rows` rows only: rows past it belong to a batch a killed run
never finished. Writing (crash safety, full disks, merging shards) is
`pipeline.data.feature_writer`'s.
"""

import dataclasses
from pathlib import Path

import h5py
import numpy as np

from pipeline.core import errors
from pipeline.core.run_files import FEATURES_FILE
from pipeline.core.run_files import FEATURES_SHARD_PATTERN as SHARD_PATTERN

FEATURES_FORMAT = "captioner.features"
FEATURES_VERSION = 2
# Versions this code reads; version 1 is version 2 without `encoder_graph` ("keras").
READABLE_VERSIONS = (1, 2)
ENCODER_GRAPH_OF_VERSION_1 = "keras"
# Attributes that must agree between a cache and the encoder settings asking for it.
CHECKED_ATTRIBUTES = ("encoder", "weights", "image_size", "pooling", "dtype", "feature_dim", "precision")
# `encoder_graph` values, as messages name them.
# FeatureReader.read: rows at most this far apart are read as one slice in an unchunked
# file (a chunked one uses its chunk's rows), and at most SLAB_ROWS rows (16 MiB) per slice.
DEFAULT_ROW_GAP = 64
SLAB_ROWS = 2048
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
    `feature_writer.FeatureWriter.append_to(..., encoder_graph=...)` calls this before its first row.
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
    """Whether the `weights` setting (str) names a weights file rather than "imagenet" or "random"."""
    return weights not in ("imagenet", "random")


def _mismatch(path, name, cached, requested, hint=""):
    """Raises the ArtifactError for one attribute whose cached value differs from what the run asks for."""
    raise errors.ArtifactError(
        f"{path}: the feature cache was made with {name}={cached!r} but this run asks for "
        f"{name}={requested!r}; rerun with --overwrite to replace it{hint}, or choose another --out"
    )


def _open_h5(path, mode):
    """The h5py.File at `path`; ArtifactError when it is missing (mode "r") or not a readable HDF5 file."""
    path = Path(path)
    if mode == "r" and not path.is_file():
        raise errors.ArtifactError(f"{path}: the feature cache is missing (run the extract stage first)")
    try:
        return h5py.File(path, mode)
    except (OSError, ValueError) as error:
        raise errors.ArtifactError(
            f"{path}: not a readable HDF5 feature cache (damaged, truncated or another kind of file: {error})"
        ) from None


def plain_value(value):
    """An HDF5 attribute value as plain Python: bytes -> str, numpy scalars -> int/float/bool."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def validate(handle, path):
    """Checks the schema of an open cache (h5py.File); returns (attrs as a dict, number of valid rows).

    ArtifactError naming `path` for a foreign file, an unknown version, a missing dataset,
    a shape or dtype that disagrees with the attributes, or a num_rows the datasets lack.
    """
    attrs = {name: plain_value(value) for name, value in handle.attrs.items()}
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
        raise errors.ArtifactError(
            f"{path}: dataset 'features' is {features.dtype}, attribute dtype says {attrs.get('dtype')!r}")
    num_rows = attrs.get("num_rows")
    if not isinstance(num_rows, int) or not 0 <= num_rows <= min(features.shape[0], image_ids.shape[0]):
        raise errors.ArtifactError(
            f"{path}: attribute num_rows={num_rows!r} does not fit the datasets "
            f"({features.shape[0]} feature rows, {image_ids.shape[0]} ids)"
        )
    return attrs, num_rows


def _check_expect(attrs, expect, path):
    """Checks `attrs` against `expect`: None (nothing), a dict of exact values, or an EncoderConfig."""
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
    with FeatureReader(path, expect) as reader:
        return FeatureCache(image_ids=reader.image_ids, features=reader.read_all(), attrs=reader.attrs)


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
            self.attrs, self.num_rows = validate(self._handle, self.path)
            _check_expect(self.attrs, expect, self.path)
            self.image_ids = [value.decode("utf-8") for value in self._handle["image_ids"][: self.num_rows]]
        except BaseException:
            self._handle.close()
            raise
        self._features = self._handle["features"]

    def __len__(self):
        return self.num_rows

    def read(self, rows):
        """float32 [len(rows), feature_dim] for the given row indices (ints < N, any order, repeats allowed).

        Only the rows asked for are read, in increasing order, and put in the asked order in
        NumPy. Rows at most a chunk apart are read as one slice (HDF5 reads whole chunks, and
        a slice costs ~1.5 us a row where h5py's point selection costs ~100-180 us a row), at
        most SLAB_ROWS at a time; isolated rows in one point selection (docs/SCALING.md).
        """
        rows = np.asarray(rows, dtype=np.int64)
        self._check_rows(rows)
        unique, inverse = np.unique(rows, return_inverse=True)
        block = np.empty((len(unique), self._features.shape[1]), dtype=np.float32)
        max_gap = self._features.chunks[0] if self._features.chunks else DEFAULT_ROW_GAP
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(unique) > max_gap) + 1, [len(unique)]])
        isolated = bounds[:-1][np.diff(bounds) == 1]
        if len(isolated):
            block[isolated] = self._features[unique[isolated]]
        for first, stop in zip(bounds[:-1], bounds[1:]):
            if stop - first == 1:
                continue  # read with the isolated rows
            while first < stop:
                start = unique[first]
                end = min(stop, int(np.searchsorted(unique, start + SLAB_ROWS)))
                block[first:end] = self._features[start:unique[end - 1] + 1][unique[first:end] - start]
                first = end
        if np.array_equal(unique, rows):
            return block  # asked in increasing order: no second copy (training's rows when they cannot be mapped)
        return block[inverse.reshape(-1)]

    def _check_rows(self, rows):
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"row indices must be in [0, {self.num_rows})")

    def map_rows(self, rows):
        """The file rows `rows` (int array; position k reads row rows[k]) through a read-only
        memory map of the file: a MappedRows, or None when they are not stored as plain bytes
        that a map can address (filtered or compressed chunks, chunks narrower than a row,
        a user block, a row not yet allocated) or the file cannot be mapped.

        Checked on the first and last of `rows` against HDF5's own read of them.
        """
        rows = np.asarray(rows, dtype=np.int64)
        self._check_rows(rows)
        features = self._features
        if not len(rows) or self._handle.userblock_size or features.id.get_create_plist().get_nfilters():
            return None
        row_bytes = features.dtype.itemsize * features.shape[1]
        if features.chunks is None:
            offset = features.id.get_offset()
            if offset is None:
                return None
            starts = offset + rows * row_bytes
        else:
            chunk_rows, chunk_width = features.chunks
            if chunk_width != features.shape[1] or not hasattr(features.id, "chunk_iter"):
                return None  # chunk_iter needs HDF5 1.12.3 or later
            chunk_starts = np.full(-(-self.num_rows // chunk_rows), -1, dtype=np.int64)

            def note(chunk):
                index = chunk.chunk_offset[0] // chunk_rows
                if index < len(chunk_starts):
                    chunk_starts[index] = chunk.byte_offset

            features.id.chunk_iter(note)
            if (chunk_starts < 0).any():
                return None
            starts = chunk_starts[rows // chunk_rows] + rows % chunk_rows * row_bytes
        try:
            mapped = MappedRows(self.path, starts, features.dtype, features.shape[1])
        except (OSError, ValueError):
            return None  # a file system that cannot map files
        ends = [0, len(rows) - 1]
        same = np.array_equal(mapped[np.asarray(ends)], self.read(rows[ends]))
        return mapped if same else None

    def read_all(self):
        """Every row, float32 [N, feature_dim], read straight into one new array (float16
        storage widened by HDF5 on the way, with no second copy)."""
        features = np.empty((self.num_rows, self._features.shape[1]), dtype=np.float32)
        if self.num_rows:
            self._features.read_direct(features, np.s_[:self.num_rows], np.s_[:self.num_rows])
        return features

    def batches(self, batch_size):
        """Yields (image ids list of str, features float32 [b, feature_dim]) in row order, b <= batch_size."""
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


class MappedRows:
    """Feature rows read through a read-only memory map of the cache file, indexed like a
    float32 [N, feature_dim] array by an int array (`FeatureReader.map_rows` builds it).

    The rows stay in the operating system's page cache, one copy shared by every process
    that maps the file; a process touches only the pages of the rows it reads, and opening
    reads nothing. Reading them into a new array instead costs the first touch of that much
    fresh memory, which some virtual machines back slowly (docs/SCALING.md). The map holds
    the file's inode: a cache replaced meanwhile (`FeatureWriter.create` makes a new file)
    leaves it reading the rows it was opened on. The map is released with the object.

    starts: int64 [N], the byte offset of each row in the file; dtype: the stored dtype
    (float32 or float16, any byte order), widened to native float32 on read.
    """

    def __init__(self, path, starts, dtype, feature_dim):
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        # Row k is the row_bytes bytes from starts[k]: a window view gives them by fancy index.
        self._windows = np.lib.stride_tricks.sliding_window_view(self._map, np.dtype(dtype).itemsize * feature_dim)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._dtype = np.dtype(dtype)
        self.shape = (len(self._starts), int(feature_dim))

    def __len__(self):
        return self.shape[0]

    @property
    def nbytes(self):
        """The bytes of the file the rows take (what the page cache holds once they are all read)."""
        return self.shape[0] * self.shape[1] * self._dtype.itemsize

    def __getitem__(self, rows):
        """rows: int array [B] of positions < N -> float32 [B, feature_dim], a new array."""
        raw = self._windows[self._starts[np.asarray(rows, dtype=np.int64)]]
        return raw.view(self._dtype).astype(np.float32, copy=False)


def open_features(out_dir, expect=None, path=None):
    """A FeatureReader on OUT/features.h5 (or `path`), checked as read_features does."""
    return FeatureReader(Path(path) if path is not None else features_path(out_dir), expect)


def read_attrs(path):
    """The attributes of an existing cache file, validated (ArtifactError if damaged)."""
    with _open_h5(path, "r") as handle:
        attrs, _ = validate(handle, path)
    return attrs
