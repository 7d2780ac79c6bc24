"""The parsers of the dataset files, one per layout, with line- and field-precise errors.

    read_flickr8k_tokens(path)   Flickr8k.token.txt: `name.jpg#k<TAB>caption` lines
    read_split_lists(paths)      the Flickr_8k.*Images.txt lists: one image name a line
    read_kaggle_csv(path)        captions.txt: CSV with the header `image,caption`
    read_karpathy_json(path)     dataset_*.json: Karpathy's split format (Flickr8k, Flickr30k, COCO)

Each returns plain dicts keyed by image id (the image path relative to the image folder,
forward slashes); `pipeline.data.datasets` finds the files, the image folder and the
split, and builds the Dataset. A malformed line or field raises DataFormatError whose
message starts with `file:line` (or names the JSON entry, `images[12].split: ...`), so a
user can fix a file of 40,000 lines. Pure Python: no TensorFlow.
"""

import codecs
import csv
import io
import json
import re
import reprlib
from pathlib import Path, PurePosixPath

from pipeline.core import errors

KARPATHY_SPLITS = {"train": "train", "val": "val", "test": "test", "restval": "train"}

# Line breaks as text mode's universal newlines count them (str.splitlines also splits on
# form feeds, U+2028 and others, which would shift line numbers).
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Shows a value from a dataset file in a message: escaped, so a message stays one line,
# and shortened, so a huge line does not become a huge message.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80


def read_flickr8k_tokens(path):
    """Flickr8k.token.txt -> dict image id -> list[str] raw captions, in file order.

    Lines are `name.jpg#k<TAB>caption`; blank lines, a UTF-8 BOM, CRLF and spaces around
    the fields are accepted.
    """
    captions = {}
    for line_number, line in _read_lines(path):
        key, tab, caption = line.partition("\t")
        if not tab:
            raise errors.DataFormatError(path, line_number, "expected 'image.jpg#k<TAB>caption', found no tab")
        name, hash_sign, number = key.strip().rpartition("#")
        if not hash_sign or not number.strip().isdigit() or not name.strip():
            raise errors.DataFormatError(
                path, line_number,
                f"expected 'image.jpg#k' before the tab (k = caption number), found {_SHOWN.repr(key)}",
            )
        caption = caption.strip()
        if not caption:
            raise errors.DataFormatError(path, line_number, f"empty caption for {display(name.strip())}")
        captions.setdefault(_checked_id(name.strip(), path, line_number), []).append(caption)
    if not captions:
        raise errors.DataFormatError(path, None, "no caption in the file")
    return captions


def read_split_lists(list_files):
    """The Flickr8k split lists -> dict image id -> split; an id listed twice is a DataFormatError.

    list_files: dict split -> Path of its list (one image name a line), in the order the
        splits are read (the first listing of a repeated id is the one the message names).
    """
    splits, first_seen = {}, {}
    for split, path in list_files.items():
        for line_number, line in _read_lines(path):
            image_id = _checked_id(line.strip(), path, line_number)
            if image_id in splits:
                raise errors.DataFormatError(
                    path, line_number, f"{display(image_id)} is already listed at {first_seen[image_id]}"
                )
            splits[image_id] = split
            first_seen[image_id] = f"{path.name}:{line_number}"
    return splits


def read_kaggle_csv(path):
    """captions.txt (CSV with header `image,caption`) -> dict image id -> list[str] raw captions.

    The csv module handles quoted captions holding commas, quotes and line breaks; line
    numbers in messages are those where a record starts.
    """
    captions = {}
    header_seen = False
    # Strict: a quote opened at the start of a field must close before a comma or line end,
    # so a stray quote stops here instead of swallowing the rest of the file into one caption.
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    record_start = 1
    try:
        for row in reader:
            # line_num counts physical lines read so far, so a record spans record_start..line_num
            line_number, record_start = record_start, reader.line_num + 1
            if all(not field.strip() for field in row):
                continue
            if not header_seen:
                if [field.strip().lower() for field in row] != ["image", "caption"]:
                    raise errors.DataFormatError(
                        path, line_number, f"expected the header 'image,caption', found {_SHOWN.repr(','.join(row))}"
                    )
                header_seen = True
                continue
            if len(row) != 2:
                raise errors.DataFormatError(
                    path, line_number,
                    f"expected 2 fields (image,caption), found {len(row)}; quote captions that hold commas",
                )
            name, caption = row[0].strip(), row[1].strip()
            if not name:
                raise errors.DataFormatError(path, line_number, "empty image name")
            if not caption:
                raise errors.DataFormatError(path, line_number, f"empty caption for {display(name)}")
            captions.setdefault(_checked_id(name, path, line_number), []).append(caption)
    except csv.Error as error:
        # Reported where the record starts: an unclosed quote is only noticed lines later.
        raise errors.DataFormatError(
            path, record_start, f"unreadable CSV record ({error}); quote a caption that starts with a quote "
            "or holds commas, and double the quotes inside it"
        ) from None
    if not captions:
        raise errors.DataFormatError(path, None, "no caption rows after the header")
    return captions


def read_karpathy_json(path):
    """dataset_*.json -> (dict image id -> list[str] raw captions, dict image id -> split).

    An image id is `filepath/filename` when `filepath` is given (COCO), else `filename`.
    Entries whose `sentences` list is empty get a split but no captions (reported as
    uncaptioned). Problems name the entry: `images[12].split: ...`.
    """
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise errors.DataFormatError(path, error.lineno, f"invalid JSON ({error.msg})") from None
    except RecursionError:
        raise errors.DataFormatError(path, None, "invalid JSON (arrays or objects nested too deeply)") from None
    except ValueError as error:  # an integer literal longer than Python's int max str digits
        raise errors.DataFormatError(path, None, f"invalid JSON ({str(error).partition(':')[0]})") from None
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise errors.DataFormatError(path, None, "expected an object with an 'images' list (Karpathy split format)")
    captions, splits = {}, {}
    first_index = {}
    for index, entry in enumerate(entries):
        where = f"images[{index}]"
        if not isinstance(entry, dict):
            raise errors.DataFormatError(path, None, f"{where}: expected an object, found {type(entry).__name__}")
        filename, filepath = entry.get("filename"), entry.get("filepath", "")
        if not isinstance(filename, str) or not filename.strip():
            raise errors.DataFormatError(path, None, f"{where}.filename: missing or not a non-empty string")
        if not isinstance(filepath, str):
            raise errors.DataFormatError(
                path, None, f"{where}.filepath: expected a string, found {_SHOWN.repr(filepath)}"
            )
        _check_unicode(filename, path, f"{where}.filename")
        _check_unicode(filepath, path, f"{where}.filepath")
        split = entry.get("split")
        if not isinstance(split, str) or split not in KARPATHY_SPLITS:
            raise errors.DataFormatError(
                path, None, f"{where}.split: {_SHOWN.repr(split)} is not one of {', '.join(KARPATHY_SPLITS)}"
            )
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise errors.DataFormatError(path, None, f"{where}.sentences: missing or not a list")
        raw_id = f"{filepath.strip().strip('/')}/{filename.strip()}" if filepath.strip() else filename.strip()
        image_id = _checked_id(raw_id, path, None, where=f"{where}.filename")
        if image_id in splits:
            raise errors.DataFormatError(
                path, None,
                f"{where}.filename: {display(image_id)} already appears as images[{first_index[image_id]}]",
            )
        first_index[image_id] = index
        splits[image_id] = KARPATHY_SPLITS[split]
        texts = [_karpathy_sentence(sentence, path, f"{where}.sentences[{position}]")
                 for position, sentence in enumerate(sentences)]
        if texts:
            captions[image_id] = texts
    if not captions:
        raise errors.DataFormatError(path, None, "no image with sentences in 'images'")
    return captions, splits


def _karpathy_sentence(sentence, path, where):
    """One `sentences[]` entry -> its raw text (`raw`, else the `tokens` joined by spaces)."""
    if not isinstance(sentence, dict):
        raise errors.DataFormatError(path, None, f"{where}: expected an object, found {type(sentence).__name__}")
    raw = sentence.get("raw")
    if isinstance(raw, str) and raw.strip():
        return _check_unicode(raw.strip(), path, f"{where}.raw")
    tokens = sentence.get("tokens")
    if isinstance(tokens, list) and tokens and all(isinstance(token, str) for token in tokens):
        return _check_unicode(" ".join(tokens), path, f"{where}.tokens")
    raise errors.DataFormatError(path, None, f"{where}: neither a non-empty 'raw' string nor a 'tokens' list")


def _read_lines(path):
    """Yields (1-based line number, line without its ending) for the non-blank lines of a UTF-8 file.

    A BOM is dropped and LF, CRLF and CR endings are accepted (text mode's universal newlines).
    Other whitespace is left for the caller, since a tab separates fields.
    """
    for line_number, line in enumerate(_LINE_BREAK.split(_read_text(path)), start=1):
        if line.strip():
            yield line_number, line


def _read_text(path):
    """The text of a UTF-8 file without its BOM; undecodable bytes are a DataFormatError at their line."""
    data = Path(path).read_bytes()
    data = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_number = len(_LINE_BREAK.findall(data[: error.start].decode("latin-1"))) + 1
        raise errors.DataFormatError(
            path, line_number, f"not UTF-8 text (byte 0x{data[error.start]:02x}: {error.reason}); save it as UTF-8"
        ) from None


def _check_unicode(text, path, where):
    """`text` if it is valid Unicode; JSON's escapes can spell lone surrogates, which no file can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.DataFormatError(
            path, None, f"{where}: {_SHOWN.repr(text)} holds a lone surrogate escape"
        ) from None
    return text


def _checked_id(raw_id, path, line_number, where=None):
    """A relative image path with forward slashes; an absolute path or `..` is a format error."""
    image_id = raw_id.replace("\\", "/")
    parts = PurePosixPath(image_id).parts
    if image_id.startswith("/") or ".." in parts or not parts:
        prefix = f"{where}: " if where else ""
        raise errors.DataFormatError(
            path, line_number, f"{prefix}image name {_SHOWN.repr(raw_id)} must be a path inside the image folder"
        )
    return PurePosixPath(*parts).as_posix()


def shown(value):
    """`value` (any) as messages quote it: repr, escaped to one line and shortened to ~80 characters."""
    return _SHOWN.repr(value)


def display(name):
    """An image name as messages show it: as is when short and printable, else escaped and shortened."""
    return name if name.isprintable() and len(name) <= _SHOWN.maxstring else _SHOWN.repr(name)
