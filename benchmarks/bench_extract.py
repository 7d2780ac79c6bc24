"""Extraction throughput against its bound and against the tutorials' loop.

    python -m benchmarks.bench_extract [--images 192] [--batch-size 32] [--json FILE]

Measured in one run on the same generated JPEGs (camera-like 500x375):
  bound   the bare encoder on in-memory tensors, batch after batch (images/s);
  extract the real `extract_to_cache` from JPEG files into a fresh HDF5 cache;
  naive   PIL opens one image, `model.predict` encodes it, one at a time.
Ratios extract/bound (target >= 0.85) and extract/naive are printed and saved.
Random weights: the arithmetic is that of ImageNet weights, and nothing is downloaded.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _make_images(folder, count, seed):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base_y, base_x = np.mgrid[0:375, 0:500].astype(np.float32)
    names = []
    for index in range(count):
        # Smooth shapes plus sensor-like noise: JPEG sizes near real photos (~40-80 kB).
        phase = rng.random(3) * 6.28
        pixels = np.stack([127 + 100 * np.sin(base_x / (20 + 10 * channel) + base_y / 35 + phase[channel])
                           for channel in range(3)], axis=-1)
        pixels += rng.normal(0, 12, pixels.shape)
        name = f"image_{index:04d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / name, "JPEG", quality=90)
        names.append(name)
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--naive-images", type=int, default=48, help="images for the slow naive loop")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from models import encoder
    from pipeline import config, extract

    with tempfile.TemporaryDirectory(prefix="bench_extract_") as work:
        work = Path(work)
        images = work / "images"
        images.mkdir()
        names = _make_images(images, args.images, seed=0)
        model = encoder.build_encoder("random", 224, seed=0)
        encode = extract.make_encode_function(model, args.batch_size, 224)
        batch = tf.constant(np.random.default_rng(1).random((args.batch_size, 224, 224, 3), np.float32) * 255)
        encode(batch).numpy()  # trace and warm up outside the timing
        batches = -(-args.images // args.batch_size)
        started = time.perf_counter()
        for _ in range(batches):
            encode(batch).numpy()
        bound = batches * args.batch_size / (time.perf_counter() - started)

        encoder_config = config.EncoderConfig(weights="random", batch_size=args.batch_size)
        started = time.perf_counter()
        result = extract.extract_to_cache(images, names, work / "out" / "features.h5", encoder_config,
                                          encoder_model=model)
        extract_rate = result["new"] / (time.perf_counter() - started)
        assert result["new"] == args.images and not result["failures"]

        started = time.perf_counter()
        for name in names[: args.naive_images]:
            with Image.open(images / name) as image:
                pixels = np.asarray(image.convert("RGB").resize((224, 224)), np.float32)
            model.predict(pixels[None], verbose=0)
        naive = args.naive_images / (time.perf_counter() - started)

    results = {
        "images": args.images,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "bound_images_per_second": round(bound, 2),
        "extract_images_per_second": round(extract_rate, 2),
        "naive_images_per_second": round(naive, 2),
        "extract_over_bound": round(extract_rate / bound, 3),
        "extract_over_naive": round(extract_rate / naive, 3),
    }
    print(f"{'path':<10}{'images/s':>10}")
    for label, key in (("bound", "bound"), ("extract", "extract"), ("naive", "naive")):
        print(f"{label:<10}{results[key + '_images_per_second']:>10.2f}")
    print(f"extract/bound = {results['extract_over_bound']:.3f} (target >= 0.85)")
    print(f"extract/naive = {results['extract_over_naive']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
