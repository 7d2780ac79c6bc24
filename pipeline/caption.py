"""The `caption` command: captions image files with an exported SavedModel.

    python run_pipeline.py caption photo.jpg other.png --model OUT/saved_model

prints `IMAGE<TAB>caption` per image on stdout, in the order given. A file that is
missing, unreadable or not an image gets one `error: PATH: reason` line on stderr, the
others are still captioned, and the exit code is 2. The SavedModel is loaded and called
through `pipeline.serving.exported_model`, as the HTTP server does.
"""

import sys
from pathlib import Path

import tensorflow as tf

from pipeline.core import errors
from pipeline.serving import exported_model


def _read_image(path):
    """Returns (bytes, None) or (None, reason) for one image file."""
    try:
        image_bytes = Path(path).read_bytes()
    except FileNotFoundError:
        return None, "no such file"
    except IsADirectoryError:
        return None, "is a folder, not an image file"
    except OSError as error:
        return None, f"cannot read it ({error.strerror or error})"
    problem = exported_model.header_problem(image_bytes)
    return (None, problem) if problem else (image_bytes, None)


def run_caption(image_paths, model_dir, batch_size=16):
    """Prints `IMAGE<TAB>caption` for each of `image_paths` (list of str), in order.

    Files are captioned `batch_size` at a time through `serving_default`. Returns the exit
    code: 0 if every image was captioned, 2 if any could not be (each such file has its own
    `error: PATH: reason` line on stderr).
    """
    if batch_size < 1:
        raise errors.PipelineError(f"--batch-size must be at least 1, got {batch_size}")
    captioner = exported_model.ExportedCaptioner(model_dir)
    failures = 0
    for start in range(0, len(image_paths), batch_size):
        batch_paths = image_paths[start:start + batch_size]
        readable = []  # (path, bytes) of the files that decode
        problems = {}
        for path in batch_paths:
            image_bytes, problem = _read_image(path)
            if problem:
                problems[path] = problem
            else:
                readable.append((path, image_bytes))
        captions = dict(_caption_batch(captioner, readable, problems))
        # One pass in input order, so stdout and stderr lines follow the command line's order.
        for path in batch_paths:
            if path in captions:
                print(f"{path}\t{captions[path]}", flush=True)
            else:
                failures += 1
                print(f"error: {path}: {problems[path]}", file=sys.stderr, flush=True)
    return 2 if failures else 0


def _caption_batch(captioner, readable, problems):
    """Yields (path, caption) for `readable` [(path, bytes)]; failures go into `problems`.

    Files were only header-checked: the batch is tried whole first (one decode per image),
    and only if the model refuses it is each file decoded and captioned on its own.
    """
    try:
        captions, _ = captioner.caption_images([image_bytes for _, image_bytes in readable])
        yield from zip((path for path, _ in readable), captions)
        return
    except tf.errors.InvalidArgumentError:
        pass  # a file passed the header check but does not decode: find it, caption the rest
    for path, image_bytes in readable:
        problem = exported_model.image_problem(image_bytes)
        if problem:
            problems[path] = problem
            continue
        try:
            (caption,), _ = captioner.caption_images([image_bytes])
        except tf.errors.InvalidArgumentError as error:
            problems[path] = f"the model cannot decode it ({errors.op_error_reason(error)})"
            continue
        yield path, caption
