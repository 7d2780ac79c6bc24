"""Captioned-dataset readers: one `Dataset` from a folder, whatever layout it comes in.

Layouts, detected in this order (the first that matches wins):

* ``karpathy``: a Karpathy split JSON (``dataset_flickr8k.json``, ``dataset_flickr30k.json``,
  ``dataset_coco.json``: any single ``dataset_*.json`` at the top of the folder) plus an
  image folder. Its ``split`` field is used; ``restval`` counts as ``train``.
* ``flickr8k``: the original Flickr8k release: ``Flickr8k.token.txt`` and the
  ``Flickr_8k.{train,dev,test}Images.txt`` split lists, at the top or under
  ``Flickr8k_text/``, with images in ``Flicker8k_Dataset/`` (the release's spelling),
  ``Flickr8k_Dataset/`` or ``Images/``.
* ``kaggle``: ``captions.txt`` (CSV, header ``image,caption``) plus ``Images/``; the
  Flickr8k split lists are used when present, else `deterministic_split`.

Captions stay raw here (`pipeline.data.text.normalize_caption` tokenizes them). Missing image
files are reported by name in `Dataset.missing` and left out, never an error unless no
image is left. The files' own parsers, with their line-precise errors, are in
`pipeline.data.dataset_layouts`. Pure Python: importing this module must not import TensorFlow.
"""

import dataclasses
import random
from pathlib import Path, PurePosixPath

from pipeline.core import errors, io_utils
from pipeline.core.run_files import CAPTIONS_FILE
from pipeline.data import dataset_layouts

SPLITS = ("train", "val", "test")
CAPTIONS_FORMAT = "captioner.captions"
CAPTIONS_VERSION = 1

FLICKR8K_TOKEN_FILE = "Flickr8k.token.txt"
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
FLICKR8K_TEXT_FOLDER = "Flickr8k_text"
FLICKR8K_IMAGE_FOLDERS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
KAGGLE_CAPTIONS_FILE = "captions.txt"
KAGGLE_IMAGE_FOLDERS = ("Images", "images")
KARPATHY_IMAGE_FOLDERS = ("Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k_images", ".")

# The deterministic split must not move when the training seed changes, so it has its own.
SPLIT_SEED = 0
# From this many images on, a dataset counts as Flickr8k-sized and gets the configured
# val/test sizes; smaller ones get an eighth each.
FULL_SIZE_IMAGES = 8000
# How many image names to look up when choosing between candidate image folders.
FOLDER_PROBE_SIZE = 16
# How many missing names the summary and messages show.
NAMES_SHOWN = 5


@dataclasses.dataclass
class ImageRecord:
    """One image and its captions.

    image_id: str, the image path relative to `Dataset.image_dir`, forward slashes
        (also the `image_ids` entry in features.h5).
    split: str, one of `SPLITS`.
    captions: list[str], the raw caption strings.
    """

    image_id: str
    split: str
    captions: list

    def path(self, image_dir):
        """Path of the image file under `image_dir`."""
        return Path(image_dir).joinpath(*PurePosixPath(self.image_id).parts)


@dataclasses.dataclass
class Dataset:
    """A captioned dataset, images sorted by id.

    layout: str, "flickr8k", "kaggle" or "karpathy".
    image_dir: Path, the folder the image ids are relative to (absolute).
    images: list[ImageRecord], the usable images (file present, captioned, in a split).
    missing: list[str], ids named by the caption files whose image file does not exist.
    name: str, "flickr8k", "flickr30k", "coco" or the data folder's name.
    unsplit: list[str], captioned images present on disk but in no split list (left out).
    uncaptioned: list[str], images in a split list (or JSON entry) without any caption.
    split_source: str, where the split came from, for the summary.
    """

    layout: str
    image_dir: Path
    images: list
    missing: list
    name: str
    unsplit: list = dataclasses.field(default_factory=list)
    uncaptioned: list = dataclasses.field(default_factory=list)
    split_source: str = ""

    def split_images(self, split):
        """list[ImageRecord] of one split ("train", "val" or "test")."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return [record for record in self.images if record.split == split]

    def split_counts(self):
        """dict split -> number of images, every split present (possibly 0)."""
        counts = dict.fromkeys(SPLITS, 0)
        for record in self.images:
            counts[record.split] += 1
        return counts

    @property
    def num_captions(self):
        """Captions of the usable images (int)."""
        return sum(len(record.captions) for record in self.images)

    def summary(self):
        """A short multi-line description for the console: layout, splits, captions, what was left out."""
        counts = self.split_counts()
        lines = [
            f"dataset {self.name} ({self.layout} layout), images in {self.image_dir}",
            "images: " + ", ".join(f"{counts[split]} {split}" for split in SPLITS)
            + f" ({len(self.images)} total), {self.num_captions} captions",
        ]
        if self.split_source:
            lines.append(f"split: {self.split_source}")
        for label, names in (
            ("missing image files", self.missing),
            ("captioned images in no split list, left out", self.unsplit),
            ("images without captions, left out", self.uncaptioned),
        ):
            if names:
                lines.append(f"{label}: {len(names)} ({_first_names(names)})")
        return "\n".join(lines)


def load_dataset(data_dir, config):
    """Reads the captioned dataset in `data_dir`, detecting its layout (see the module docstring).

    Args:
        data_dir: str or Path, the dataset folder.
        config: `pipeline.core.config.DataConfig`; `val_images`/`test_images` size the
            deterministic split of a Kaggle layout without split lists.
    Returns:
        Dataset.
    Raises:
        PipelineError: the folder is not a dataset, or no image file of it exists.
        DataFormatError: a malformed line or field (the message starts with `file:line`).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise errors.PipelineError(f"{data_dir}: dataset folder does not exist")
    karpathy_files = sorted(data_dir.glob("dataset_*.json"))
    if len(karpathy_files) > 1:
        raise errors.PipelineError(
            f"{data_dir}: several Karpathy split files ({', '.join(path.name for path in karpathy_files)}); "
            "keep one per dataset folder"
        )
    if karpathy_files:
        return _load_karpathy(data_dir, karpathy_files[0])
    token_file = _find_text_file(data_dir, FLICKR8K_TOKEN_FILE)
    if token_file is not None:
        return _load_flickr8k(data_dir, token_file, config)
    if (data_dir / KAGGLE_CAPTIONS_FILE).is_file():
        return _load_kaggle(data_dir, data_dir / KAGGLE_CAPTIONS_FILE, config)
    raise errors.PipelineError(
        f"{data_dir}: no captioned dataset found; looked for a Karpathy split file (dataset_*.json), "
        f"the Flickr8k release ({FLICKR8K_TOKEN_FILE} at the top or under {FLICKR8K_TEXT_FOLDER}/, "
        f"with {' or '.join(folder + '/' for folder in FLICKR8K_IMAGE_FOLDERS)}) "
        f"and the Kaggle layout (Images/ plus {KAGGLE_CAPTIONS_FILE})"
    )


def deterministic_split(image_names, val_images, test_images):
    """Assigns every image to a split, independently of the order the names come in.

    Rule: sort the unique names, shuffle them with `random.Random(SPLIT_SEED)`, then the
    last `test` names go to "test", the `val` names before them to "val", the rest to
    "train". With at least `FULL_SIZE_IMAGES` (8000, Flickr8k-sized) images,
    val = `val_images` and test = `test_images`; with fewer, val = test = n // 8, at
    least 1 each when n >= 3 (and 0 below that, so tiny sets stay all training).
    The readers pass every captioned name, image file present or not, so that a file
    going missing leaves every other image in its split.

    Args:
        image_names: iterable of str.
        val_images, test_images: int, the sizes for a Flickr8k-sized dataset.
    Returns:
        dict[str, str], name -> "train" | "val" | "test".
    """
    names = sorted(set(image_names))
    random.Random(SPLIT_SEED).shuffle(names)
    total = len(names)
    if total >= FULL_SIZE_IMAGES:
        val_size, test_size = val_images, test_images
    elif total >= 3:
        val_size = test_size = max(1, total // 8)
    else:
        val_size = test_size = 0
    if val_size < 0 or test_size < 0 or val_size + test_size >= total > 0:
        raise errors.PipelineError(
            f"data.val_images={val_images} and data.test_images={test_images} leave no training image "
            f"out of {total}"
        )
    train_end = total - val_size - test_size
    splits = {}
    for position, name in enumerate(names):
        splits[name] = "train" if position < train_end else "val" if position < total - test_size else "test"
    return splits


def write_captions_json(out_dir, dataset):
    """Writes `OUT/captions.json` atomically (schema in docs/ARCHITECTURE.md).

    Each image's "path" is its path relative to "image_dir" (equal to the id).
    """
    data = {
        "format": CAPTIONS_FORMAT,
        "version": CAPTIONS_VERSION,
        "layout": dataset.layout,
        "name": dataset.name,
        "image_dir": str(dataset.image_dir),
        "split_source": dataset.split_source,
        "missing": list(dataset.missing),
        "unsplit": list(dataset.unsplit),
        "uncaptioned": list(dataset.uncaptioned),
        "images": [
            {"image_id": record.image_id, "path": record.image_id, "split": record.split,
             "captions": list(record.captions)}
            for record in dataset.images
        ],
    }
    path = Path(out_dir) / CAPTIONS_FILE
    io_utils.write_json(path, data)
    return path


def read_captions_json(out_dir):
    """Reads `OUT/captions.json` back into a Dataset; a missing, foreign or damaged file raises ArtifactError."""
    data, fail = io_utils.read_format_json(Path(out_dir) / CAPTIONS_FILE, "captions file", CAPTIONS_FORMAT,
                                           CAPTIONS_VERSION, "rerun `extract` to rewrite it")
    for field in ("layout", "name", "image_dir"):
        if not isinstance(data.get(field), str):
            fail(f"field {field!r} must be a string")
    split_source = data.get("split_source", "")
    if not isinstance(split_source, str):
        fail("field 'split_source' must be a string")
    name_lists = {}
    for field in ("missing", "unsplit", "uncaptioned"):
        value = data.get(field, [])
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            fail(f"field {field!r} must be a list of strings")
        name_lists[field] = value
    entries = data.get("images")
    if not isinstance(entries, list):
        fail("field 'images' must be a list")
    images, first_index = [], {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            fail(f"images[{index}] must be an object")
        image_id, split, captions = entry.get("image_id"), entry.get("split"), entry.get("captions")
        if not isinstance(image_id, str) or not image_id:
            fail(f"images[{index}].image_id must be a non-empty string")
        # Relative and normalized (PurePosixPath(image_id).as_posix() == image_id), with no ".."
        # step: tested on the string, as two paths per image cost 1.5 s at COCO's 123k images.
        if any(part in ("", ".", "..") for part in image_id.split("/")):
            fail(f"images[{index}].image_id {dataset_layouts.shown(image_id)} is not a normalized path "
                 f"inside image_dir")
        if image_id in first_index:
            fail(f"images[{index}].image_id {dataset_layouts.shown(image_id)} repeats images[{first_index[image_id]}]")
        first_index[image_id] = index
        if split not in SPLITS:
            fail(f"images[{index}].split is {split!r}, expected one of {', '.join(SPLITS)}")
        if not isinstance(captions, list) or not captions or not all(isinstance(text, str) for text in captions):
            fail(f"images[{index}].captions must be a non-empty list of strings")
        images.append(ImageRecord(image_id, split, list(captions)))
    return Dataset(
        layout=data["layout"], image_dir=Path(data["image_dir"]), images=images, name=data["name"],
        split_source=split_source, **name_lists,
    )


# ---------------------------------------------------------------------------------------------
# Layout readers


def _load_flickr8k(data_dir, token_file, config):
    """The Dataset of a Flickr8k release whose token file is `token_file` (Path)."""
    captions = dataset_layouts.read_flickr8k_tokens(token_file)
    image_dir = _choose_image_dir(data_dir, FLICKR8K_IMAGE_FOLDERS, captions)
    if image_dir is None:
        raise errors.PipelineError(
            f"{data_dir}: found {token_file.name} but no image folder "
            f"({', '.join(folder + '/' for folder in FLICKR8K_IMAGE_FOLDERS)})"
        )
    splits, split_source = _splits_from_lists_or_rule(data_dir, captions, config)
    return _assemble("flickr8k", "flickr8k", image_dir, captions, splits, split_source, token_file)


def _load_kaggle(data_dir, captions_file, config):
    """The Dataset of a Kaggle layout: `captions_file` (captions.txt) beside an Images/ folder."""
    captions = dataset_layouts.read_kaggle_csv(captions_file)
    image_dir = _choose_image_dir(data_dir, KAGGLE_IMAGE_FOLDERS, captions)
    if image_dir is None:
        raise errors.PipelineError(f"{data_dir}: found {captions_file.name} but no Images/ folder beside it")
    splits, split_source = _splits_from_lists_or_rule(data_dir, captions, config)
    return _assemble("kaggle", data_dir.name, image_dir, captions, splits, split_source, captions_file)


def _load_karpathy(data_dir, json_file):
    """The Dataset of a Karpathy split file `json_file` (dataset_NAME.json), named NAME."""
    captions, splits = dataset_layouts.read_karpathy_json(json_file)
    # KARPATHY_IMAGE_FOLDERS ends with ".", so a folder is always found
    image_dir = _choose_image_dir(data_dir, KARPATHY_IMAGE_FOLDERS, splits)
    name = json_file.stem[len("dataset_"):] or data_dir.name
    return _assemble("karpathy", name, image_dir, captions, splits, f"the split field of {json_file.name}", json_file)


def _assemble(layout, name, image_dir, captions, splits, split_source, caption_file):
    """Joins captions and splits, checks the image files, and builds the Dataset.

    captions: dict image id -> list[str]; splits: dict image id -> split, for every image
    the split source names (captioned or not).
    """
    images, missing, unsplit = [], [], []
    for image_id in sorted(captions):
        if not _is_file(image_dir / image_id):
            missing.append(image_id)
        elif image_id not in splits:
            unsplit.append(image_id)
        else:
            images.append(ImageRecord(image_id, splits[image_id], captions[image_id]))
    uncaptioned = sorted(image_id for image_id in splits if image_id not in captions)
    if not images:
        detail = f"; missing: {_first_names(missing)}" if missing else ""
        raise errors.PipelineError(
            f"{caption_file}: none of its {len(captions)} captioned images is usable "
            f"({len(missing)} missing under {image_dir}, {len(unsplit)} in no split){detail}"
        )
    return Dataset(layout=layout, image_dir=image_dir, images=images, missing=missing, name=name,
                   unsplit=unsplit, uncaptioned=uncaptioned, split_source=split_source)


def _splits_from_lists_or_rule(data_dir, captions, config):
    """The Flickr8k split lists if present (all three), else `deterministic_split` of the captioned names."""
    list_files = {split: _find_text_file(data_dir, filename) for split, filename in FLICKR8K_SPLIT_FILES.items()}
    found = {split: path for split, path in list_files.items() if path is not None}
    if not found:
        rule = f"deterministic (seed {SPLIT_SEED} shuffle of the sorted names)"
        return deterministic_split(captions, config.val_images, config.test_images), rule
    if len(found) < len(list_files):
        absent = [FLICKR8K_SPLIT_FILES[split] for split in SPLITS if split not in found]
        raise errors.PipelineError(
            f"{data_dir}: found {', '.join(path.name for path in found.values())} but not {', '.join(absent)}; "
            "provide all three Flickr8k split lists or none"
        )
    splits = dataset_layouts.read_split_lists({split: found[split] for split in SPLITS})
    folder = found["train"].parent.relative_to(data_dir)
    where = f"{folder.as_posix()}/" if folder != Path(".") else ""
    return splits, f"Flickr8k split lists ({where}Flickr_8k.*Images.txt)"


# ---------------------------------------------------------------------------------------------
# Helpers


def _is_file(path):
    """Path.is_file, except that a name the file system cannot hold (too long, say) is no file either."""
    try:
        return path.is_file()
    except OSError:
        return False


def _find_text_file(data_dir, filename):
    """`data_dir/filename` or `data_dir/Flickr8k_text/filename`, whichever exists first; else None."""
    for folder in (data_dir, data_dir / FLICKR8K_TEXT_FOLDER):
        if (folder / filename).is_file():
            return folder / filename
    return None


def _choose_image_dir(data_dir, candidates, image_ids):
    """The candidate folder under `data_dir` holding the most of a sample of `image_ids`.

    Looks up `FOLDER_PROBE_SIZE` ids spread over the sorted list rather than the first few,
    so a block of missing files does not mislead the choice. Ties go to the earlier
    candidate. Returns None when no candidate folder exists.
    """
    folders = [(data_dir / candidate).resolve() for candidate in candidates]
    folders = [folder for index, folder in enumerate(folders) if folder.is_dir() and folder not in folders[:index]]
    if not folders:
        return None
    ordered = sorted(image_ids)
    stride = max(1, len(ordered) // FOLDER_PROBE_SIZE)
    probe = ordered[::stride][:FOLDER_PROBE_SIZE]
    hits = [sum(_is_file(folder / image_id) for image_id in probe) for folder in folders]
    return folders[hits.index(max(hits))]


def _first_names(names):
    """The first NAMES_SHOWN of `names` (list of str), comma-separated, with ", ..." when there are more."""
    shown = ", ".join(dataset_layouts.display(name) for name in names[:NAMES_SHOWN])
    return shown + (", ..." if len(names) > NAMES_SHOWN else "")
