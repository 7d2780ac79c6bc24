"""The generated demo dataset: determinism, Kaggle layout, captions that match the pixels."""

import csv
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.core import config, errors
from pipeline.data import datasets, demo_data

NUM_IMAGES = 24
# Baseline JPEG at quality 92 without chroma subsampling keeps flat areas within a few
# levels; the margin also covers the small ringing near edges.
JPEG_TOLERANCE = 10


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return demo_data.generate_demo_dataset(tmp_path_factory.mktemp("generated") / "data", seed=0,
                                           num_images=NUM_IMAGES)


def _file_bytes(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _caption_rows(folder):
    with open(folder / demo_data.CAPTIONS_FILE, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def _words(caption):
    return caption.split()


def _contains_phrase(caption, phrase):
    return re.search(rf"\b{re.escape(phrase)}\b", caption) is not None


def test_same_seed_gives_identical_files_and_another_seed_differs(generated, tmp_path):
    again = demo_data.generate_demo_dataset(tmp_path / "again", seed=0, num_images=NUM_IMAGES)
    other = demo_data.generate_demo_dataset(tmp_path / "other", seed=1, num_images=NUM_IMAGES)

    first_files, again_files, other_files = _file_bytes(generated), _file_bytes(again), _file_bytes(other)
    assert first_files == again_files
    assert set(other_files) == set(first_files)  # same names, different content
    assert other_files["captions.txt"] != first_files["captions.txt"]
    differing_images = [name for name in first_files
                        if name.startswith("Images/") and first_files[name] != other_files[name]]
    assert len(differing_images) >= NUM_IMAGES - 2


def test_kaggle_layout_with_five_captions_per_image(generated):
    image_files = sorted(path.name for path in (generated / "Images").iterdir())
    assert image_files == [f"demo_{index:04d}.jpg" for index in range(NUM_IMAGES)]

    rows = _caption_rows(generated)
    assert rows[0] == ["image", "caption"]
    assert len(rows) == 1 + 5 * NUM_IMAGES
    captions_per_image = {}
    for image, caption in rows[1:]:
        captions_per_image.setdefault(image, []).append(caption)
    assert sorted(captions_per_image) == image_files
    for image, captions in captions_per_image.items():
        assert len(captions) == 5
        assert len(set(captions)) == 5, f"{image}: repeated caption in {captions}"
        for caption in captions:
            assert caption == caption.strip().lower() and "  " not in caption

    marker = demo_data.read_demo_metadata(generated)
    assert (marker["seed"], marker["num_images"], marker["generator_version"]) == (
        0, NUM_IMAGES, demo_data.GENERATOR_VERSION)
    assert [scene["captions"] for scene in marker["scenes"]] == [
        captions_per_image[scene["image"]] for scene in marker["scenes"]]

    with Image.open(generated / "Images" / "demo_0000.jpg") as image:
        assert image.format == "JPEG"
        assert image.mode == "RGB"
        assert image.size == (demo_data.IMAGE_SIZE, demo_data.IMAGE_SIZE)


def test_every_caption_names_what_is_drawn(generated):
    scenes = demo_data.read_demo_metadata(generated)["scenes"]
    all_nouns = {shape: {noun for pair in pairs for noun in pair} for shape, pairs in demo_data.SHAPE_NOUNS.items()}
    for scene in scenes:
        for caption in scene["captions"]:
            words = _words(caption)
            where = f"{scene['image']}: {caption!r}"
            # The object colour and the background are both named, and no other colour is.
            assert scene["color"] in words and scene["background"] in words, where
            assert set(words) & set(demo_data.COLORS) == {scene["color"], scene["background"]}, where
            singular, plural = zip(*demo_data.SHAPE_NOUNS[scene["shape"]])
            nouns = plural if scene["count"] > 1 else singular
            assert any(_contains_phrase(caption, noun) for noun in nouns), where
            for other_shape, other_nouns in all_nouns.items():
                if other_shape != scene["shape"]:
                    assert not any(_contains_phrase(caption, noun) for noun in other_nouns), where
            count_phrases = demo_data.COUNT_WORDS[scene["count"]]
            assert any(_contains_phrase(caption, phrase) for phrase in count_phrases), where
            other_sizes = {word for size, words_of in demo_data.SIZE_WORDS.items()
                           if size != scene["size"] for word in words_of}
            assert not set(words) & other_sizes, where


def _first_index(words, candidates):
    """Index of the first word of the first of `candidates` (phrases) found in `words`, or None."""
    for index in range(len(words)):
        for phrase in candidates:
            if words[index:index + len(phrase.split())] == phrase.split():
                return index
    return None


def test_every_caption_names_the_attributes_in_one_order(generated):
    # count, size, object colour, shape, background: the order the decoder learns to follow.
    scenes = demo_data.read_demo_metadata(generated)["scenes"]
    for scene in scenes:
        singular, plural = zip(*demo_data.SHAPE_NOUNS[scene["shape"]])
        for caption in scene["captions"]:
            words = _words(caption)
            positions = [
                _first_index(words, demo_data.COUNT_WORDS[scene["count"]]),
                _first_index(words, demo_data.SIZE_WORDS[scene["size"]]),
                words.index(scene["color"]),
                _first_index(words, plural if scene["count"] > 1 else singular),
                len(words) - 1 - words[::-1].index(scene["background"]),
            ]
            assert None not in positions and positions == sorted(set(positions)), f"{caption!r}: {positions}"


def test_the_wording_does_not_change_the_pictures(tmp_path, monkeypatch):
    # Scenes and captions draw from separate streams, so cached features of the images stay
    # valid when only the caption templates change.
    before = demo_data.generate_demo_dataset(tmp_path / "before", seed=5, num_images=6)
    monkeypatch.setattr(demo_data, "TEMPLATES", ("{count} {size} {color} {shapes} on {background}",) * 5)
    after = demo_data.generate_demo_dataset(tmp_path / "after", seed=5, num_images=6)
    before_files, after_files = _file_bytes(before), _file_bytes(after)
    images = [name for name in before_files if name.startswith("Images/")]
    assert len(images) == 6
    assert all(before_files[name] == after_files[name] for name in images)
    assert before_files["captions.txt"] != after_files["captions.txt"]
    before_scenes = demo_data.read_demo_metadata(before)["scenes"]
    after_scenes = demo_data.read_demo_metadata(after)["scenes"]
    assert [{**scene, "captions": None} for scene in before_scenes] == [
        {**scene, "captions": None} for scene in after_scenes]


def test_attributes_vary_across_images(generated):
    scenes = demo_data.read_demo_metadata(generated)["scenes"]
    # A generator stuck on one value would still pass the per-image checks above.
    assert len({scene["background"] for scene in scenes}) >= 4
    assert len({scene["color"] for scene in scenes}) >= 4
    assert {scene["shape"] for scene in scenes} == set(demo_data.SHAPES)
    assert {scene["count"] for scene in scenes} == set(demo_data.COUNTS)
    assert {scene["size"] for scene in scenes} == set(demo_data.SIZES)
    assert all(scene["background"] != scene["color"] for scene in scenes)


def test_pixels_hold_the_named_colours(generated):
    scenes = demo_data.read_demo_metadata(generated)["scenes"]
    coordinates = np.arange(4, demo_data.IMAGE_SIZE, 12)
    grid_x, grid_y = np.meshgrid(coordinates, coordinates)
    for scene in scenes:
        with Image.open(generated / "Images" / scene["image"]) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
        objects = np.asarray(scene["objects"])
        assert objects.shape == (scene["count"], 3)
        # Background: grid points clear of every object's bounding box by more than an 8x8
        # JPEG block, where the ringing of the edges ends.
        distance = np.maximum(np.abs(grid_x[..., None] - objects[:, 0]), np.abs(grid_y[..., None] - objects[:, 1]))
        clear = np.all(distance > objects[:, 2] + 10, axis=-1)
        background = pixels[grid_y[clear], grid_x[clear]]
        assert len(background) > 50
        assert np.abs(background - scene["background_rgb"]).max() <= JPEG_TOLERANCE, scene["image"]
        named = np.asarray(demo_data.COLORS[scene["background"]])
        assert np.abs(np.median(background, axis=0) - named).max() <= demo_data.COLOR_JITTER + JPEG_TOLERANCE
        # Objects: the centre of every shape (inside circle, square and triangle alike); a
        # median, since a small triangle's edges ring into the patch around its centre.
        for x_center, y_center, radius in scene["objects"]:
            patch = pixels[y_center - 2:y_center + 3, x_center - 2:x_center + 3].reshape(-1, 3)
            assert np.abs(np.median(patch, axis=0) - scene["color_rgb"]).max() <= JPEG_TOLERANCE, scene["image"]
            assert 0 <= x_center - radius and x_center + radius < demo_data.IMAGE_SIZE


def test_large_objects_cover_more_pixels_than_small_ones(generated):
    scenes = demo_data.read_demo_metadata(generated)["scenes"]
    coverage = {"small": [], "large": []}
    for scene in scenes:
        with Image.open(generated / "Images" / scene["image"]) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
        is_object = np.abs(pixels - scene["color_rgb"]).max(axis=-1) <= 3 * JPEG_TOLERANCE
        coverage[scene["size"]].append(is_object.mean() / scene["count"])
    assert min(coverage["large"]) > 2 * max(coverage["small"])


def test_existing_dataset_is_reused_and_a_new_count_replaces_it(tmp_path):
    folder = demo_data.generate_demo_dataset(tmp_path / "data", seed=3, num_images=6)
    assert demo_data.dataset_is_current(folder, seed=3, num_images=6)
    assert not demo_data.dataset_is_current(folder, seed=4, num_images=6)
    first_image = folder / "Images" / "demo_0000.jpg"
    first_image.write_bytes(b"left alone when the marker matches")
    demo_data.generate_demo_dataset(folder, seed=3, num_images=6)
    assert first_image.read_bytes() == b"left alone when the marker matches"

    (folder / "Images" / "demo_0005.jpg").unlink()  # incomplete: generated again
    assert not demo_data.dataset_is_current(folder, seed=3, num_images=6)
    demo_data.generate_demo_dataset(folder, seed=3, num_images=6)
    assert (folder / "Images" / "demo_0005.jpg").is_file()

    demo_data.generate_demo_dataset(folder, seed=3, num_images=4)
    assert sorted(path.name for path in (folder / "Images").iterdir()) == [
        f"demo_{index:04d}.jpg" for index in range(4)]
    assert len(_caption_rows(folder)) == 1 + 5 * 4
    assert demo_data.read_demo_metadata(folder)["num_images"] == 4
    with Image.open(first_image) as image:  # rewritten, since the count changed
        assert image.size == (demo_data.IMAGE_SIZE, demo_data.IMAGE_SIZE)


def test_refuses_a_folder_holding_another_dataset(tmp_path):
    (tmp_path / "captions.txt").write_text("image,caption\nphoto.jpg,a dog runs\n", encoding="utf-8")
    with pytest.raises(errors.PipelineError, match=r"captions\.txt: this folder holds a dataset"):
        demo_data.generate_demo_dataset(tmp_path, seed=0, num_images=2)
    assert (tmp_path / "captions.txt").read_text(encoding="utf-8").endswith("a dog runs\n")


@pytest.mark.parametrize("num_images", [0, -3, 2.5, True])
def test_rejects_a_bad_image_count(tmp_path, num_images):
    with pytest.raises(errors.PipelineError, match="num_images must be a positive integer"):
        demo_data.generate_demo_dataset(tmp_path, seed=0, num_images=num_images)


def test_damaged_marker_is_named(tmp_path):
    (tmp_path / demo_data.MARKER_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(errors.ArtifactError, match=r"DEMO\.json: the demo dataset's description is not valid JSON"):
        demo_data.read_demo_metadata(tmp_path)
    assert not demo_data.dataset_is_current(tmp_path, seed=0, num_images=2)


def test_load_dataset_reads_every_image_and_caption(demo_data_dir):
    dataset = datasets.load_dataset(demo_data_dir, config.DataConfig())
    scenes = demo_data.read_demo_metadata(demo_data_dir)["scenes"]

    assert dataset.layout == "kaggle"
    assert dataset.missing == []
    assert dataset.image_dir == (demo_data_dir / "Images").resolve()
    assert {record.image_id: record.captions for record in dataset.images} == {
        scene["image"]: scene["captions"] for scene in scenes}
    splits = [record.split for record in dataset.images]
    eighth = len(scenes) // 8
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (
        len(scenes) - 2 * eighth, eighth, eighth)


def test_demo_settings_are_valid_config_overrides():
    from pipeline import demo

    settings = config.PipelineConfig().replace(
        {**demo.DEMO_EXTRACT_OVERRIDES, **demo.DEMO_TRAIN_OVERRIDES, **demo.DEMO_FINETUNE_OVERRIDES,
         **demo.DEMO_DECODE_OVERRIDES})
    assert settings.encoder.weights == "random"  # the demo must never try to download
    assert settings.text.min_word_count == 1
    assert settings.decoder.units == demo.DEMO_TRAIN_OVERRIDES["decoder.units"]
    assert demo.DEMO_NUM_IMAGES == demo_data.DEFAULT_NUM_IMAGES


def test_alternate_frames_word_the_same_pictures_differently(tmp_path):
    default = demo_data.generate_demo_dataset(tmp_path / "default", seed=3, num_images=4)
    alternate = demo_data.generate_demo_dataset(tmp_path / "alternate", seed=3, num_images=4, frames="alternate")
    for name in ("demo_0000.jpg", "demo_0003.jpg"):
        assert (default / "Images" / name).read_bytes() == (alternate / "Images" / name).read_bytes()
    default_scenes = demo_data.read_demo_metadata(default)["scenes"]
    alternate_scenes = demo_data.read_demo_metadata(alternate)["scenes"]
    for first, second in zip(default_scenes, alternate_scenes):
        assert not set(first["captions"]) & set(second["captions"])
        assert all(second["color"] in caption and second["background"] in caption for caption in second["captions"])
    assert not demo_data.dataset_is_current(alternate, seed=3, num_images=4)  # the default frames are another dataset
    assert demo_data.dataset_is_current(alternate, seed=3, num_images=4, frames="alternate")
    with pytest.raises(errors.PipelineError, match="frames must be one of"):
        demo_data.generate_demo_dataset(tmp_path / "bad", frames="odd")
