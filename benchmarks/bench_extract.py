"""Extraction throughput against its bound, plain Keras, the CPU's GEMM rate and the tutorials' loop.

    python -m benchmarks.bench_extract [--quick] [--images 192] [--batch-size 32] [--json FILE]

Measured in one process on the same generated JPEGs (camera-like 500x375), rounds
interleaved so that load from other jobs hits every path alike:
  bound    the bare encoder (`extract.encode_function`) on one in-memory float32 batch,
           batch after batch, as many images as extract encodes;
  extract  the real `extract_to_cache` from JPEG files into a fresh HDF5 cache (the whole
           call: fingerprint, file creation, tf.data start-up, decode, encode, writes),
           with the folded encoder `build_encoder` makes;
  keras    what a user would write: the plain Keras ResNet50 (its BatchNormalization
           layers kept), `model.predict` over the same `tf.data` decoding (`extract.image_dataset`);
  gemm     the CPU's matrix-multiply rate: `tf.matmul` of two 4096 x 4096 matrices, over
           ResNet50's FLOPs per image (2 x the multiply-adds of its 53 convolutions at
           224 px, 7.7 GFLOP; bias, ReLU, additions and pooling left out), as images/s;
  naive    PIL opens one image, `model.predict` encodes it, one at a time.
Each path runs at fp32 and bf16 (Keras mixed_bfloat16; `tf.matmul` of bfloat16
matrices), the naive loop at fp32 only. The weights are seeded random ones whose
BatchNormalization statistics are random too (`encoder.randomize_batch_normalization`),
so folding them is not the identity; the folded encoders are folded from these plain ones.
Like with like: bound, extract and keras exclude the encoder build and the first trace
and run of its function (a warm-up pays them once; a real run pays them once per
process, seconds against hours). A round runs every path back to back, and the next
round the same backwards, so a drift in the machine's speed favours no path; ratios are
taken within each round and the median round is reported, with every round's ratios and
the CPU share (cores busy) of every path, which shows when another job took a core; the
same ratios per CPU-second of this process (`cpu_time_*`) are reported too.

Also measured: the CPU time extraction's input pipeline takes per image (read, decode,
EXIF orientation, antialiased resize, on tf.data's threads as in `extract`) against the
bare encoder's (the ceiling of extract/bound on a machine whose cores the encoder
already fills), and the features:
cosine similarity of extract's folded fp32 and bf16 features to plain Keras fp32's.
Random weights: the arithmetic is that of ImageNet weights, and nothing is downloaded.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import timing
from pipeline.core import io_utils

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

IMAGE_SIZE = 224
FULL = {"images": 384, "batch_size": 32, "rounds": 7, "naive_images": 24}
GEMM_SIZE = 4096
GEMM_CALLS = 6  # per measurement: ~2 s of fp32 matrix products on 2 cores
# Rounds are many and short rather than few and long: on a shared machine another job
# can take a core for seconds, and the median of five paired rounds shrugs off one or two
# such rounds where the mean of two cannot. Every extraction is a whole call (it opens
# the tf.data pipeline, fingerprints the weights, creates the HDF5 file), so the fixed
# cost of a call, ~0.1 s here, counts against 6-10 s of work.
QUICK = {"images": 192, "batch_size": 32, "rounds": 5, "naive_images": 8}


def _make_images(folder, count, seed):
    """Writes `count` photo-like 500x375 JPEGs (`benchmarks.photos`) into `folder`; returns their names."""
    import numpy as np

    from benchmarks import photos

    rng = np.random.default_rng(seed)
    names = [f"image_{index:04d}.jpg" for index in range(count)]
    for name in names:
        (folder / name).write_bytes(photos.photo_jpeg(500, 375, rng))
    return names


def _decode_cpu_seconds_per_image(extract, image_dir, names, batch_size):
    """Process CPU seconds per image of extraction's own input pipeline without the encoder.

    Runs `extract.image_dataset` (read, decode_image, batch: the tf.data pipeline with one
    thread per image op, as extraction runs it, its start-up included) over `names`, and
    keeps the fastest of three passes: the CPU the decoding takes from the encoder.
    """
    passes = []
    for _ in range(3):
        started = time.process_time()
        for _ids, _images in extract.image_dataset(image_dir, names, IMAGE_SIZE, batch_size):
            pass
        passes.append((time.process_time() - started) / len(names))
    return min(passes)


def convolution_flops(encoder_model):
    """2 x the multiply-adds of every Conv2D of an encoder, per image (int): ResNet50's FLOPs
    as GEMM counts them (7.7 G at 224 px); element-wise layers and pooling are not counted."""
    import keras

    total = 0
    for layer in encoder_model.get_layer("resnet50").layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, filters = layer.output.shape
            kernel_height, kernel_width, channels, _ = layer.kernel.shape
            total += 2 * height * width * filters * kernel_height * kernel_width * channels
    return total


def _gemm_function(dtype):
    """(tf.function computing GEMM_CALLS products of two GEMM_SIZE matrices, FLOPs of one call)."""
    import tensorflow as tf

    generator = tf.random.Generator.from_seed(0)
    left = tf.cast(generator.normal([GEMM_SIZE, GEMM_SIZE]), dtype)
    right = tf.cast(generator.normal([GEMM_SIZE, GEMM_SIZE]), dtype)

    @tf.function
    def products():
        total = tf.zeros([], tf.float32)
        for _ in range(GEMM_CALLS):
            # Reduced to a scalar each time, so no product can be skipped or fused away.
            total += tf.cast(tf.reduce_sum(tf.matmul(left, right + tf.cast(total, dtype))[:1, :1]), tf.float32)
        return total

    return products, GEMM_CALLS * 2 * GEMM_SIZE**3


def _cosine(first, second):
    import numpy as np

    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    return (first * second).sum(axis=1) / np.maximum(norms, 1e-30)


def run(quick=False, images=None, batch_size=None, rounds=None, naive_images=None):
    """Runs the benchmark; returns a flat dict of figures (rates in images/s, ratios).

    Keys include extract_images_per_s, extract_bound_images_per_s, extract_keras_images_per_s,
    extract_gemm_limit_images_per_s, extract_naive_images_per_s, extract_vs_bound,
    extract_vs_keras, extract_vs_gemm_limit, extract_vs_naive, extract_bf16_speedup (bf16
    extract over fp32 extract), extract_bf16_vs_keras_fp32, extract_bf16_vs_gemm_limit,
    extract_folded_cosine (min over images, folded fp32 against plain Keras fp32) and
    extract_bf16_cosine (mean over images, bf16 against fp32 extract).
    """
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from models import encoder, image_decoding
    from pipeline import extract
    from pipeline.core import config, device
    from pipeline.data import features

    settings = dict(QUICK if quick else FULL)
    for name, value in (("images", images), ("batch_size", batch_size), ("rounds", rounds),
                        ("naive_images", naive_images)):
        if value is not None:
            settings[name] = value
    count, batch = settings["images"], settings["batch_size"]
    precisions = ("fp32", "bf16")

    with tempfile.TemporaryDirectory(prefix="bench_extract_") as work:
        work = Path(work)
        image_dir = work / "images"
        image_dir.mkdir()
        names = _make_images(image_dir, count, seed=0)
        plain = {precision: encoder.build_encoder(None, IMAGE_SIZE, seed=0, precision=precision, folded=False)
                 for precision in precisions}
        encoder.randomize_batch_normalization(plain["fp32"], seed=1)
        plain["bf16"].set_weights(plain["fp32"].get_weights())
        models = {precision: encoder.fold_encoder(plain[precision]) for precision in precisions}
        flops = convolution_flops(plain["fp32"])
        configs = {precision: config.EncoderConfig(weights="random", batch_size=batch, precision=precision)
                   for precision in models}
        # The bound's input: the same photos, decoded and held in memory (the encoder's
        # speed depends a little on the pixels, so random tensors would flatter it).
        pixels = tf.stack([image_decoding.decode_image(tf.io.read_file(str(image_dir / name)), IMAGE_SIZE)
                           for name in names[:batch]])
        gemm = {"fp32": _gemm_function(tf.float32), "bf16": _gemm_function(tf.bfloat16)}
        for precision, model in models.items():
            # Warm-up: builds the tf.data graph, traces the encoder and runs it once;
            # Keras' predict function and the GEMM graph likewise.
            extract.extract_to_cache(image_dir, names[:batch], work / f"warm_{precision}.h5", configs[precision],
                                     encoder_model=model)
            plain[precision].predict(_user_dataset(extract, image_dir, names[:batch], batch), verbose=0)
            gemm[precision][0]().numpy()

        # The bound encodes whole batches: as many as extract's, the last one full.
        bound_batches = -(-count // batch)

        def bound(precision):
            encode = extract.encode_function(models[precision], IMAGE_SIZE)
            cpu_started, started = time.process_time(), time.perf_counter()
            for _ in range(bound_batches):
                encode(pixels).numpy()
            seconds = time.perf_counter() - started
            return bound_batches * batch / seconds, time.process_time() - cpu_started, seconds

        def extract_rate(precision):
            path = work / f"extract_{precision}_{len(extract_paths)}.h5"
            extract_paths.append(path)
            cpu_started, started = time.process_time(), time.perf_counter()
            result = extract.extract_to_cache(image_dir, names, path, configs[precision], encoder_model=models[precision])
            seconds = time.perf_counter() - started
            assert result["new"] == count and not result["failures"], result
            caches[precision] = path
            return count / seconds, time.process_time() - cpu_started, seconds

        def keras_rate(precision):
            cpu_started, started = time.process_time(), time.perf_counter()
            vectors = plain[precision].predict(_user_dataset(extract, image_dir, names, batch), verbose=0)
            seconds = time.perf_counter() - started
            assert vectors.shape == (count, encoder.FEATURE_DIM), vectors.shape
            keras_features[precision] = vectors
            return count / seconds, time.process_time() - cpu_started, seconds

        def gemm_limit(precision):
            products, products_flops = gemm[precision]
            cpu_started, started = time.process_time(), time.perf_counter()
            products().numpy()
            seconds = time.perf_counter() - started
            return products_flops / seconds / flops, time.process_time() - cpu_started, seconds

        # Each round runs the paths back to back, in the reverse order every other round,
        # so a drift in the machine's speed favours no path; every ratio compares neighbours.
        steps = {"gemm": ("fp32", gemm_limit), "keras": ("fp32", keras_rate), "bound": ("fp32", bound),
                 "extract": ("fp32", extract_rate), "extract_bf16": ("bf16", extract_rate),
                 "bound_bf16": ("bf16", bound), "keras_bf16": ("bf16", keras_rate), "gemm_bf16": ("bf16", gemm_limit)}
        caches, keras_features, extract_paths = {}, {}, []
        rounds = timing.in_alternating_rounds(
            {key: (lambda precision=precision, measure=measure: measure(precision))
             for key, (precision, measure) in steps.items()}, settings["rounds"])
        measured = {key: [rate for rate, _, _ in outcomes] for key, outcomes in rounds.items()}
        # Cores this process kept busy: below ~1.8 of 2, other jobs took CPU.
        cpu_share = {key: [cpu_seconds / seconds for _, cpu_seconds, seconds in outcomes]
                     for key, outcomes in rounds.items()}
        # Images per CPU-second of this process.
        cpu_rate = {key: [rate * seconds / cpu_seconds for rate, cpu_seconds, seconds in outcomes]
                    for key, outcomes in rounds.items()}
        # CPU seconds per image of the bare fp32 encoder.
        encoder_cpu = [cpu_seconds / (bound_batches * batch) for _, cpu_seconds, _ in rounds["bound"]]

        started = time.perf_counter()
        for name in names[: settings["naive_images"]]:
            with Image.open(image_dir / name) as image:
                naive_pixels = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), np.float32)
            models["fp32"].predict(naive_pixels[None], verbose=0)
        naive = settings["naive_images"] / (time.perf_counter() - started)

        decode_cpu = _decode_cpu_seconds_per_image(extract, image_dir, names, batch)
        fp32_cache = features.read_features(None, path=caches["fp32"])
        bf16_cache = features.read_features(None, path=caches["bf16"])
        assert fp32_cache.image_ids == bf16_cache.image_ids == names
        cosine = _cosine(fp32_cache.features, bf16_cache.features)
        folded_cosine = _cosine(fp32_cache.features, keras_features["fp32"])
        bf16_keras_cosine = _cosine(bf16_cache.features, keras_features["fp32"])

    def ratios(numerator, denominator):
        return [top / bottom for top, bottom in zip(measured[numerator], measured[denominator])]

    median = statistics.median
    encoder_cpu = median(encoder_cpu)
    compared = {  # figure -> (numerator path, denominator path), ratios within each round
        "extract_vs_bound": ("extract", "bound"),
        "extract_vs_keras": ("extract", "keras"),
        "extract_vs_gemm_limit": ("extract", "gemm"),
        "extract_bf16_vs_bound": ("extract_bf16", "bound_bf16"),
        "extract_bf16_speedup": ("extract_bf16", "extract"),
        "extract_bf16_vs_keras_fp32": ("extract_bf16", "keras"),
        "extract_bf16_vs_gemm_limit": ("extract_bf16", "gemm_bf16"),
        "keras_bf16_vs_keras_fp32": ("keras_bf16", "keras"),
        "bound_vs_gemm_limit": ("bound", "gemm"),
        "bound_bf16_vs_gemm_limit": ("bound_bf16", "gemm_bf16"),
    }
    results = {
        "images": count,
        "batch_size": batch,
        "rounds": settings["rounds"],
        "cpu_count": os.cpu_count(),
        "resnet50_gflop_per_image": round(flops / 1e9, 3),
        "extract_bound_images_per_s": round(median(measured["bound"]), 2),
        "extract_images_per_s": round(median(measured["extract"]), 2),
        "extract_keras_images_per_s": round(median(measured["keras"]), 2),
        "extract_gemm_limit_images_per_s": round(median(measured["gemm"]), 2),
        "extract_naive_images_per_s": round(naive, 2),
        "extract_vs_naive": round(median(measured["extract"]) / naive, 3),
        "decode_cpu_ms_per_image": round(decode_cpu * 1e3, 2),
        "encoder_cpu_ms_per_image": round(encoder_cpu * 1e3, 2),
        # With every core busy, extract pays decode CPU on top of the encoder's.
        "extract_vs_bound_ceiling": round(encoder_cpu / (encoder_cpu + decode_cpu), 3),
        "extract_bf16_bound_images_per_s": round(median(measured["bound_bf16"]), 2),
        "extract_bf16_images_per_s": round(median(measured["extract_bf16"]), 2),
        "extract_bf16_keras_images_per_s": round(median(measured["keras_bf16"]), 2),
        "extract_bf16_gemm_limit_images_per_s": round(median(measured["gemm_bf16"]), 2),
        "extract_folded_cosine": round(float(folded_cosine.min()), 8),
        "extract_bf16_cosine": round(float(cosine.mean()), 6),
        "extract_bf16_cosine_min": round(float(cosine.min()), 6),
        "extract_bf16_vs_keras_fp32_cosine_min": round(float(bf16_keras_cosine.min()), 6),
        "extract_bf16_auto_resolves_to": device.resolve_precision("auto"),
    }
    for figure, (numerator, denominator) in compared.items():
        results[figure] = round(median(ratios(numerator, denominator)), 3)
    # Per-round figures: on a shared machine their spread is the measurement's noise.
    for figure, (numerator, denominator) in compared.items():
        results[f"rounds_{figure}"] = [round(value, 3) for value in ratios(numerator, denominator)]
    results["rounds_cpu_share"] = {key: [round(value, 2) for value in values] for key, values in cpu_share.items()}
    # The same ratios in images per CPU-second: on a machine whose cores other jobs take,
    # a path's CPU time shrinks less with the share it gets than its wall time does.
    for figure, (numerator, denominator) in compared.items():
        results[f"cpu_time_{figure}"] = round(median(
            [top / bottom for top, bottom in zip(cpu_rate[numerator], cpu_rate[denominator])]), 3)
    return results


def _user_dataset(extract, image_dir, names, batch_size):
    """The images alone (float32 [b, 224, 224, 3]) of extract's own tf.data decoding, as a user would feed Keras."""
    return extract.image_dataset(image_dir, names, IMAGE_SIZE, batch_size).map(lambda ids, images: images)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"small run: {QUICK}")
    parser.add_argument("--images", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--naive-images", type=int, help="images for the slow naive loop")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    results = run(args.quick, args.images, args.batch_size, args.rounds, args.naive_images)
    print(f"{'path':<14}{'fp32':>10}{'bf16':>10}  images/s")
    for label, name in (("gemm limit", "gemm_limit_"), ("bound", "bound_"), ("extract", ""), ("plain keras", "keras_")):
        fp32_rate, bf16_rate = results[f"extract_{name}images_per_s"], results[f"extract_bf16_{name}images_per_s"]
        print(f"{label:<14}{fp32_rate:>10.2f}{bf16_rate:>10.2f}")
    print(f"{'naive':<14}{results['extract_naive_images_per_s']:>10.2f}")
    print(f"GEMM limit: tf.matmul {GEMM_SIZE}x{GEMM_SIZE} over {results['resnet50_gflop_per_image']} GFLOP per image "
          f"(2 x the multiply-adds of ResNet50's convolutions at {IMAGE_SIZE} px)")
    for figure, target in (("extract_vs_bound", ">= 0.85"), ("extract_vs_keras", ">= 1.10"),
                           ("extract_vs_gemm_limit", ">= 0.80"), ("extract_bf16_speedup", ">= 1.4"),
                           ("extract_bf16_vs_keras_fp32", ">= 1.8"), ("extract_bf16_vs_gemm_limit", ">= 0.70"),
                           ("extract_bf16_vs_bound", ""), ("keras_bf16_vs_keras_fp32", ""),
                           ("bound_vs_gemm_limit", ""), ("bound_bf16_vs_gemm_limit", "")):
        print(f"{figure:<28}{results[figure]:>7.3f}  {target:<8} rounds {results['rounds_' + figure]}")
    print(f"extract/bound CPU ceiling {results['extract_vs_bound_ceiling']:.3f} fp32: decode "
          f"{results['decode_cpu_ms_per_image']:.1f} ms vs encoder {results['encoder_cpu_ms_per_image']:.1f} ms CPU/image")
    print(f"cores busy {results['rounds_cpu_share']}")
    print("per CPU-second instead of per second: " + ", ".join(
        f"{figure[len('cpu_time_'):]} {value:.3f}" for figure, value in results.items() if figure.startswith("cpu_time_")))
    print(f"extract/naive = {results['extract_vs_naive']:.3f} (target >= 3)")
    print(f"folded fp32 vs plain Keras fp32 cosine min {results['extract_folded_cosine']:.8f} (target >= 0.99999); "
          f"bf16 vs fp32 extract cosine mean {results['extract_bf16_cosine']:.6f} min "
          f"{results['extract_bf16_cosine_min']:.6f} (target >= 0.99)")
    if args.json:
        io_utils.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
