"""The embedded demo dataset: synthetic scenes of coloured shapes, generated, not downloaded.

Each image is a plain background holding one to three copies of one shape in one colour,
all small or all large. Its five captions name everything drawn, always in one order
(count, size, object colour, shape, background), in five different sentence frames with
synonyms, so that BLEU against five references rewards naming the right attributes
rather than copying one fixed sentence:

    two large red circles on a blue background
    there is a pair of big red discs on blue
    ...

One order makes each attribute a word the decoder predicts at one point of the sentence
from the image: the demo decoder names the size right in 0.85-0.88 of test captions and
the object colour in 0.58-0.62, against 0.03 and 0.40 with frames that often put the
background first and leave the size out (docs/EXPERIMENTS.md, "How the demo data is designed").

The attributes were chosen by measuring what ResNet50 features with *random* weights (the
demo cannot download ImageNet weights) let a linear probe recover on held-out images; the
measured table is in docs/EXPERIMENTS.md. Output is the Kaggle Flickr8k layout that
`pipeline.data.datasets.load_dataset` detects:

    DEST/Images/demo_0000.jpg ...
    DEST/captions.txt          CSV, header "image,caption", five rows per image
    DEST/DEMO.json             generator version, seed, count and every image's scene

Everything comes from one seed (two `numpy.random.Generator` streams spawned from it: scenes
and wording) and PIL drawing without fonts, and the JPEGs are written with fixed settings,
so one seed and count give the same bytes.
"""

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.core import errors, io_utils

GENERATOR_VERSION = 2
MARKER_FILE = "DEMO.json"
MARKER_FORMAT = "captioner.demo"
IMAGE_DIR = "Images"
CAPTIONS_FILE = "captions.txt"
DEFAULT_NUM_IMAGES = 480
IMAGE_SIZE = 224  # the encoder's input size, so extraction does not resample edges
CAPTIONS_PER_IMAGE = 5
JPEG_QUALITY = 92
SUPERSAMPLING = 4  # drawn this many times larger, then reduced: anti-aliased edges

# Well separated in RGB so JPEG noise and the per-image jitter never blur two names together.
COLORS = {
    "red": (212, 38, 38),
    "green": (40, 160, 60),
    "blue": (36, 84, 214),
    "yellow": (246, 206, 36),
    "white": (242, 242, 242),
    "black": (24, 24, 24),
}
COLOR_JITTER = 12  # +- per channel, so one colour name covers a small range of shades
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
COUNTS = (1, 2, 3)

# Object radius (half the bounding box side) in pixels of the final image, per size.
# Measured: larger objects let the random-weight features tell colour, shape and size
# apart more often (linear probe, docs/EXPERIMENTS.md), so even "small" is not tiny.
RADIUS_RANGE = {"small": (14, 22), "large": (40, 50)}
# Objects sit in distinct cells of a grid, so they never overlap and always fit.
GRID_CELLS = {"small": 3, "large": 2}

# Singular and plural nouns per shape: every caption uses one of these.
SHAPE_NOUNS = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")),
    "square": (("square", "squares"), ("box", "boxes"), ("square shape", "square shapes")),
    "triangle": (("triangle", "triangles"), ("triangular shape", "triangular shapes")),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of"), 3: ("three", "a group of three")}

# One sentence per template; {count} {size} {color} {shapes} {background} {is_are}. The
# frames vary, the order of the attributes never does.
TEMPLATES = (
    "{count} {size} {color} {shapes} on a {background} background",
    "{count} {size} {color} {shapes} against a {background} backdrop",
    "there {is_are} {count} {size} {color} {shapes} on {background}",
    "an image of {count} {size} {color} {shapes} over a {background} background",
    "a picture of {count} {size} {color} {shapes} on a plain {background} background",
    "{count} {size} {color} {shapes} in front of a {background} background",
    "{count} {size} {color} {shapes} set against {background}",
)
# A second set of sentence frames (`frames="alternate"`), for checking that a result is
# not an artefact of one wording: other verbs and nouns, the background first in two.
ALTERNATE_TEMPLATES = (
    "the {background} background holds {count} {size} {color} {shapes}",
    "{count} {size} {color} {shapes} {is_are} drawn on a {background} field",
    "a {background} canvas with {count} {size} {color} {shapes}",
    "we see {count} {size} {color} {shapes} on a {background} surface",
    "a drawing of {count} {size} {color} {shapes} with a {background} background",
    "on a {background} ground there {is_are} {count} {size} {color} {shapes}",
    "{count} {size} {color} {shapes} painted over {background}",
)
FRAMES = ("default", "alternate")


def frame_templates(frames):
    """The templates of a `frames` name, looked up when called (so tests may patch them)."""
    return {"default": TEMPLATES, "alternate": ALTERNATE_TEMPLATES}[frames]


def generate_demo_dataset(dest_dir, seed=0, num_images=DEFAULT_NUM_IMAGES, frames="default"):
    """Writes the demo dataset into `dest_dir` (Kaggle layout) and returns it as a Path.

    Args:
      dest_dir: folder to fill; created if needed. A folder that already holds this exact
        dataset (same generator version, seed and count, every file present) is reused
        as it is; one that holds a `captions.txt` not written by this generator is
        refused rather than overwritten.
      seed: int, the only source of randomness.
      num_images: int >= 1, images to draw (five captions each).
      frames: "default" (TEMPLATES) or "alternate" (ALTERNATE_TEMPLATES): the sentence
        frames of the captions; the images are the same either way.

    Returns:
      Path of `dest_dir`, ready for `pipeline.data.datasets.load_dataset`.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise errors.PipelineError(f"demo dataset: num_images must be a positive integer, got {num_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise errors.PipelineError(f"demo dataset: seed must be a non-negative integer, got {seed!r}")
    if frames not in FRAMES:
        raise errors.PipelineError(f"demo dataset: frames must be one of {', '.join(FRAMES)}, got {frames!r}")
    dest_dir = Path(dest_dir)
    marker_path = dest_dir / MARKER_FILE
    if dataset_is_current(dest_dir, seed, num_images, frames):
        return dest_dir
    if not marker_path.is_file() and (dest_dir / CAPTIONS_FILE).exists():
        raise errors.PipelineError(
            f"{dest_dir / CAPTIONS_FILE}: this folder holds a dataset the demo generator did not write "
            f"(no {MARKER_FILE}); choose another output folder"
        )

    image_dir = dest_dir / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    # Until the new marker is written last, the folder must not pass for a finished dataset.
    if marker_path.exists():
        marker_path.unlink()

    # Two independent streams: the wording can change without changing the pictures (and
    # so without invalidating features extracted from them).
    scene_generator, caption_generator = (
        np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(2))
    scenes = []
    rows = []
    for index in range(num_images):
        scene = sample_scene(scene_generator)
        scene["image"] = f"demo_{index:04d}.jpg"
        scene["captions"] = describe_scene(scene, caption_generator, frame_templates(frames))
        _write_jpeg(render_scene(scene), image_dir / scene["image"])
        scenes.append(scene)
        rows.extend((scene["image"], caption) for caption in scene["captions"])

    wanted = {scene["image"] for scene in scenes}
    for stale in image_dir.glob("demo_*.jpg"):  # left over from an earlier, larger count
        if stale.name not in wanted:
            stale.unlink()

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("image", "caption"))
    writer.writerows(rows)
    io_utils.write_text(dest_dir / CAPTIONS_FILE, text.getvalue())
    io_utils.write_json(marker_path, {
        "format": MARKER_FORMAT,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_images": num_images,
        "frames": frames,
        "image_size": IMAGE_SIZE,
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "scenes": scenes,
    })
    return dest_dir


def dataset_is_current(dest_dir, seed=0, num_images=DEFAULT_NUM_IMAGES, frames="default"):
    """True if `dest_dir` holds, complete, what `generate_demo_dataset` would write there."""
    dest_dir = Path(dest_dir)
    if not (dest_dir / MARKER_FILE).is_file():
        return False
    try:
        marker = read_demo_metadata(dest_dir)
    except errors.ArtifactError:
        return False  # damaged: generation rewrites it
    return (_marker_matches(marker, seed, num_images) and marker.get("frames", "default") == frames
            and _files_present(dest_dir, marker))


def read_demo_metadata(data_dir):
    """Reads `DEMO.json`: a dict with `seed`, `num_images`, `image_size` and `scenes`.

    Each scene is a dict: `image` (file name under Images/), `background` and `color`
    (names in COLORS), `background_rgb` and `color_rgb` ([3] ints, the shades drawn),
    `shape`, `size`, `count`, `objects` ([count] of [x_center, y_center, radius] pixels)
    and `captions` ([5] strings).
    """
    path = Path(data_dir) / MARKER_FILE
    marker = io_utils.read_json(path, "the demo dataset's description")
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        raise errors.ArtifactError(f"{path}: not a demo dataset description (format is not {MARKER_FORMAT!r})")
    for field in ("generator_version", "seed", "num_images", "scenes"):
        if field not in marker:
            raise errors.ArtifactError(f"{path}: field {field!r} is missing")
    return marker


def sample_scene(generator):
    """Draws one scene's attributes and object placements from `generator`.

    Returns a dict with `background`, `background_rgb`, `color`, `color_rgb`, `shape`,
    `size`, `count` and `objects` (list of [x_center, y_center, radius] ints, pixels of
    an IMAGE_SIZE x IMAGE_SIZE image).
    """
    names = list(COLORS)
    background = names[generator.integers(len(names))]
    object_colors = [name for name in names if name != background]
    color = object_colors[generator.integers(len(object_colors))]
    shape = SHAPES[generator.integers(len(SHAPES))]
    size = SIZES[generator.integers(len(SIZES))]
    count = int(COUNTS[generator.integers(len(COUNTS))])

    cells_per_side = GRID_CELLS[size]
    cell = IMAGE_SIZE / cells_per_side
    low, high = RADIUS_RANGE[size]
    radius = int(generator.integers(low, high + 1))  # one size per scene: "small" means all small
    chosen = generator.choice(cells_per_side * cells_per_side, size=count, replace=False)
    objects = []
    for cell_index in sorted(int(value) for value in chosen):
        row, column = divmod(cell_index, cells_per_side)
        # The centre moves freely inside its cell as long as the whole shape stays in it.
        slack = cell / 2 - radius - 2
        assert slack >= 0, "RADIUS_RANGE does not fit GRID_CELLS"
        x_center = (column + 0.5) * cell + generator.uniform(-slack, slack)
        y_center = (row + 0.5) * cell + generator.uniform(-slack, slack)
        objects.append([int(round(x_center)), int(round(y_center)), radius])
    return {
        "background": background,
        "background_rgb": _jitter(COLORS[background], generator),
        "color": color,
        "color_rgb": _jitter(COLORS[color], generator),
        "shape": shape,
        "size": size,
        "count": count,
        "objects": objects,
    }


def render_scene(scene):
    """Draws a scene: a PIL RGB image of IMAGE_SIZE x IMAGE_SIZE pixels (uint8)."""
    scale = SUPERSAMPLING
    canvas = Image.new("RGB", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), tuple(scene["background_rgb"]))
    draw = ImageDraw.Draw(canvas)
    fill = tuple(scene["color_rgb"])
    for x_center, y_center, radius in scene["objects"]:
        x, y, r = x_center * scale, y_center * scale, radius * scale
        if scene["shape"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif scene["shape"] == "square":
            # A square of the circle's area would look smaller than "its" circle; the same
            # bounding box keeps "large" meaning the same extent for every shape.
            side = 0.9 * r
            draw.rectangle((x - side, y - side, x + side, y + side), fill=fill)
        elif scene["shape"] == "triangle":
            # Pointing up and filling the bounding box, so its area (2 r^2) stays near the
            # circle's and the square's and "large" never covers less than "small".
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        else:
            raise AssertionError(f"unknown shape {scene['shape']!r}")
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def describe_scene(scene, generator, templates=None):
    """Five different captions of a scene (list of 5 lower-case strings).

    Five distinct templates out of `templates` (default TEMPLATES, or ALTERNATE_TEMPLATES), each with synonyms drawn for the count,
    size and shape; every caption names the count, size, object colour, shape and
    background, in that order.
    """
    templates = TEMPLATES if templates is None else templates
    captions = []
    for template_index in generator.permutation(len(templates))[:CAPTIONS_PER_IMAGE]:
        count = scene["count"]
        singular, plural = SHAPE_NOUNS[scene["shape"]][generator.integers(len(SHAPE_NOUNS[scene["shape"]]))]
        count_words = COUNT_WORDS[count][generator.integers(len(COUNT_WORDS[count]))]
        words = {
            "count": count_words,
            "size": SIZE_WORDS[scene["size"]][generator.integers(len(SIZE_WORDS[scene["size"]]))],
            "color": scene["color"],
            "shapes": singular if count == 1 else plural,
            "background": scene["background"],
            # "there is a pair of ..." but "there are two ..."
            "is_are": "is" if count == 1 or count_words.startswith("a ") else "are",
        }
        captions.append(" ".join(templates[template_index].format(**words).split()))
    return captions


def _jitter(rgb, generator):
    offsets = generator.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    return [int(value) for value in np.clip(np.asarray(rgb) + offsets, 0, 255)]


def _write_jpeg(image, path):
    # Fixed quality and subsampling, no optimize pass and no metadata: identical bytes
    # for identical pixels with one libjpeg. No per-image atomic rename: DEMO.json is
    # written last, and without it the folder never passes for a finished dataset.
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    path.write_bytes(buffer.getvalue())


def _marker_matches(marker, seed, num_images):
    return (
        marker.get("generator_version") == GENERATOR_VERSION
        and marker.get("seed") == seed
        and marker.get("num_images") == num_images
        and marker.get("image_size") == IMAGE_SIZE
    )


def _files_present(dest_dir, marker):
    if not (dest_dir / CAPTIONS_FILE).is_file():
        return False
    return all((dest_dir / IMAGE_DIR / scene["image"]).is_file() for scene in marker["scenes"])
