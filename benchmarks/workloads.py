"""What the benchmarks work on: synthetic captions and features, synthetic and trained run
folders, and the weights of a run's decoder.

Synthetic captions have Flickr8k's shape: five an image, ~12 words each, words drawn with
Zipf-like frequencies (the k-th most common with probability proportional to 1/k) as in
real captions; `zipf_word_ids` draws other corpora's words too (another exponent, lengths
and vocabulary). Synthetic features are non-negative like pooled ReLU activations. Nothing is
downloaded: trained runs use the generated demo scenes and a random encoder.
"""

from pathlib import Path

import numpy as np

FEATURE_DIM = 2048
# Flickr8k's sizes: its standard split, five captions an image, a ~3,000-word vocabulary.
FLICKR8K_SPLITS = {"train": 6000, "val": 1000, "test": 1000}
CAPTIONS_PER_IMAGE = 5
VOCABULARY_WORDS = 3000
MEAN_CAPTION_WORDS = 12
CAPTION_WORDS_SPREAD = 3.5
SHORTEST_CAPTION, LONGEST_CAPTION = 5, 30
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def word(index):
    """A distinct lower-case word of letters only (str) for each index >= 0: captions are
    split on everything but letters (`text.normalize_caption`), so "w12" would read as "w"."""
    letters = []
    index += 26 * 26  # three letters at least
    while index:
        index, remainder = divmod(index, 26)
        letters.append(LETTERS[remainder])
    return "".join(reversed(letters))


def caption_lengths(generator, count):
    """Words in each of `count` captions (int64 [count]): normal around MEAN_CAPTION_WORDS,
    rounded and clipped to SHORTEST..LONGEST_CAPTION. `generator`: a numpy Generator."""
    lengths = np.rint(generator.normal(MEAN_CAPTION_WORDS, CAPTION_WORDS_SPREAD, size=count))
    return np.clip(lengths, SHORTEST_CAPTION, LONGEST_CAPTION).astype(np.int64)


def zipf_word_ids(generator, lengths, vocabulary_words, exponent=1.0):
    """The words of captions of `lengths` (int [C]) words, one after the other: int32
    [sum(lengths)] in 0..vocabulary_words-1, index k drawn with probability proportional to
    (k + 1) ** -exponent (Zipf's law; 1.0 fits Flickr8k's captions). Split them per caption
    with `np.split(ids, np.cumsum(lengths)[:-1])`. Drawn in one vectorised pass, so a
    COCO-sized corpus (600,000 captions) takes a second."""
    probabilities = np.arange(1, vocabulary_words + 1, dtype=np.float64) ** -exponent
    cumulative = np.cumsum(probabilities / probabilities.sum())
    ids = np.searchsorted(cumulative, generator.random(int(np.sum(lengths))), side="right")
    return np.minimum(ids, vocabulary_words - 1).astype(np.int32)  # a draw past the rounded last sum


def synthetic_captions(num_images, captions_per_image=CAPTIONS_PER_IMAGE, vocabulary_words=VOCABULARY_WORDS, seed=0):
    """list of `num_images` lists of `captions_per_image` caption strings: `zipf_word_ids`
    of `caption_lengths`, as `word`s."""
    generator = np.random.default_rng(seed)
    lengths = caption_lengths(generator, num_images * captions_per_image)
    words = np.asarray([word(index) for index in range(vocabulary_words)], dtype=object)
    per_caption = np.split(words[zipf_word_ids(generator, lengths, vocabulary_words)], np.cumsum(lengths)[:-1])
    captions = [" ".join(caption_words) for caption_words in per_caption]
    return [captions[start:start + captions_per_image] for start in range(0, len(captions), captions_per_image)]


def synthetic_features(generator, rows):
    """float32 [rows, FEATURE_DIM], |standard normal|: non-negative like pooled ReLU activations."""
    return np.abs(generator.standard_normal((rows, FEATURE_DIM), dtype=np.float32))


def flickr8k_sized_cache(seed=0):
    """The training data of Flickr8k's train split, in memory, tokenized:
    (features float32 [6000, 2048], rows int32 [30000] (each caption's feature row),
    list of 30,000 int32 token rows `<start> words <end>` over a VOCABULARY_WORDS vocabulary
    whose first ids are the special tokens)."""
    from pipeline.data import text

    generator = np.random.default_rng(seed)
    num_images = FLICKR8K_SPLITS["train"]
    features = synthetic_features(generator, num_images)
    rows = np.repeat(np.arange(num_images, dtype=np.int32), CAPTIONS_PER_IMAGE)
    first_word = len(text.SPECIAL_TOKENS)
    lengths = caption_lengths(generator, len(rows))
    word_ids = first_word + zipf_word_ids(generator, lengths, VOCABULARY_WORDS - first_word)
    token_rows = [np.concatenate([[text.START_ID], ids, [text.END_ID]]).astype(np.int32)
                  for ids in np.split(word_ids, np.cumsum(lengths)[:-1])]
    return features, rows, token_rows


WRITE_CHUNK_ROWS = 8192


def write_run_folder(out_dir, captions_by_split, num_vectors=None, feature_dtype="float32", seed=0):
    """Writes OUT as `extract` leaves it (config.json, captions.json, vocab.json, features.h5,
    an empty extract_errors.json) with synthetic features, through the pipeline's own writers;
    returns OUT (Path).

    captions_by_split: {split: list of caption-string lists, one an image}, e.g.
        {"train": synthetic_captions(6000), "val": ...}; images are numbered across splits
        in that order.
    num_vectors: rows of features.h5 (default: one per captioned image). With more rows,
        the captioned images are rows 0, k, 2k, ... (k = num_vectors // captioned images)
        and the others are cached images captions.json does not mention, as when one cache
        serves several caption sets. Written in chunks, so the cache can exceed memory.
    feature_dtype: "float32" or "float16", the cache's storage dtype.
    """
    from pipeline.core import config as config_module
    from pipeline.core import io_utils
    from pipeline.data import datasets, feature_writer, features, run_folder, text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config_module.PipelineConfig()
    config.encoder.weights = "random"
    config.encoder.feature_dtype = feature_dtype
    config.text.min_word_count = 1
    config.data.layout = "kaggle"
    config.data.image_dir = str(out_dir / "images")
    splits = [split for split, images in captions_by_split.items() for _ in images]
    captions = [image_captions for images in captions_by_split.values() for image_captions in images]
    num_vectors = num_vectors or len(captions)
    stride = num_vectors // len(captions)
    image_ids = [f"{row:07d}.jpg" for row in range(num_vectors)]
    generator = np.random.default_rng(seed)
    with feature_writer.FeatureWriter.create(features.features_path(out_dir),
                                             features.expected_attrs(config.encoder)) as writer:
        for start in range(0, num_vectors, WRITE_CHUNK_ROWS):
            stop = min(start + WRITE_CHUNK_ROWS, num_vectors)
            writer.append(image_ids[start:stop], synthetic_features(generator, stop - start))
    records = [datasets.ImageRecord(image_ids[index * stride], split, image_captions)
               for index, (split, image_captions) in enumerate(zip(splits, captions))]
    dataset = datasets.Dataset(layout="kaggle", image_dir=out_dir / "images", images=records, missing=[],
                               name="synthetic", split_source="synthetic")
    datasets.write_captions_json(out_dir, dataset)
    text.Vocabulary.from_dataset(dataset, min_count=1).save(out_dir / text.VOCAB_FILE)
    io_utils.write_json(out_dir / run_folder.EXTRACT_ERRORS_FILE, [])
    config.save(out_dir)
    return out_dir


def trained_demo_run(folder, num_images, export_beam_size=None):
    """OUT of a small demo run in `folder`/trained (Path): `num_images` generated scenes,
    extracted with a random encoder and trained with the demo's settings (`pipeline.demo`),
    so its captions earn CIDEr-D and end with `<end>` as a trained model's do; exported
    with beam `export_beam_size` unless None."""
    from pipeline import demo, export, extract, train
    from pipeline.data import demo_data

    print(f"making a small trained demo run in {folder} ({num_images} scenes)", flush=True)
    data_dir = demo_data.generate_demo_dataset(Path(folder) / "data", seed=demo.DEMO_SEED, num_images=num_images)
    out = Path(folder) / "trained"
    extract.run_extract(data_dir, out, dict(demo.DEMO_EXTRACT_OVERRIDES))
    train.run_train(out, dict(demo.DEMO_TRAIN_OVERRIDES))
    if export_beam_size is not None:
        export.run_export(out, {"decode.beam_size": export_beam_size})
    return out


def run_images(out_dir, count):
    """The encoded files (list of `count` bytes) of the first images of OUT's dataset."""
    from pipeline.data import run_folder

    dataset = run_folder.read_captions(out_dir)
    return [(dataset.image_dir / record.image_id).read_bytes() for record in dataset.images[:count]]


def saved_model_and_images(out_dir, folder, count=8):
    """(saved_model_dir Path, `count` encoded images list[bytes]) to serve: OUT's SavedModel
    and `run_images` when OUT (a trained, exported run) has one, else
    `bench_serving.synthetic_export`'s, saved into `folder`."""
    from pipeline.data import run_folder

    if out_dir is not None and (Path(out_dir) / run_folder.SAVED_MODEL_DIR / "saved_model.pb").is_file():
        return Path(out_dir) / run_folder.SAVED_MODEL_DIR, run_images(out_dir, count)
    from benchmarks import bench_serving

    model_dir, images, *_ = bench_serving.synthetic_export(folder)
    return model_dir, images[:count]


def decoder_weights(out_dir, decoder_file=None):
    """The weights (list of numpy arrays) of OUT's decoder: `decoder_file` (default
    decoder.keras; decoder_xe.keras is the other), read by `run_folder.load_decoder`."""
    from pipeline.data import run_folder

    model = run_folder.load_decoder(out_dir, decoder_file or run_folder.DECODER_FILE)
    return [np.asarray(weight) for weight in model.get_weights()]


def largest_difference(weights, other_weights):
    """The largest absolute difference (float) between two lists of weight arrays of the same shapes."""
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(weights, other_weights, strict=True))
