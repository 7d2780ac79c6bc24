"""Atomic writes: a file is written to a temporary name in the same folder and
renamed into place, so a killed run never leaves a half-written file that looks complete."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yields a temporary path beside `path`; renames it onto `path` if the block succeeds.

    Works for files and for directories (a SavedModel): whatever the block writes at the
    yielded path replaces `path` in one rename. On error the temporary is removed.
    `suffix` ends the temporary's name (Keras saves only to names ending in ".keras").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    os.unlink(temporary)  # the block creates it, as a file or a folder
    temporary = Path(temporary)
    try:
        yield temporary
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(temporary, path)
            shutil.rmtree(old)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()


def write_json(path, data, default=None):
    """Writes `data` as indented UTF-8 JSON, atomically; ArtifactError if the file cannot be written.

    default: as for `json.dumps`, turns values JSON has no type for (e.g. `float` for numpy scalars).
    """
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=default) + "\n")


def write_text(path, text):
    """Writes `text` as UTF-8, atomically; ArtifactError names the file and the reason on failure
    (no permission, disk full), and the previous version of the file, if any, is left as it was."""
    from pipeline.core.errors import ArtifactError

    try:
        with atomic_path(path) as temporary:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
    except OSError as error:
        raise ArtifactError(f"{path}: cannot write ({error.strerror or error})") from None


def read_json(path, what):
    """Reads a JSON artifact; a missing or damaged file raises ArtifactError naming it.

    `what` names the artifact for the message, e.g. "the vocabulary".
    """
    from pipeline.core.errors import ArtifactError

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} is missing")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        # ValueError covers JSONDecodeError and over-long integers; RecursionError deep nesting.
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)[:200]
        raise ArtifactError(f"{path}: {what} is not valid JSON ({reason})") from None


def read_format_json(path, kind, format_name, version, remedy):
    """Reads one of our JSON artifacts, `{"format": format_name, "version": version, ...}`.

    `kind` names the file in messages ("vocabulary file"); `remedy` says what rewrites it.
    Returns (data, fail): `fail(message)` raises ArtifactError "PATH: message; remedy", for
    the caller's checks of its own fields. A foreign format or version fails here.
    """
    from pipeline.core.errors import ArtifactError

    path = Path(path)
    data = read_json(path, f"the {kind}")

    def fail(message):
        raise ArtifactError(f"{path}: {message}; {remedy}")

    if not isinstance(data, dict) or data.get("format") != format_name:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        fail(f"not a {kind} (format {found!r}, expected {format_name!r})")
    if data.get("version") != version:
        fail(f"{kind} version {data.get('version')!r} is not supported (expected {version})")
    return data, fail
