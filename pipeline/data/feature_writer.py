"""Writing the feature cache `OUT/features.h5` (schema and readers: `pipeline.data.features`).

`FeatureWriter` creates a cache or reopens one and appends batches of rows to it;
`merge_shards` joins the shard files of a sharded `extract` into one cache.

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

import io
import os
import resource
import shutil
from pathlib import Path

import h5py
import numpy as np

from pipeline.core import errors
from pipeline.core.run_files import FEATURES_SHARD_PATTERN as SHARD_PATTERN
from pipeline.data import features as feature_cache  # `features` is append's argument

# Rows per HDF5 chunk: 64 x 2048 float32 = 512 KiB, a good unit for both appends and reads.
CHUNK_ROWS = 64
ID_CHUNK_ROWS = 1024
# Room asked beyond a batch's own bytes, for HDF5's metadata (chunk index nodes, object
# headers, string heap collections): measured at under 5 KB a batch, so 50 times that.
WRITE_MARGIN_BYTES = 256 << 10
MB = 1 << 20
# Rows merge_shards copies at a time.
MERGE_BLOCK_ROWS = 1024


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
        """A writer of a new, empty cache at `path` (replacing any file there) with attributes `attrs` (dict).

        `attrs` must hold `feature_dim` and `dtype` (the features dataset's width and type);
        `num_rows` is the writer's own. ArtifactError when the disk has no room or the write fails.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _check_room(path, 0, WRITE_MARGIN_BYTES, "nothing was written")
            # A new file, not the old one truncated: a reader that maps the old one
            # (`features.MappedRows`, a training run) keeps reading it, where truncating
            # would kill it with SIGBUS.
            path.unlink(missing_ok=True)
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
            _, num_rows = feature_cache.validate(handle, path)
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
        """Writes one batch: `image_ids` (list of str, b) and `features` (float array [b, feature_dim]).

        The rows count (num_rows) only once both datasets are flushed; ArtifactError, before
        anything is written, when the disk or the file size limit has no room for the batch.
        """
        count = len(image_ids)
        assert features.shape == (count, self._features.shape[1]), (features.shape, count)
        if count == 0:
            return
        if self._encoder_graph is not None:
            attrs = {name: feature_cache.plain_value(value) for name, value in self._handle.attrs.items()}
            feature_cache.check_graph(attrs, self._encoder_graph, self.path)
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
        """Sets one attribute of the cache and flushes it."""
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
        f"{path}: cannot write the feature cache ({errors.write_failure_reason(error)}); the rows written so far "
        "are kept and a rerun of `extract` continues from them"
    )


def merge_shards(out_dir):
    """Joins OUT/features.shard-K-of-N.h5 (all K of one N) into OUT/features.h5.

    Rows are ordered by image id, as an unsharded run orders them, so the merged cache
    equals an unsharded one. Returns the path of features.h5.
    """
    out_dir = Path(out_dir)
    # "features.shard-{index}-of-{count}.h5" -> "features.shard-", "-of-", ".h5"
    prefix, _, rest = SHARD_PATTERN.partition("{index}")
    separator, _, suffix = rest.partition("{count}")
    generic_name = SHARD_PATTERN.format(index="K", count="N")
    shards = sorted(out_dir.glob(SHARD_PATTERN.format(index="*", count="*")))
    if not shards:
        raise errors.ArtifactError(f"{out_dir}: no shard files {generic_name} to merge")
    counts = set()
    indices = {}
    for shard in shards:
        parts = shard.name[len(prefix): -len(suffix)].split(separator)
        try:
            index, count = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            raise errors.ArtifactError(f"{shard}: shard file name is not {generic_name}") from None
        counts.add(count)
        indices[index] = shard
    if len(counts) != 1:
        raise errors.ArtifactError(
            f"{out_dir}: shard files of different shard counts {sorted(counts)}: remove the stale ones")
    (count,) = counts
    absent = sorted(set(range(count)) - set(indices))
    if absent:
        names = ", ".join(SHARD_PATTERN.format(index=index, count=count) for index in absent)
        raise errors.ArtifactError(f"{out_dir}: missing shard file(s) {names}: run those shards first")
    first_attrs = None
    rows = []  # (image_id, shard index, row) -> rows can be streamed shard by shard
    for index in range(count):
        attrs = feature_cache.read_attrs(indices[index])
        comparable = {name: attrs.get(name) for name in feature_cache.CHECKED_ATTRIBUTES + ("encoder_fingerprint",)}
        comparable["encoder_graph"] = feature_cache.cached_encoder_graph(attrs)
        if first_attrs is None:
            first_attrs, first_comparable = attrs, comparable
        elif comparable != first_comparable:
            differing = sorted(name for name in comparable if comparable[name] != first_comparable[name])
            raise errors.ArtifactError(
                f"{indices[index]}: made with other encoder settings than shard 0 ({', '.join(differing)})"
            )
        with feature_cache.open_features(out_dir, path=indices[index]) as reader:
            rows.extend((image_id, index, row) for row, image_id in enumerate(reader.image_ids))
    rows.sort()
    destination = feature_cache.features_path(out_dir)
    temporary = destination.with_name(f".{destination.name}.merge.tmp")
    attrs = {name: value for name, value in first_attrs.items() if name != "num_rows"}
    readers = [feature_cache.open_features(out_dir, path=indices[index]) for index in range(count)]
    try:
        with FeatureWriter.create(temporary, attrs) as writer:
            for start in range(0, len(rows), MERGE_BLOCK_ROWS):
                block = rows[start:start + MERGE_BLOCK_ROWS]
                vectors = np.stack([readers[shard].read([row])[0] for _, shard, row in block])
                writer.append([image_id for image_id, _, _ in block], vectors)
        os.replace(temporary, destination)
    finally:
        for reader in readers:
            reader.close()
        if temporary.exists():
            temporary.unlink()
    return destination
