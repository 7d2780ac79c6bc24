"""Fuzzing the dataset readers and the JSON artifact readers with malformed input.

The property, for every input: `load_dataset` either returns a Dataset whose invariants
hold, or raises PipelineError whose one-line message starts with the folder or the file
at fault (`file:line: ...` from DataFormatError when one line is at fault). Never another
exception, never a hang. Inputs come from two sources per layout:

* structured strategies: mostly valid Flickr8k token files and split lists, Kaggle
  captions.txt, Karpathy dataset_*.json, with corruptions drawn per line or per entry.
  A file without corruption must load to exactly the expected dataset; a file whose only
  corruptions are line-level errors must stop at the first of them, by file and line.
* raw and byte-mutated file contents.

`read_captions_json` and `Vocabulary.load` get random and mutated JSON (ArtifactError
only), and `normalize_caption` gets arbitrary text (lower-case alphabetic words, never an
exception). Regression tests for the bugs the fuzzing found are at the end, as plain tests.

Every example builds its folder in a `tempfile.TemporaryDirectory()` (function-scoped
fixtures are not reset between hypothesis examples). Settings are derandomized and bounded,
so CI runs the same examples every time.
"""

import contextlib
import csv
import io
import json
import re
import signal
import tempfile
from pathlib import Path, PurePosixPath

import hypothesis
import pytest
from hypothesis import strategies as st

from pipeline.core import config, errors
from pipeline.data import dataset_layouts, datasets, text

DATA_CONFIG = config.DataConfig()

# A reader that needs longer than this on inputs of a few hundred kilobytes is hanging.
HANG_SECONDS = 10
# An error message is one line naming the place; the offending text is shown shortened.
MAX_MESSAGE_EXTRA_CHARS = 600


def _settings(max_examples):
    return hypothesis.settings(
        max_examples=max_examples, deadline=None, derandomize=True, database=None,
        suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large],
    )


class ReaderHang(Exception):
    """Raised by the alarm when one reader call runs longer than `HANG_SECONDS`."""


@contextlib.contextmanager
def _hang_guard():
    def expire(signum, frame):
        raise ReaderHang(f"the reader ran longer than {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _call(function, *args, expected_error=errors.PipelineError):
    """(result, None) or (None, error) for `expected_error`; any other exception fails the test."""
    with _hang_guard():
        try:
            return function(*args), None
        except expected_error as error:
            return None, error


def _line_count(data):
    """Physical lines of `data` (bytes) as universal newlines count them."""
    return len(re.split(rb"\r\n|\r|\n", data))


def _check_message(error, place):
    """The message is one line, starts with `place` and stays short whatever the input held."""
    message = str(error)
    assert message.startswith(str(place)), message[:300]
    assert "\n" not in message and "\r" not in message, message[:300]
    assert len(message) <= len(str(place)) + MAX_MESSAGE_EXTRA_CHARS, message[:300]


def _check_load_error(error, data_dir):
    """A PipelineError from `load_dataset(data_dir)`: it names the folder or one of its files."""
    if isinstance(error, errors.DataFormatError):
        path = Path(error.path)
        assert path.is_file() and data_dir in path.parents, error.path
        if error.line is None:
            _check_message(error, f"{path}: ")
        else:
            _check_message(error, f"{path}:{error.line}: ")
            assert 1 <= error.line <= _line_count(path.read_bytes()), (error.line, str(error)[:300])
    else:
        _check_message(error, data_dir)


def _check_dataset(dataset, data_dir):
    """The invariants of a loaded Dataset, and its round trip through captions.json."""
    assert dataset.layout in ("flickr8k", "kaggle", "karpathy")
    image_dir = Path(dataset.image_dir)
    assert image_dir.is_absolute() and image_dir.is_dir()
    assert image_dir == data_dir or data_dir in image_dir.parents
    ids = [record.image_id for record in dataset.images]
    assert ids and ids == sorted(set(ids)), "image ids must be unique and sorted"
    for record in dataset.images:
        parts = PurePosixPath(record.image_id).parts
        assert parts and ".." not in parts and not record.image_id.startswith("/") and "\\" not in record.image_id
        assert PurePosixPath(*parts).as_posix() == record.image_id
        path = record.path(image_dir)
        assert path.is_file() and image_dir in path.resolve().parents
        assert record.split in datasets.SPLITS
        assert record.captions and all(isinstance(caption, str) and caption.strip() for caption in record.captions)
    assert set(ids).isdisjoint(dataset.missing)
    with tempfile.TemporaryDirectory() as out:
        datasets.write_captions_json(out, dataset)
        assert datasets.read_captions_json(out) == dataset


def _load(data_dir):
    """Loads `data_dir`, checks the property, and returns (dataset, error)."""
    dataset, error = _call(datasets.load_dataset, data_dir, DATA_CONFIG)
    if hypothesis.currently_in_test_context():  # the outcome mix, for --hypothesis-show-statistics
        hypothesis.event("loaded" if error is None else type(error).__name__)
    if error is not None:
        _check_load_error(error, data_dir)
    else:
        _check_dataset(dataset, data_dir)
    return dataset, error


def _touch(folder, names):
    for name in names:
        path = folder.joinpath(*PurePosixPath(name).parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


@contextlib.contextmanager
def _data_folder():
    with tempfile.TemporaryDirectory() as temporary:
        data_dir = Path(temporary).resolve() / "data"
        data_dir.mkdir()
        yield data_dir


# ---------------------------------------------------------------------------------------------
# Strategies shared by the layouts

_STEMS = ["img", "dog_1", "café", "Ünïcödé", "日本語", "a b", "x-y.z", "ﬁsh", "émoji😀"]
image_names = st.builds(lambda stem, number: f"{stem}{number}.jpg", st.sampled_from(_STEMS), st.integers(0, 99))
# Captions as people write them: any printable text on one line, no tab (the Flickr8k separator).
caption_texts = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\t"), min_size=1, max_size=25,
).filter(lambda caption: caption.strip())
invalid_utf8 = st.sampled_from([b"\xff", b"\xfe\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
newlines = st.sampled_from(["\n", "\r\n", "\r"])


def _first_undecodable_line(content):
    """The line of the first byte that is not UTF-8 in `content` (a BOM allowed), or None."""
    body = content[3:] if content.startswith(b"\xef\xbb\xbf") else content
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        return _line_count(body[: error.start])
    return None


def _spliced(data, position, insert):
    position %= len(data) + 1
    return data[:position] + insert + data[position:]


def _join_lines(lines, newline, bom):
    """bytes of the file and the 1-based number of each entry's first line."""
    content, starts, line = bytearray(b"\xef\xbb\xbf" if bom else b""), [], 1
    for entry in lines:
        starts.append(line)
        chunk = entry + newline.encode()
        line += len(re.findall(rb"\r\n|\r|\n", chunk))
        content += chunk
    return bytes(content), starts


# ---------------------------------------------------------------------------------------------
# Flickr8k release: token file and split lists

# Per line: "ok", or a corruption. ERROR kinds must stop the reader at that line; the others
# are benign (the file stays readable, maybe with odd names or captions).
FLICKR8K_LINE_ERRORS = ("no_tab", "no_number", "bad_number", "empty_caption", "parent_name", "absolute_name")
FLICKR8K_BENIGN = ("nul_caption", "nul_name", "huge_caption", "huge_name", "stray_quote", "duplicate", "blank",
                   "spaces", "backslash_name", "dot_name")


def _flickr8k_line(kind, name, number, caption, draw):
    if kind == "no_tab":
        return f"{name}#{number} {caption}"
    if kind == "no_number":
        return f"{name}\t{caption}"
    if kind == "bad_number":
        return f"{name}#{draw(st.sampled_from(['x', '', '1a', '-1']))}\t{caption}"
    if kind == "empty_caption":
        return f"{name}#{number}\t{draw(st.sampled_from(['', ' ', '  ']))}"
    if kind == "parent_name":
        prefix = draw(st.sampled_from(["../", "a/../../", "sub\\..\\..\\"]))
        return f"{prefix}{name}#{number}\t{caption}"
    if kind == "absolute_name":
        prefix = draw(st.sampled_from(["/", "/tmp/", "\\\\server\\"]))
        return f"{prefix}{name}#{number}\t{caption}"
    if kind == "nul_caption":
        return f"{name}#{number}\t{caption}\x00 end"
    if kind == "nul_name":
        return f"{name}\x00x#{number}\t{caption}"
    if kind == "huge_caption":
        return f"{name}#{number}\t{caption * draw(st.integers(1000, 20000))}"
    if kind == "huge_name":
        return f"{'n' * draw(st.integers(200, 5000))}.jpg#{number}\t{caption}"
    if kind == "stray_quote":
        return f"{name}#{number}\t\"{caption}"
    if kind == "spaces":
        return f"  {name}#{number} \t  {caption}  "
    if kind == "backslash_name":
        return f"sub\\{name}#{number}\t{caption}"
    if kind == "dot_name":
        return f"./{name}#{number}\t{caption}"
    return f"{name}#{number}\t{caption}"


@st.composite
def flickr8k_folders(draw):
    """A Flickr8k folder spec: (files: dict relative path -> bytes, expected) where `expected` is
    ("dataset", images, missing) for a clean folder, ("error", path, line) for a line-level
    error, or None when only the property can be checked."""
    names = draw(st.lists(image_names, min_size=1, max_size=6, unique=True))
    newline, bom = draw(newlines), draw(st.booleans())
    text_folder = draw(st.sampled_from(["", "Flickr8k_text/"]))
    image_folder = draw(st.sampled_from(datasets.FLICKR8K_IMAGE_FOLDERS))
    captions = {name: draw(st.lists(caption_texts, min_size=1, max_size=3)) for name in names}
    corrupt = draw(st.booleans())
    kinds = st.sampled_from(("ok",) * 6 + FLICKR8K_LINE_ERRORS + FLICKR8K_BENIGN) if corrupt else st.just("ok")
    lines, line_kinds = [], []
    for name in names:
        for number, caption in enumerate(captions[name]):
            kind = draw(kinds)
            line = _flickr8k_line(kind, name, number, caption, draw).encode("utf-8")
            if corrupt and draw(st.integers(0, 9)) == 0:
                line, kind = _spliced(line, draw(st.integers(0, 200)), draw(invalid_utf8)), "invalid_utf8"
            repeat = 2 if kind == "duplicate" else 1
            lines += [line] * repeat + ([b"", b"  "] if kind == "blank" else [])
            line_kinds += [kind] * repeat + (["ok", "ok"] if kind == "blank" else [])
    token_bytes, starts = _join_lines(lines, newline, bom)

    split_of = {name: draw(st.sampled_from(["train", "dev", "test", None])) for name in names}
    lists = {split: [name for name in names if split_of[name] == split] for split in ("train", "dev", "test")}
    lists["train"] += draw(st.lists(image_names.map(lambda name: "uncaptioned_" + name), max_size=2, unique=True))
    split_corruption = corrupt and draw(st.integers(0, 3)) == 0
    if split_corruption:
        bad = draw(st.sampled_from(["../up.jpg", "/abs.jpg", "a\x00b.jpg", "x" * 3000] + names))
        lists[draw(st.sampled_from(["train", "dev", "test"]))].append(bad)
    files = {f"{text_folder}Flickr8k.token.txt": token_bytes}
    for split, names_listed in lists.items():
        files[f"{text_folder}Flickr_8k.{split}Images.txt"] = (
            "".join(name + newline for name in names_listed).encode("utf-8"))
    present = draw(st.lists(st.sampled_from(names), unique=True)) if draw(st.booleans()) else names
    for name in present:
        files[f"{image_folder}/{name}"] = b""

    token_path = f"{text_folder}Flickr8k.token.txt"
    undecodable = _first_undecodable_line(token_bytes)
    line_errors = [starts[index] for index, kind in enumerate(line_kinds) if kind in FLICKR8K_LINE_ERRORS]
    benign = any(kind in FLICKR8K_BENIGN for kind in line_kinds) or split_corruption
    if undecodable:
        expected = ("error", token_path, undecodable)
    elif line_errors:
        expected = ("error", token_path, line_errors[0])
    elif benign:
        expected = None
    else:
        split_names = {"train": "train", "dev": "val", "test": "test"}
        images = {name: (split_names[split_of[name]], [caption.strip() for caption in captions[name]])
                  for name in present if split_of[name] is not None}
        expected = ("dataset", images, sorted(set(names) - set(present)))
    return files, expected


def _write_files(data_dir, files):
    for relative, content in files.items():
        path = data_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def _check_expected(dataset, error, data_dir, expected):
    if expected is None:
        return
    if expected[0] == "error":
        _, relative, line = expected
        assert isinstance(error, errors.DataFormatError), f"expected an error at {relative}:{line}, got {error!r}"
        assert (Path(error.path), error.line) == (data_dir / relative, line), str(error)[:300]
        return
    _, images, missing = expected
    if not images:  # no usable image: either no image folder at all or none of the images in it
        assert error is not None and not isinstance(error, errors.DataFormatError)
        assert "none of its" in str(error) or "no image folder" in str(error) or "no Images/ folder" in str(error)
        return
    assert error is None, str(error)[:300]
    assert {record.image_id: (record.split, record.captions) for record in dataset.images} == images
    assert dataset.missing == missing


@_settings(150)
@hypothesis.given(flickr8k_folders())
def test_fuzz_flickr8k_structured(folder):
    files, expected = folder
    with _data_folder() as data_dir:
        _write_files(data_dir, files)
        dataset, error = _load(data_dir)
        _check_expected(dataset, error, data_dir, expected)


# ---------------------------------------------------------------------------------------------
# Kaggle layout: captions.txt

KAGGLE_ROW_ERRORS = ("extra_field", "one_field", "empty_name", "empty_caption", "parent_name", "absolute_name")
KAGGLE_BENIGN = ("nul", "huge_caption", "huge_name", "duplicate", "blank", "spaces", "inner_quote", "multiline",
                 "quoted_comma")


def _csv_row(fields):
    buffer = io.StringIO()
    # The writer quotes fields that hold a character of its line terminator, so it needs both.
    csv.writer(buffer, lineterminator="\r\n").writerow(fields)
    return buffer.getvalue().removesuffix("\r\n")


def _kaggle_row(kind, name, caption, draw):
    if kind == "extra_field":
        return f"{_csv_row([name, caption])},extra"
    if kind == "one_field":
        return _csv_row([name])
    if kind == "empty_name":
        return _csv_row([draw(st.sampled_from(["", " "])), caption])
    if kind == "empty_caption":
        return f"{_csv_row([name])},{draw(st.sampled_from(['', ' ', '   ']))}"
    if kind == "parent_name":
        return _csv_row(["../" + name, caption])
    if kind == "absolute_name":
        return _csv_row(["/" + name, caption])
    if kind == "nul":
        return _csv_row([name, caption + "\x00"])
    if kind == "huge_caption":
        return _csv_row([name, caption * draw(st.integers(1000, 10000))])
    if kind == "huge_name":
        return _csv_row(["n" * draw(st.integers(200, 5000)) + ".jpg", caption])
    if kind == "spaces":
        return f"  {_csv_row([name])} , {caption.replace(',', ' ').replace(chr(34), ' ')}  "
    if kind == "inner_quote":
        return _csv_row([name, f'The "best" {caption}'])
    if kind == "multiline":
        return _csv_row([name, f"{caption}\nmore\r\nlines"])
    if kind == "quoted_comma":
        return _csv_row([name, f"{caption}, and more"])
    if kind == "stray_quote":
        return f'{_csv_row([name])},"{caption}'
    return _csv_row([name, caption])


@st.composite
def kaggle_folders(draw):
    """A Kaggle folder spec, as `flickr8k_folders` describes."""
    names = draw(st.lists(image_names, min_size=1, max_size=6, unique=True))
    newline, bom = draw(newlines), draw(st.booleans())
    captions = {name: draw(st.lists(caption_texts, min_size=1, max_size=3)) for name in names}
    corrupt = draw(st.booleans())
    kinds = (st.sampled_from(("ok",) * 6 + KAGGLE_ROW_ERRORS + KAGGLE_BENIGN + ("stray_quote",))
             if corrupt else st.just("ok"))
    header = draw(st.sampled_from(["image,caption"] * 4 + ["Image , Caption", "img,text", "image", ""]))
    rows, row_kinds = [header.encode()], ["ok" if header.replace(" ", "").lower() == "image,caption" else "header"]
    for name in names:
        for caption in captions[name]:
            kind = draw(kinds)
            row = _kaggle_row(kind, name, caption, draw).encode("utf-8")
            if corrupt and draw(st.integers(0, 9)) == 0:
                row, kind = _spliced(row, draw(st.integers(0, 200)), draw(invalid_utf8)), "invalid_utf8"
            repeat = 2 if kind == "duplicate" else 1
            rows += [row] * repeat + ([b"", b" , "] if kind == "blank" else [])
            row_kinds += [kind] * repeat + (["ok", "ok"] if kind == "blank" else [])
    content, starts = _join_lines(rows, newline, bom)
    files = {"captions.txt": content}
    present = draw(st.lists(st.sampled_from(names), unique=True)) if draw(st.booleans()) else names
    for name in present:
        files[f"Images/{name}"] = b""

    # An unclosed quote is an error only when no later quote can close it: CSV is ambiguous there.
    line_errors = []
    for index, kind in enumerate(row_kinds):
        if kind in KAGGLE_ROW_ERRORS or kind == "header" and header.strip():
            line_errors.append(starts[index])
        elif kind == "stray_quote" and b'"' not in b"".join(rows[index + 1:]):
            line_errors.append(starts[index])
        if kind == "stray_quote":
            break  # what follows is inside the quoted field
    undecodable = _first_undecodable_line(content)
    benign = any(kind in KAGGLE_BENIGN + ("stray_quote",) for kind in row_kinds) or not header.strip()
    if undecodable:
        expected = ("error", "captions.txt", undecodable)
    elif not header.strip():
        # No header line: the reader takes the first row that follows as a header and may
        # refuse it there, before any later row's own error (found by this test).
        expected = None
    elif line_errors:
        expected = ("error", "captions.txt", line_errors[0])
    elif benign:
        expected = None
    else:
        splits = datasets.deterministic_split(names, DATA_CONFIG.val_images, DATA_CONFIG.test_images)
        images = {name: (splits[name], [caption.strip() for caption in captions[name]]) for name in present}
        expected = ("dataset", images, sorted(set(names) - set(present)))
    return files, expected


@_settings(150)
@hypothesis.given(kaggle_folders())
def test_fuzz_kaggle_structured(folder):
    files, expected = folder
    with _data_folder() as data_dir:
        _write_files(data_dir, files)
        dataset, error = _load(data_dir)
        _check_expected(dataset, error, data_dir, expected)


# ---------------------------------------------------------------------------------------------
# Karpathy split JSON

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)

# Per entry: ERROR kinds must stop the reader naming `images[i]`; the others are benign.
KARPATHY_ENTRY_ERRORS = ("no_filename", "filename_type", "empty_filename", "filepath_type", "bad_split",
                         "no_sentences", "sentences_type", "sentence_type", "empty_sentence", "parent_name",
                         "absolute_name", "lone_surrogate", "duplicate")
KARPATHY_BENIGN = ("huge_raw", "nul_raw", "tokens_only", "extra_fields", "no_sentence", "filepath")


def _karpathy_entry(kind, name, split, texts, draw):
    entry = {"filename": name, "split": split, "sentences": [{"raw": raw, "tokens": raw.split()} for raw in texts],
             "imgid": draw(st.integers(0, 10**6))}
    if kind == "no_filename":
        del entry["filename"]
    elif kind == "filename_type":
        entry["filename"] = draw(json_values.filter(lambda value: not isinstance(value, str)))
    elif kind == "empty_filename":
        entry["filename"] = draw(st.sampled_from(["", "  "]))
    elif kind == "filepath_type":
        entry["filepath"] = draw(json_values.filter(lambda value: not isinstance(value, str)))
    elif kind == "bad_split":
        entry["split"] = draw(st.sampled_from(["dev", "Train", "", None, 3, ["train"]]))
    elif kind == "no_sentences":
        del entry["sentences"]
    elif kind == "sentences_type":
        entry["sentences"] = draw(st.sampled_from([{}, "a dog", 0, None]))
    elif kind == "sentence_type":
        entry["sentences"].append(draw(st.sampled_from(["a dog", 1, None, ["a"]])))
    elif kind == "empty_sentence":
        entry["sentences"].append(draw(st.sampled_from([{}, {"raw": " "}, {"raw": "", "tokens": []},
                                                        {"tokens": ["a", 1]}, {"raw": 5}])))
    elif kind == "parent_name":
        entry["filename"] = "../" + name
    elif kind == "absolute_name":
        entry["filename"] = "/" + name
    elif kind == "lone_surrogate":
        where = draw(st.sampled_from(["raw", "filename", "filepath"]))
        surrogate = draw(st.sampled_from(["\ud800", "\udc80", "\udfff"]))
        if where == "raw":
            entry["sentences"][0] = {"raw": texts[0] + surrogate}
        else:
            entry[where] = surrogate + name
    elif kind == "huge_raw":
        entry["sentences"][0]["raw"] = texts[0] * draw(st.integers(1000, 20000))
    elif kind == "nul_raw":
        entry["sentences"][0]["raw"] = texts[0] + "\x00"
    elif kind == "tokens_only":
        entry["sentences"] = [{"tokens": raw.split() or ["x"]} for raw in texts]
    elif kind == "extra_fields":
        entry.update(draw(st.dictionaries(st.sampled_from(["sentids", "cocoid", "x"]), json_values, max_size=2)))
    elif kind == "no_sentence":
        entry["sentences"] = []
    elif kind == "filepath":
        entry["filepath"] = draw(st.sampled_from(["sub", "sub/", " /sub/ ", "a/b"]))
    return entry


@st.composite
def karpathy_folders(draw):
    """A Karpathy folder spec, as `flickr8k_folders` describes; errors name an entry, not a line."""
    names = draw(st.lists(image_names, min_size=1, max_size=6, unique=True))
    corrupt = draw(st.booleans())
    kinds = (st.sampled_from(("ok",) * 6 + KARPATHY_ENTRY_ERRORS + KARPATHY_BENIGN) if corrupt
             else st.just("ok"))
    entries, entry_kinds, expected_images = [], [], {}
    for name in names:
        split = draw(st.sampled_from(list(dataset_layouts.KARPATHY_SPLITS)))
        texts = draw(st.lists(caption_texts, min_size=1, max_size=3))
        kind = draw(kinds)
        entries.append(_karpathy_entry(kind, name, split, texts, draw))
        entry_kinds.append(kind)
        if kind == "duplicate":
            entries.append(dict(entries[-1]))
            entry_kinds[-1] = "ok"
            entry_kinds.append("duplicate")
        expected_images[name] = (dataset_layouts.KARPATHY_SPLITS[split], [raw.strip() for raw in texts])
    document = {"images": entries, "dataset": "fuzz"}
    if corrupt and draw(st.integers(0, 9)) == 0:
        document = draw(st.sampled_from([entries, {"images": {}}, {"images": None}, {}, "images", None]))
        entry_kinds = ["top"]
    indent = draw(st.sampled_from([None, 1]))
    ensure_ascii = draw(st.booleans())
    text = json.dumps(document, indent=indent, ensure_ascii=ensure_ascii)
    content = text.encode("utf-8", "surrogatepass")  # lone surrogates written raw are invalid UTF-8
    text_corruption = corrupt and draw(st.integers(0, 5)) == 0
    if text_corruption:
        operation = draw(st.sampled_from(["truncate", "invalid_utf8", "big_int", "deep", "bom"]))
        if operation == "truncate":
            content = content[: draw(st.integers(0, max(0, len(content) - 1)))]
        elif operation == "invalid_utf8":
            content = _spliced(content, draw(st.integers(0, len(content))), draw(invalid_utf8))
        elif operation == "big_int":
            content = content.replace(b'"imgid": ', b'"imgid": ' + b"9" * 5000, 1)
        elif operation == "deep":
            depth = draw(st.integers(1000, 100000))
            content = content.replace(b'"dataset": ', b'"dataset": ' + b"[" * depth + b"1" + b"]" * depth, 1)
        else:
            content = b"\xef\xbb\xbf" + content
    json_name = draw(st.sampled_from(["dataset_flickr8k.json", "dataset_coco.json", "dataset_.json"]))
    files = {json_name: content}
    image_folder = draw(st.sampled_from(datasets.KARPATHY_IMAGE_FOLDERS))
    present = draw(st.lists(st.sampled_from(names), unique=True)) if draw(st.booleans()) else names
    for name in present:
        files[f"{image_folder}/{name}" if image_folder != "." else name] = b""
        if corrupt:
            for filepath in ("sub", "a/b"):
                files[f"{image_folder}/{filepath}/{name}"] = b""

    entry_errors = [index for index, kind in enumerate(entry_kinds) if kind in KARPATHY_ENTRY_ERRORS]
    benign = any(kind in KARPATHY_BENIGN for kind in entry_kinds) or text_corruption
    undecodable = _first_undecodable_line(content)
    if text_corruption or entry_kinds == ["top"]:
        expected = None
    elif undecodable:  # written raw (ensure_ascii=False), a lone surrogate is undecodable bytes
        expected = ("error", json_name, undecodable)
    elif entry_errors:
        expected = ("entry", json_name, entry_errors[0])
    elif benign:
        expected = None
    else:
        images = {name: value for name, value in expected_images.items() if name in present}
        expected = ("dataset", images, sorted(set(names) - set(present)))
    return files, expected


@_settings(150)
@hypothesis.given(karpathy_folders())
def test_fuzz_karpathy_structured(folder):
    files, expected = folder
    with _data_folder() as data_dir:
        _write_files(data_dir, files)
        dataset, error = _load(data_dir)
        if expected is not None and expected[0] == "entry":
            _, relative, index = expected
            assert isinstance(error, errors.DataFormatError), f"expected an error at images[{index}], got {error!r}"
            assert Path(error.path) == data_dir / relative
            assert f": images[{index}]" in str(error), str(error)[:300]
        else:
            _check_expected(dataset, error, data_dir, expected)


# ---------------------------------------------------------------------------------------------
# Raw and byte-mutated file contents

VALID_TOKEN_FILE = "a.jpg#0\tA dog runs .\na.jpg#1\tA brown dog\nb.jpg#0\tA cat, sitting\n".encode()
VALID_SPLIT_LIST = b"a.jpg\nb.jpg\n"
VALID_CSV = 'image,caption\na.jpg,"A dog, running"\nb.jpg,"The ""best"" cat"\nb.jpg,A cat\n'.encode()
VALID_JSON = json.dumps({"images": [
    {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]}]},
    {"filepath": "sub", "filename": "b.jpg", "split": "restval", "sentences": [{"tokens": ["a", "cat"]}]},
]}, indent=1).encode()

LAYOUT_FILES = {
    # layout: (the file that gets the fuzzed content, the valid content it starts from, other files)
    "flickr8k": ("Flickr8k.token.txt", VALID_TOKEN_FILE, {
        "Flickr_8k.trainImages.txt": VALID_SPLIT_LIST, "Flickr_8k.devImages.txt": b"",
        "Flickr_8k.testImages.txt": b"", "Images/a.jpg": b"", "Images/b.jpg": b""}),
    "flickr8k-split": ("Flickr_8k.trainImages.txt", VALID_SPLIT_LIST, {
        "Flickr8k.token.txt": VALID_TOKEN_FILE, "Flickr_8k.devImages.txt": b"",
        "Flickr_8k.testImages.txt": b"", "Images/a.jpg": b"", "Images/b.jpg": b""}),
    "kaggle": ("captions.txt", VALID_CSV, {"Images/a.jpg": b"", "Images/b.jpg": b""}),
    "karpathy": ("dataset_fuzz.json", VALID_JSON, {"a.jpg": b"", "sub/b.jpg": b""}),
}

# Bytes that matter to the parsers, to make mutations hit structure more often than chance.
special_bytes = st.sampled_from([b"\t", b"#", b",", b'"', b"\n", b"\r", b"\x00", b"\xff", b"{", b"}", b"[", b"]",
                                 b":", b"/", b"..", b"\\", b"\xef\xbb\xbf", b"\xc3", b"\xe2\x80\xa8", b"0"])
mutations = st.lists(st.tuples(st.sampled_from(["insert", "delete", "replace"]), st.integers(0, 1000),
                               special_bytes | st.binary(min_size=1, max_size=4)), min_size=1, max_size=6)


def _mutated(content, operations):
    content = bytearray(content)
    for operation, position, chunk in operations:
        position %= len(content) + 1
        if operation == "insert":
            content[position:position] = chunk
        elif operation == "delete":
            del content[position:position + len(chunk)]
        else:
            content[position:position + len(chunk)] = chunk
    return bytes(content)


@_settings(60)
@hypothesis.given(layout=st.sampled_from(sorted(LAYOUT_FILES)),
                  content=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzz_raw_bytes_as_dataset_file(layout, content):
    target, _, others = LAYOUT_FILES[layout]
    with _data_folder() as data_dir:
        _write_files(data_dir, {**others, target: content})
        _load(data_dir)


@_settings(150)
@hypothesis.given(layout=st.sampled_from(sorted(LAYOUT_FILES)), operations=mutations)
def test_fuzz_mutated_dataset_file(layout, operations):
    target, valid, others = LAYOUT_FILES[layout]
    with _data_folder() as data_dir:
        _write_files(data_dir, {**others, target: _mutated(valid, operations)})
        _load(data_dir)


def test_unmutated_dataset_files_load():
    # The fuzzing above starts from these contents: they must be valid, or it tests nothing.
    for layout, (target, valid, others) in LAYOUT_FILES.items():
        with _data_folder() as data_dir:
            _write_files(data_dir, {**others, target: valid})
            dataset, error = _load(data_dir)
            assert error is None, (layout, str(error))
            assert len(dataset.images) == 2, layout


# ---------------------------------------------------------------------------------------------
# JSON artifacts: captions.json and vocab.json


def _paths(value, prefix=()):
    """Every (container path) inside a JSON value, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, prefix + (index,))


@st.composite
def mutated_json(draw, valid):
    """`valid` (a JSON value) with a few values replaced, removed or added; then maybe its text damaged."""
    data = json.loads(json.dumps(valid))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(data))))
        if not path:
            data = draw(json_values)
            continue
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        operation = draw(st.sampled_from(["replace", "delete", "add", "duplicate"]))
        if operation == "duplicate" and isinstance(parent, list):
            parent.insert(path[-1], json.loads(json.dumps(parent[path[-1]])))
        elif operation == "replace":
            parent[path[-1]] = draw(json_values)
        elif operation == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent.insert(path[-1], draw(json_values))
    content = json.dumps(data, indent=draw(st.sampled_from([None, 1]))).encode()
    if draw(st.integers(0, 4)) == 0:
        content = _mutated(content, draw(mutations))
    return content


VALID_VOCABULARY = text.Vocabulary.build([["a", "dog"], ["a", "cat"], ["dog"]], min_count=1).to_dict()
VALID_CAPTIONS = {
    "format": datasets.CAPTIONS_FORMAT, "version": datasets.CAPTIONS_VERSION, "layout": "kaggle", "name": "fuzz",
    "image_dir": "/data/Images", "split_source": "deterministic", "missing": ["gone.jpg"], "unsplit": [],
    "uncaptioned": [], "images": [
        {"image_id": "a.jpg", "path": "a.jpg", "split": "train", "captions": ["A dog.", "A brown dog"]},
        {"image_id": "sub/b.jpg", "path": "sub/b.jpg", "split": "test", "captions": ["A cat"]},
    ],
}


@_settings(150)
@hypothesis.given(content=mutated_json(VALID_CAPTIONS) | st.binary(max_size=200))
def test_fuzz_read_captions_json(content):
    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / datasets.CAPTIONS_FILE
        path.write_bytes(content)
        dataset, error = _call(datasets.read_captions_json, out, expected_error=errors.ArtifactError)
        if error is not None:
            _check_message(error, f"{path}: ")
            return
        ids = [record.image_id for record in dataset.images]
        assert len(ids) == len(set(ids)), "image ids must be unique"
        for record in dataset.images:
            parts = PurePosixPath(record.image_id).parts
            assert parts and ".." not in parts and not record.image_id.startswith("/")
            assert record.split in datasets.SPLITS
            assert record.captions and all(isinstance(caption, str) for caption in record.captions)
        assert all(isinstance(name, str) for name in dataset.missing + dataset.unsplit + dataset.uncaptioned)
        assert isinstance(dataset.layout, str) and isinstance(dataset.name, str)


@_settings(150)
@hypothesis.given(content=mutated_json(VALID_VOCABULARY) | st.binary(max_size=200))
def test_fuzz_vocabulary_load(content):
    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / text.VOCAB_FILE
        path.write_bytes(content)
        vocabulary, error = _call(text.Vocabulary.load, path, expected_error=errors.ArtifactError)
        if error is not None:
            _check_message(error, f"{path}: ")
            return
        assert vocabulary.words[:4] == list(text.SPECIAL_TOKENS) and vocabulary.min_count >= 1
        ids = list(range(4, len(vocabulary)))
        assert vocabulary.encode(vocabulary.decode(ids)) == ids
        vocabulary.save(path)
        assert text.Vocabulary.load(path) == vocabulary


# ---------------------------------------------------------------------------------------------
# normalize_caption


@_settings(500)
@hypothesis.given(
    st.text(st.characters(blacklist_categories=()))  # any code point, lone surrogates included
    | st.text(st.characters(max_codepoint=0x2FF))  # Latin with accents and punctuation
    # letters, numbers and marks of every script, where "is this a word character" gets subtle
    | st.text(st.characters(whitelist_categories=("Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Nd", "Nl", "No")))
)
def test_fuzz_normalize_caption(raw):
    tokens = text.normalize_caption(raw)
    assert isinstance(tokens, list)
    for token in tokens:
        assert token and token.isalpha(), repr(token)
        assert token == token.lower(), repr(token)
    assert text.normalize_caption(" ".join(tokens)) == tokens  # normalizing twice changes nothing


# ---------------------------------------------------------------------------------------------
# Regression tests: inputs the fuzzing found, each once broken


def _kaggle_folder(data_dir, content, images=("a.jpg", "b.jpg")):
    _touch(data_dir / "Images", images)
    (data_dir / "captions.txt").write_bytes(content)
    return data_dir / "captions.txt"


def test_overlong_image_name_is_a_missing_file_not_an_os_error():
    # Was: OSError [Errno 36] File name too long, from Path.is_file, in every layout.
    long_name = "n" * 300 + ".jpg"
    with _data_folder() as data_dir:
        _kaggle_folder(data_dir, f"image,caption\na.jpg,A dog\n{long_name},A cat\n".encode())
        dataset = datasets.load_dataset(data_dir, DATA_CONFIG)
        assert [record.image_id for record in dataset.images] == ["a.jpg"]
        assert dataset.missing == [long_name]
        assert "\n" not in dataset.summary().splitlines()[-1] and len(dataset.summary()) < 1000


def test_kaggle_unclosed_quote_stops_at_its_record():
    # Was: loaded, with the rest of the file swallowed into the caption 'A dog\nb.jpg,A cat\n'.
    with _data_folder() as data_dir:
        path = _kaggle_folder(data_dir, b'image,caption\na.jpg,"A dog\nb.jpg,A cat\n')
        with pytest.raises(errors.DataFormatError, match="unreadable CSV record") as caught:
            datasets.load_dataset(data_dir, DATA_CONFIG)
        assert str(caught.value).startswith(f"{path}:2: ")


@pytest.mark.parametrize("layout", ["flickr8k", "kaggle"])
def test_undecodable_byte_names_its_line(layout):
    # Was: `file: not UTF-8 text (... in position N ...)` with no line, and N counted from the
    # start of an 8 KiB decoding chunk, not of the file. Here the bad byte is past the first chunk.
    rows = [f"img{index}.jpg#0\tA dog number {index}" if layout == "flickr8k" else f"img{index}.jpg,A dog {index}"
            for index in range(700)]
    lines = [line.encode() for line in rows]
    lines[600] = b"\xff" + lines[600]
    header = b"" if layout == "flickr8k" else b"image,caption\r"
    content = b"\xef\xbb\xbf" + header + b"\r".join(lines) + b"\r"  # with a BOM and CR-only line ends
    filename = "Flickr8k.token.txt" if layout == "flickr8k" else "captions.txt"
    with _data_folder() as data_dir:
        _touch(data_dir / "Images", ["img0.jpg"])
        (data_dir / filename).write_bytes(content)
        with pytest.raises(errors.DataFormatError, match=r"not UTF-8 text \(byte 0xff") as caught:
            datasets.load_dataset(data_dir, DATA_CONFIG)
        assert caught.value.line == (601 if layout == "flickr8k" else 602)
        assert str(caught.value).startswith(f"{data_dir / filename}:{caught.value.line}: ")


def test_error_messages_stay_one_short_line():
    # Was: the name's line break went into the message, and a 100 kB key was quoted whole.
    with _data_folder() as data_dir:
        path = _kaggle_folder(data_dir, b'image,caption\n"a\nb.jpg",  \n')
        with pytest.raises(errors.DataFormatError) as caught:
            datasets.load_dataset(data_dir, DATA_CONFIG)
        assert str(caught.value) == f"{path}:2: empty caption for 'a\\nb.jpg'"
    with _data_folder() as data_dir:
        _touch(data_dir / "Images", ["a.jpg"])
        (data_dir / "Flickr8k.token.txt").write_text("x" * 100_000 + "\tA dog\n", encoding="utf-8")
        with pytest.raises(errors.DataFormatError, match="expected 'image.jpg#k' before the tab") as caught:
            datasets.load_dataset(data_dir, DATA_CONFIG)
        assert len(str(caught.value)) < len(str(data_dir)) + 200


@pytest.mark.parametrize(
    "content, message",
    [
        # Was: TypeError: unhashable type: 'list'.
        (json.dumps({"images": [{"filename": "a.jpg", "split": ["train"], "sentences": [{"raw": "A dog"}]}]}),
         r": images\[0\]\.split: \['train'\] is not one of train, val, test, restval"),
        # Was: RecursionError.
        ('{"images": []' + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        # Was: ValueError: Exceeds the limit (4300 digits) for integer string conversion.
        ('{"images": [], "x": ' + "9" * 5000 + "}", "invalid JSON"),
        # Was: loaded, and write_captions_json then failed with UnicodeEncodeError.
        (json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog \ud800"}]}]}),
         r": images\[0\]\.sentences\[0\]\.raw: 'A dog \\ud800' holds a lone surrogate escape"),
        (json.dumps({"images": [{"filename": "a\udcff.jpg", "split": "train", "sentences": [{"raw": "A dog"}]}]}),
         r": images\[0\]\.filename: .* holds a lone surrogate escape"),
    ],
    ids=["unhashable-split", "deep-nesting", "huge-integer", "surrogate-caption", "surrogate-filename"],
)
def test_karpathy_damaged_json_is_a_format_error(content, message):
    with _data_folder() as data_dir:
        _touch(data_dir, ["a.jpg"])
        path = data_dir / "dataset_flickr8k.json"
        path.write_text(content, encoding="utf-8")
        with pytest.raises(errors.DataFormatError, match=message) as caught:
            datasets.load_dataset(data_dir, DATA_CONFIG)
        assert str(caught.value).startswith(f"{path}: ")


def test_read_captions_json_rejects_repeated_and_escaping_image_ids(tmp_path):
    # Was: accepted, giving a Dataset with two records for one image.
    data = json.loads(json.dumps(VALID_CAPTIONS))
    data["images"].append(dict(data["images"][0], split="test"))
    path = tmp_path / datasets.CAPTIONS_FILE
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(errors.ArtifactError, match=r"images\[2\]\.image_id 'a.jpg' repeats images\[0\]"):
        datasets.read_captions_json(tmp_path)
    for escaping in ("../a.jpg", "/a.jpg", "b/../a.jpg", "./a.jpg", "b//a.jpg", "b/./a.jpg", "b/", ".", "a.jpg/.."):
        data["images"][2]["image_id"] = escaping
        path.write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(errors.ArtifactError, match=rf"images\[2\]\.image_id '{re.escape(escaping)}' is not a normalized"):
            datasets.read_captions_json(tmp_path)
    data["images"][2]["image_id"] = "b/.a/a..jpg"  # dots inside a name are not steps
    path.write_text(json.dumps(data), encoding="utf-8")
    assert datasets.read_captions_json(tmp_path).images[2].image_id == "b/.a/a..jpg"


def test_normalize_caption_drops_numerals_that_are_not_digits():
    # Was: ['〇', 'dogs', '༳']: `\w` matches numerals of categories Nl and No.
    assert text.normalize_caption("〇 dogs ༳ 三") == ["dogs", "三"]
