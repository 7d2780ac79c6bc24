"""Serving speed of the exported SavedModel on this machine.

    python -m benchmarks.bench_serving [--out OUT] [--export] [--repeats 20] [--json FILE]

Measures, through the SavedModel's own signatures (what `serve` and TF Serving run):
  - single-image latency of `serving_default` (median and p90 of --repeats calls after warm-up),
  - batch-16 throughput of `serving_default` (images/s, median batch time),
  - the same for `caption_features` on the cached features of the same images: the decoder
    and beam search alone, without image decoding and ResNet50.
`decode_share` = caption_features time / serving_default time at batch 16: the part of an
end-to-end call spent decoding captions (the target is under 0.25; ResNet50 should dominate).
`serve_photo_overhead`: a 4000x3000 JPEG (a phone photo) through an in-process `serve` on
loopback against the same `serving_default` call made directly, alternately (ratio of
medians): what the HTTP server adds, base64 and JSON and its header check included.

OUT is a trained run (default artifacts/demo, made by `python run_pipeline.py`). Without
one, or with --fresh, a small run is made in a temporary folder: generated demo images,
random encoder weights, the default decoder size trained for one epoch.

--synthetic (what the benchmark suite runs) measures the worst case at Flickr8k's sizes
instead: the export's own graph around a random ResNet50 and an untrained decoder of the
default size (embedding 256, units 512) over a 3,000-word vocabulary. An untrained decoder
almost never writes `<end>`, so every beam runs the full `max_length` (20 words): decoding
costs at least as much as for any trained model of that size.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipeline import io_utils

BATCH_SIZE = 16
FRESH_NUM_IMAGES = 48


def _fresh_run(folder):
    from pipeline import demo_data, export, extract, train

    print(f"making a small run in {folder} (demo images, random weights, 1 epoch)", flush=True)
    data_dir = demo_data.generate_demo_dataset(Path(folder) / "data", seed=0, num_images=FRESH_NUM_IMAGES)
    out = Path(folder) / "run"
    extract.run_extract(data_dir, out, {"encoder.weights": "random", "text.min_word_count": 1})
    train.run_train(out, {"train.epochs": 1})
    export.run_export(out, {})
    return out


SYNTHETIC_VOCABULARY = 3000


def _synthetic_run(folder, beam_size=3):
    """Saves the export graph of a random encoder + untrained default-size decoder; returns
    (saved_model_dir, encoded images list[bytes], feature rows float32 [16, 2048], decode dict)."""
    import io

    import numpy
    import tensorflow as tf
    from PIL import Image

    from models import captioner, decoder, encoder
    from pipeline import config as config_module
    from pipeline import export

    settings = config_module.PipelineConfig().replace({"decode.beam_size": beam_size})
    encoder_model = encoder.build_encoder("random", settings.encoder.image_size, seed=0)
    decoder_model = decoder.build_decoder(settings.decoder, SYNTHETIC_VOCABULARY)
    words = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{index}" for index in range(SYNTHETIC_VOCABULARY - 4)]
    feature_captioner = captioner.FeatureCaptioner(decoder_model, words, settings.decode)
    image_captioner = captioner.ImageCaptioner(encoder_model, feature_captioner, settings.encoder.image_size)
    saved_model_dir = Path(folder) / "saved_model"
    tf.saved_model.save(image_captioner, str(saved_model_dir), signatures=export.serving_signatures(image_captioner))

    generator = numpy.random.default_rng(0)
    images = []
    for _ in range(BATCH_SIZE):  # camera-like JPEGs, 500x375 as in Flickr8k
        pixels = generator.integers(0, 256, (375, 500, 3), dtype=numpy.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    decoded = tf.stack([encoder.decode_image(tf.constant(data), settings.encoder.image_size) for data in images])
    feature_rows = encoder_model(decoded, training=False).numpy()
    decode = {"beam_size": settings.decode.beam_size, "max_length": settings.decode.max_length}
    return saved_model_dir, images, feature_rows, decode


def _time_calls(function, repeats, warmup):
    """Seconds per call (list of float) of `function()` after `warmup` untimed calls."""
    for _ in range(warmup):
        function()
    durations = []
    for index in range(repeats):
        started = time.perf_counter()
        function()
        durations.append(time.perf_counter() - started)
        print(f"\r  {index + 1}/{repeats} calls", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr, flush=True)
    return durations


def serve_overhead(model_dir, repeats, width=4000, height=3000):
    """`serve` against the bare SavedModel call on one phone-sized photo: (ratio of medians, dict).

    The same JPEG goes through `serving_default` directly and through an in-process `serve`
    (loopback HTTP, base64 in JSON, the header check), alternately, after one warm-up each.
    A phone photo makes the server's own costs visible: its decode is ~20% of the call.
    """
    import base64
    import io
    import urllib.request

    import numpy
    import tensorflow as tf

    from benchmarks import photos
    from pipeline import serve

    image = photos.photo_jpeg(width, height, numpy.random.default_rng(0))
    by_images = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    server = serve.make_server(model_dir, port=0, max_body_mb=64, log_stream=io.StringIO()).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/models/captioner:predict"
    body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode("ascii")}]}).encode("utf-8")

    def over_http():
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()

    def direct():
        by_images(images=tf.constant([image])).get("captions").numpy()

    timings = {"direct": [], "http": []}
    try:
        direct()
        over_http()
        for index in range(repeats):
            for name, call in (("direct", direct), ("http", over_http))[:: 1 if index % 2 == 0 else -1]:
                started = time.perf_counter()
                call()
                timings[name].append(time.perf_counter() - started)
            print(f"\r  {index + 1}/{repeats} pairs", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr, flush=True)
    finally:
        server.stop()
    direct_seconds, http_seconds = statistics.median(timings["direct"]), statistics.median(timings["http"])
    return http_seconds / direct_seconds, {
        "serve_photo_pixels": f"{width}x{height}",
        "serve_photo_kb": len(image) // 1024,
        "serve_photo_direct_ms": 1000 * direct_seconds,
        "serve_photo_http_ms": 1000 * http_seconds,
    }


def _percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def _run_inputs(out_dir):
    """(saved_model_dir, images list[bytes], feature rows, decode dict) of a trained run."""
    from pipeline import datasets, features

    model_dir = Path(out_dir) / "saved_model"
    dataset = datasets.read_captions_json(out_dir)
    cache = features.read_features(out_dir)
    image_ids = cache.image_ids[:BATCH_SIZE]
    if len(image_ids) < BATCH_SIZE:
        raise SystemExit(f"{out_dir}: needs at least {BATCH_SIZE} cached images, has {len(image_ids)}")
    images = [(dataset.image_dir / image_id).read_bytes() for image_id in image_ids]
    metadata_path = model_dir / "assets.extra" / "captioner.json"
    decode = json.loads(metadata_path.read_text())["config"]["decode"] if metadata_path.is_file() else {}
    return model_dir, images, cache.features[:BATCH_SIZE], decode


def measure(model_dir, images, feature_rows, decode, repeats, batch_repeats):
    """Times the SavedModel's two signatures on these inputs; returns the results (dict)."""
    import tensorflow as tf

    images = tf.constant(images)
    feature_rows = tf.constant(feature_rows)
    loaded = tf.saved_model.load(str(model_dir))
    by_images = loaded.signatures["serving_default"]
    by_features = loaded.signatures["caption_features"]

    print("serving_default, 1 image:", file=sys.stderr)
    single = _time_calls(lambda: by_images(images=images[:1]), repeats, warmup=3)
    print("caption_features, 1 row:", file=sys.stderr)
    single_features = _time_calls(lambda: by_features(features=feature_rows[:1]), repeats, warmup=3)
    print(f"serving_default, batch {BATCH_SIZE}:", file=sys.stderr)
    batch = _time_calls(lambda: by_images(images=images), batch_repeats, warmup=1)
    print(f"caption_features, batch {BATCH_SIZE}:", file=sys.stderr)
    batch_features = _time_calls(lambda: by_features(features=feature_rows), batch_repeats, warmup=1)

    print("a 12-megapixel photo through serve and directly, alternately:", file=sys.stderr)
    overhead, photo = serve_overhead(model_dir, repeats=max(5, repeats // 2))

    # Beam search stops when every beam has ended, so its cost depends on caption length.
    captions = by_features(features=feature_rows)["captions"].numpy().tolist()
    mean_words = statistics.mean(len(caption.split()) for caption in captions)
    batch_seconds = statistics.median(batch)
    batch_features_seconds = statistics.median(batch_features)
    return {
        "model_dir": str(model_dir),
        "beam_size": decode.get("beam_size"),
        "max_length": decode.get("max_length"),
        "cpu_count": os.cpu_count(),
        "tensorflow_version": tf.__version__,
        "single_latency_ms_median": 1000 * statistics.median(single),
        "single_latency_ms_p90": 1000 * _percentile(single, 0.9),
        "single_features_latency_ms_median": 1000 * statistics.median(single_features),
        "batch_size": BATCH_SIZE,
        "batch_seconds_median": batch_seconds,
        "batch_images_per_second": BATCH_SIZE / batch_seconds,
        "batch_features_seconds_median": batch_features_seconds,
        "batch_features_rows_per_second": BATCH_SIZE / batch_features_seconds,
        "decode_share": batch_features_seconds / batch_seconds,
        "mean_caption_words": mean_words,
        "decode_share_single": statistics.median(single_features) / statistics.median(single),
        "repeats": repeats,
        "batch_repeats": batch_repeats,
        # the benchmark suite's names
        "savedmodel_latency_ms": 1000 * statistics.median(single),
        "savedmodel_decode_share": statistics.median(single_features) / statistics.median(single),
        "savedmodel_batch16_images_per_s": BATCH_SIZE / batch_seconds,
        "serve_photo_overhead": overhead,
        **photo,
    }


def run(quick=False):
    """The suite's entry point: the --synthetic measurement; returns the results (dict)."""
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as temporary:
        inputs = _synthetic_run(temporary)
        return measure(*inputs, repeats=10 if quick else 30, batch_repeats=3 if quick else 8)


def print_table(results):
    rows = [
        ("serving_default, 1 image, median", f"{results['single_latency_ms_median']:.1f} ms"),
        ("serving_default, 1 image, p90", f"{results['single_latency_ms_p90']:.1f} ms"),
        ("caption_features, 1 row, median", f"{results['single_features_latency_ms_median']:.1f} ms"),
        (f"serving_default, batch {results['batch_size']}",
         f"{results['batch_seconds_median']:.3f} s = {results['batch_images_per_second']:.1f} images/s"),
        (f"caption_features, batch {results['batch_size']}",
         f"{results['batch_features_seconds_median']:.3f} s = {results['batch_features_rows_per_second']:.1f} rows/s"),
        (f"decode_share (batch {results['batch_size']})", f"{results['decode_share']:.3f}"),
        ("decode_share (1 image)", f"{results['decode_share_single']:.3f}"),
        ("mean caption length", f"{results['mean_caption_words']:.1f} words"),
        (f"{results['serve_photo_pixels']} JPEG ({results['serve_photo_kb']} kB), SavedModel call",
         f"{results['serve_photo_direct_ms']:.0f} ms"),
        (f"{results['serve_photo_pixels']} JPEG, through serve",
         f"{results['serve_photo_http_ms']:.0f} ms = {results['serve_photo_overhead']:.3f}x"),
    ]
    print(f"model {results['model_dir']}  beam {results['beam_size']}  max_length {results['max_length']}  "
          f"cpus {results['cpu_count']}  tensorflow {results['tensorflow_version']}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    verdict = "meets" if results["decode_share"] < 0.25 else "misses"
    print(f"decode_share {results['decode_share']:.3f} {verdict} the target of 0.25")


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("artifacts", "demo"), help="a trained run folder")
    parser.add_argument("--fresh", action="store_true", help="make a small run in a temporary folder instead")
    parser.add_argument("--synthetic", action="store_true",
                        help="worst case at Flickr8k sizes: untrained default-size decoder, 3,000 words")
    parser.add_argument("--export", action="store_true", help="re-export OUT first (with --beam-size)")
    parser.add_argument("--beam-size", type=int, default=None, help="beam width for --export")
    parser.add_argument("--repeats", type=int, default=20, help="timed single-image calls")
    parser.add_argument("--batch-repeats", type=int, default=5, help=f"timed batch-{BATCH_SIZE} calls")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_serving_") as temporary:
        out_dir = Path(args.out)
        if args.synthetic:
            inputs = _synthetic_run(temporary, args.beam_size or 3)
        else:
            if args.fresh or not (out_dir / "decoder.keras").is_file():
                out_dir = _fresh_run(temporary)
            elif args.export or not (out_dir / "saved_model" / "saved_model.pb").is_file():
                from pipeline import export

                export.run_export(out_dir, {"decode.beam_size": args.beam_size})
            inputs = _run_inputs(out_dir)
        results = measure(*inputs, args.repeats, args.batch_repeats)
    print_table(results)
    if args.json:
        io_utils.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
