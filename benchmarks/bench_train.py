"""Training throughput: this design vs the per-prefix "merge model" of the popular tutorials.

    python -m benchmarks.bench_train [--json FILE] [--quick]

Both train on one Flickr8k-sized synthetic cache (`workloads.flickr8k_sized_cache`: 6,000
random 2048-d vectors, 30,000 captions of ~12 words drawn Zipf-like from a ~3,000-word
vocabulary) with the same embedding and LSTM sizes:

* **teacher forcing** (ours): one sample per caption, the real tf.data pipeline of
  `pipeline.training.inputs.make_training_dataset` and the model of `models.decoder.build_decoder`,
  a masked loss over every position, batches padded to their own longest caption.
* **merge model** (tutorials): a Python generator yields one sample per word position,
  (image vector, caption prefix pre-padded to the longest caption) -> next word; the model
  adds Dense(image) and LSTM(prefix) and predicts one word per sample with a softmax.

Throughput is captions per second of training (a caption counts once all its words have
been trained on). The first batches (tracing, warm-up) are not timed. `--quick` times a
fixed number of batches of each and extrapolates to an epoch; the output says so.
"""

import argparse
import os
import sys
import time

import numpy as np

from benchmarks import workloads
from pipeline.core import io_utils

NUM_IMAGES = workloads.FLICKR8K_SPLITS["train"]
NUM_CAPTIONS = NUM_IMAGES * workloads.CAPTIONS_PER_IMAGE
VOCAB_SIZE = workloads.VOCABULARY_WORDS
FEATURE_DIM = workloads.FEATURE_DIM
WARMUP_BATCHES = 3


def _timed_fit(model, dataset, batches, captions_per_batch):
    """`model.fit` over `batches` batches after a warm-up fit (tracing); returns (seconds, captions).

    Both designs are timed the same way, through `fit`, as a user trains them.
    """
    model.fit(dataset, steps_per_epoch=WARMUP_BATCHES, epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(dataset, steps_per_epoch=batches, epochs=1, verbose=0)
    return time.perf_counter() - started, batches * captions_per_batch


def bench_teacher_forcing(features, rows, token_rows, args):
    from pipeline.core import config as config_module
    from pipeline.training import inputs, objective

    split = inputs.CaptionSplit(rows, token_rows, images=NUM_IMAGES)
    dataset = inputs.make_training_dataset(
        split, inputs.InMemoryFeatures(features), args.batch_size, shuffle_seed=0,
        sort_window_batches=args.sort_window_batches,
    )
    config = config_module.PipelineConfig()
    config.decoder = config_module.DecoderConfig(embedding_dim=args.embedding_dim, units=args.units, dropout=0.5)
    model = objective.build_model(config, VOCAB_SIZE, FEATURE_DIM, steps_per_execution=args.steps_per_execution)
    epoch_batches = -(-NUM_CAPTIONS // args.batch_size)
    batches = min(args.quick_batches, epoch_batches) if args.quick else epoch_batches
    seconds, captions = _timed_fit(model, dataset, batches, NUM_CAPTIONS / epoch_batches)
    return {"batches_timed": batches, "epoch_batches": epoch_batches, "seconds": seconds,
            "captions_per_second": captions / seconds}


def build_merge_model(max_length, embedding_dim, units):
    """The tutorials' merge model: add(Dense(image), LSTM(prefix)) -> Dense -> softmax over the next word."""
    import keras

    image = keras.Input(shape=(FEATURE_DIM,), name="image_features")
    prefix = keras.Input(shape=(max_length,), dtype="int32", name="prefix")
    image_branch = keras.layers.Dense(units, activation="relu")(keras.layers.Dropout(0.5)(image))
    text_branch = keras.layers.Embedding(VOCAB_SIZE, embedding_dim, mask_zero=True)(prefix)
    text_branch = keras.layers.LSTM(units)(keras.layers.Dropout(0.5)(text_branch))
    merged = keras.layers.Dense(units, activation="relu")(keras.layers.add([image_branch, text_branch]))
    outputs = keras.layers.Dense(VOCAB_SIZE, activation="softmax")(merged)
    model = keras.Model([image, prefix], outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    return model


def bench_merge_model(features, rows, token_rows, args):
    import tensorflow as tf

    max_length = max(len(tokens) for tokens in token_rows) - 1
    samples_per_caption = np.mean([len(tokens) - 1 for tokens in token_rows])

    def samples():
        # The tutorials' generator: per caption, every prefix -> next word, one at a time,
        # the image vector copied into each sample.
        image_batch, prefix_batch, word_batch = [], [], []
        for row, tokens in zip(rows, token_rows):
            for position in range(1, len(tokens)):
                padded = np.zeros(max_length, dtype=np.int32)
                padded[max_length - position:] = tokens[:position]  # pre-padding, as keras' pad_sequences
                image_batch.append(features[row])
                prefix_batch.append(padded)
                word_batch.append(tokens[position])
                if len(word_batch) == args.merge_batch_size:
                    yield (np.stack(image_batch), np.stack(prefix_batch)), np.asarray(word_batch, np.int32)
                    image_batch, prefix_batch, word_batch = [], [], []

    def repeated():
        while True:
            yield from samples()

    signature = (
        (tf.TensorSpec((None, FEATURE_DIM), tf.float32), tf.TensorSpec((None, max_length), tf.int32)),
        tf.TensorSpec((None,), tf.int32),
    )
    dataset = tf.data.Dataset.from_generator(repeated, output_signature=signature).prefetch(2)
    model = build_merge_model(max_length, args.embedding_dim, args.units)
    total_samples = sum(len(tokens) - 1 for tokens in token_rows)
    epoch_batches = -(-total_samples // args.merge_batch_size)
    batches = min(args.quick_batches, epoch_batches) if args.quick else epoch_batches
    seconds, captions = _timed_fit(model, dataset, batches, args.merge_batch_size / samples_per_caption)
    return {"batches_timed": batches, "epoch_batches": epoch_batches, "seconds": seconds,
            "captions_per_second": captions / seconds, "samples_per_caption": float(samples_per_caption),
            "max_prefix_length": max_length}


def _parser():
    from pipeline.core.config import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--quick", action="store_true", help="time a fixed number of batches and extrapolate")
    parser.add_argument("--quick-batches", type=int, default=40)
    # The pipeline's own default (config.TrainConfig.batch_size): what `train` really runs.
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size,
                        help="captions per batch (teacher forcing)")
    parser.add_argument("--sort-window-batches", type=int, default=None,
                        help="length-sorting window of the training batches (default: inputs.SORT_WINDOW_BATCHES)")
    parser.add_argument("--steps-per-execution", type=int, default=None,
                        help="training steps per tf.function call (default: objective.STEPS_PER_EXECUTION)")
    parser.add_argument("--merge-batch-size", type=int, default=64,
                        help="samples per batch of the merge model (the tutorials' one-photo batches hold ~60)")
    parser.add_argument("--embedding-dim", type=int, default=256)
    parser.add_argument("--units", type=int, default=512)
    return parser


def run(quick, args=None):
    """Runs both benchmarks; returns a dict with `train_captions_per_s`,
    `train_prefix_baseline_captions_per_s`, `train_speedup` and the details of each design.

    quick: time `--quick-batches` batches of each (after warm-up) instead of a full epoch.
    args: an argparse.Namespace of this module's options (see `--help`); None takes the defaults.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline.training import inputs, objective

    args = argparse.Namespace(**vars(args if args is not None else _parser().parse_args([])))
    args.quick = bool(quick)
    if args.sort_window_batches is None:
        args.sort_window_batches = inputs.SORT_WINDOW_BATCHES
    if args.steps_per_execution is None:
        args.steps_per_execution = objective.STEPS_PER_EXECUTION
    import keras

    keras.utils.set_random_seed(0)
    features, rows, token_rows = workloads.flickr8k_sized_cache()
    print(f"cache: {NUM_IMAGES} vectors x {FEATURE_DIM}, {NUM_CAPTIONS} captions, "
          f"{np.mean([len(tokens) - 2 for tokens in token_rows]):.1f} words on average, vocabulary {VOCAB_SIZE}; "
          f"embedding {args.embedding_dim}, units {args.units}; batches: teacher forcing {args.batch_size} captions "
          f"(sort window {args.sort_window_batches}, steps/execution {args.steps_per_execution}), "
          f"merge model {args.merge_batch_size} samples", file=sys.stderr)
    mode = (f"quick: {args.quick_batches} timed batches each (after {WARMUP_BATCHES} warm-up), "
            "epoch time extrapolated" if args.quick else "full epoch each")
    print(f"mode: {mode}", file=sys.stderr)

    results = {"mode": "quick" if args.quick else "full", "settings": vars(args).copy()}
    for name, bench in (("teacher_forcing", bench_teacher_forcing), ("merge_model", bench_merge_model)):
        result = bench(features, rows, token_rows, args)
        result["epoch_seconds"] = NUM_CAPTIONS / result["captions_per_second"]
        results[name] = result
        print(f"{name}: {result['captions_per_second']:.0f} captions/s "
              f"({result['batches_timed']} batches in {result['seconds']:.1f} s; one epoch "
              f"{'~' if args.quick else ''}{result['epoch_seconds']:.0f} s)", file=sys.stderr)
    ratio = results["teacher_forcing"]["captions_per_second"] / results["merge_model"]["captions_per_second"]
    results["ratio"] = ratio
    results["train_captions_per_s"] = results["teacher_forcing"]["captions_per_second"]
    results["train_prefix_baseline_captions_per_s"] = results["merge_model"]["captions_per_second"]
    results["train_speedup"] = ratio
    print(f"ratio teacher forcing / merge model: {ratio:.1f}x (target >= 10x)", file=sys.stderr)
    return results


def main(argv=None):
    args = _parser().parse_args(argv)
    results = run(args.quick, args)
    if args.json:
        io_utils.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
