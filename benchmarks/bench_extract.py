"""Extraction throughput against its bound and the tutorials' loop; bf16 against fp32.

    python -m benchmarks.bench_extract [--quick] [--images 192] [--batch-size 32] [--json FILE]

Measured in one process on the same generated JPEGs (camera-like 500x375), rounds
interleaved so that load from other jobs hits every path alike:
  bound    the bare encoder (`extract.encode_function`) on one in-memory float32 batch,
           batch after batch, as many images as extract encodes;
  extract  the real `extract_to_cache` from JPEG files into a fresh HDF5 cache (the whole
           call: fingerprint, file creation, tf.data start-up, decode, encode, writes);
  naive    PIL opens one image, `model.predict` encodes it, one at a time.
Like with like: both bound and extract exclude the encoder build and the first trace
and run of its function (a warm-up extraction with the same model pays them once; a
real run pays them once per process, seconds against hours). A round runs bound fp32,
extract fp32, extract bf16, bound bf16, and the next round the same backwards, so a
drift in the machine's speed favours no path; ratios are taken within each round and
the median round is reported, with every round's ratios and the CPU share (cores busy)
of every path, which shows when another job took a core.

Also measured: CPU time of decode+resize against the encoder's per image (the ceiling
of extract/bound on a machine whose cores the encoder already fills), and bf16 (Keras
mixed_bfloat16, oneDNN on AMX/AVX512-BF16) against fp32: speed of the real extraction
and cosine similarity of its features to fp32's on the same images.
Random weights: the arithmetic is that of ImageNet weights, and nothing is downloaded.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from pipeline import io_utils

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

IMAGE_SIZE = 224
FULL = {"images": 384, "batch_size": 32, "rounds": 7, "naive_images": 24}
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


def _decode_cpu_seconds_per_image(image_paths):
    """Process CPU seconds of read + decode_image (decode and antialiased resize) per image, one at a time."""
    import tensorflow as tf

    from models import encoder

    decode = tf.function(lambda path: encoder.decode_image(tf.io.read_file(path), IMAGE_SIZE),
                         input_signature=[tf.TensorSpec([], tf.string)])
    decode(str(image_paths[0])).numpy()
    started = time.process_time()
    for path in image_paths:
        decode(str(path)).numpy()
    return (time.process_time() - started) / len(image_paths)


def _cosine(first, second):
    import numpy as np

    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    return (first * second).sum(axis=1) / np.maximum(norms, 1e-30)


def run(quick=False, images=None, batch_size=None, rounds=None, naive_images=None):
    """Runs the benchmark; returns a flat dict of figures (rates in images/s, ratios).

    Keys include extract_images_per_s, extract_bound_images_per_s,
    extract_naive_images_per_s, extract_vs_bound, extract_vs_naive, extract_bf16_speedup
    (bf16 extract over fp32 extract), extract_bf16_cosine (mean over images).
    """
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from models import encoder
    from pipeline import config, extract, features

    settings = dict(QUICK if quick else FULL)
    for name, value in (("images", images), ("batch_size", batch_size), ("rounds", rounds),
                        ("naive_images", naive_images)):
        if value is not None:
            settings[name] = value
    count, batch = settings["images"], settings["batch_size"]

    with tempfile.TemporaryDirectory(prefix="bench_extract_") as work:
        work = Path(work)
        image_dir = work / "images"
        image_dir.mkdir()
        names = _make_images(image_dir, count, seed=0)
        models = {precision: encoder.build_encoder("random", IMAGE_SIZE, seed=0, precision=precision)
                  for precision in ("fp32", "bf16")}
        configs = {precision: config.EncoderConfig(weights="random", batch_size=batch, precision=precision)
                   for precision in models}
        # The bound's input: the same photos, decoded and held in memory (the encoder's
        # speed depends a little on the pixels, so random tensors would flatter it).
        pixels = tf.stack([encoder.decode_image(tf.io.read_file(str(image_dir / name)), IMAGE_SIZE)
                           for name in names[:batch]])
        for precision, model in models.items():
            # Warm-up: builds the tf.data graph, traces the encoder and runs it once.
            extract.extract_to_cache(image_dir, names[:batch], work / f"warm_{precision}.h5", configs[precision],
                                     encoder_model=model)

        # The bound encodes whole batches: as many as extract's, the last one full.
        bound_batches = -(-count // batch)

        def bound(precision, round_index):
            encode = extract.encode_function(models[precision], IMAGE_SIZE)
            cpu_started, started = time.process_time(), time.perf_counter()
            for _ in range(bound_batches):
                encode(pixels).numpy()
            seconds = time.perf_counter() - started
            return bound_batches * batch / seconds, time.process_time() - cpu_started, seconds

        def extract_rate(precision, round_index):
            path = work / f"round{round_index}_{precision}.h5"
            cpu_started, started = time.process_time(), time.perf_counter()
            result = extract.extract_to_cache(image_dir, names, path, configs[precision], encoder_model=models[precision])
            seconds = time.perf_counter() - started
            assert result["new"] == count and not result["failures"], result
            caches[precision] = path
            return count / seconds, time.process_time() - cpu_started, seconds

        # Each round runs the four paths back to back, in the reverse order every other
        # round (bound, extract, extract bf16, bound bf16, then backwards), so a drift in
        # the machine's speed favours no path; every ratio compares neighbours.
        steps = [("bound", "fp32", bound), ("extract", "fp32", extract_rate),
                 ("extract", "bf16", extract_rate), ("bound", "bf16", bound)]
        measured = {key: [] for key in ("bound", "extract", "bound_bf16", "extract_bf16")}
        cpu_share = {key: [] for key in measured}
        encoder_cpu = []  # CPU seconds per image of the bare fp32 encoder
        caches = {}
        for round_index in range(settings["rounds"]):
            for path_name, precision, measure in (steps if round_index % 2 == 0 else steps[::-1]):
                key = path_name if precision == "fp32" else f"{path_name}_bf16"
                rate, cpu_seconds, seconds = measure(precision, round_index)
                measured[key].append(rate)
                # Cores this process kept busy: below ~1.8 of 2, other jobs took CPU.
                cpu_share[key].append(cpu_seconds / seconds)
                if key == "bound":
                    encoder_cpu.append(cpu_seconds / (bound_batches * batch))

        started = time.perf_counter()
        for name in names[: settings["naive_images"]]:
            with Image.open(image_dir / name) as image:
                naive_pixels = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), np.float32)
            models["fp32"].predict(naive_pixels[None], verbose=0)
        naive = settings["naive_images"] / (time.perf_counter() - started)

        decode_cpu = _decode_cpu_seconds_per_image([image_dir / name for name in names[:32]])
        fp32_cache = features.read_features(None, path=caches["fp32"])
        bf16_cache = features.read_features(None, path=caches["bf16"])
        assert fp32_cache.image_ids == bf16_cache.image_ids
        cosine = _cosine(fp32_cache.features, bf16_cache.features)

    def ratios(numerator, denominator):
        return [top / bottom for top, bottom in zip(measured[numerator], measured[denominator])]

    median = statistics.median
    encoder_cpu = median(encoder_cpu)
    return {
        "images": count,
        "batch_size": batch,
        "rounds": settings["rounds"],
        "cpu_count": os.cpu_count(),
        "extract_bound_images_per_s": round(median(measured["bound"]), 2),
        "extract_images_per_s": round(median(measured["extract"]), 2),
        "extract_naive_images_per_s": round(naive, 2),
        "extract_vs_bound": round(median(ratios("extract", "bound")), 3),
        "extract_vs_naive": round(median(measured["extract"]) / naive, 3),
        "decode_cpu_ms_per_image": round(decode_cpu * 1e3, 2),
        "encoder_cpu_ms_per_image": round(encoder_cpu * 1e3, 2),
        # With every core busy, extract pays decode CPU on top of the encoder's.
        "extract_vs_bound_ceiling": round(encoder_cpu / (encoder_cpu + decode_cpu), 3),
        "extract_bf16_bound_images_per_s": round(median(measured["bound_bf16"]), 2),
        "extract_bf16_images_per_s": round(median(measured["extract_bf16"]), 2),
        "extract_bf16_vs_bound": round(median(ratios("extract_bf16", "bound_bf16")), 3),
        "extract_bf16_speedup": round(median(ratios("extract_bf16", "extract")), 3),
        "extract_bf16_cosine": round(float(cosine.mean()), 6),
        "extract_bf16_cosine_min": round(float(cosine.min()), 6),
        "extract_bf16_auto_resolves_to": encoder.resolve_precision("auto"),
        # Per-round figures: on a shared machine their spread is the measurement's noise.
        "rounds_extract_vs_bound": [round(value, 3) for value in ratios("extract", "bound")],
        "rounds_extract_bf16_vs_bound": [round(value, 3) for value in ratios("extract_bf16", "bound_bf16")],
        "rounds_extract_bf16_speedup": [round(value, 3) for value in ratios("extract_bf16", "extract")],
        "rounds_cpu_share": {key: [round(value, 2) for value in values] for key, values in cpu_share.items()},
    }


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
    print(f"{'path':<14}{'images/s':>10}")
    for label, key in (("bound fp32", "extract_bound_images_per_s"), ("extract fp32", "extract_images_per_s"),
                       ("naive fp32", "extract_naive_images_per_s"), ("bound bf16", "extract_bf16_bound_images_per_s"),
                       ("extract bf16", "extract_bf16_images_per_s")):
        print(f"{label:<14}{results[key]:>10.2f}")
    print(f"extract/bound = {results['extract_vs_bound']:.3f} fp32, {results['extract_bf16_vs_bound']:.3f} bf16 "
          f"(target >= 0.85; CPU ceiling {results['extract_vs_bound_ceiling']:.3f} fp32: decode "
          f"{results['decode_cpu_ms_per_image']:.1f} ms vs encoder {results['encoder_cpu_ms_per_image']:.1f} ms CPU/image)")
    print(f"rounds extract/bound fp32 {results['rounds_extract_vs_bound']}, bf16 "
          f"{results['rounds_extract_bf16_vs_bound']}; cores busy {results['rounds_cpu_share']}")
    print(f"extract/naive = {results['extract_vs_naive']:.3f}")
    print(f"bf16/fp32 extract speed = {results['extract_bf16_speedup']:.3f} (target >= 1.4), cosine mean "
          f"{results['extract_bf16_cosine']:.6f} min {results['extract_bf16_cosine_min']:.6f} (target >= 0.99)")
    if args.json:
        io_utils.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
