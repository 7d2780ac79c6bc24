"""Serving speed of the exported SavedModel on this machine.

    python -m benchmarks.bench_serving [--out OUT] [--export] [--repeats 20] [--json FILE]

Measures, through the SavedModel's own signatures (what `serve` and TF Serving run):
  - single-image latency of `serving_default` (median and p90 of --repeats calls after warm-up),
  - batch-16 throughput of `serving_default` (images/s, median batch time),
  - the same for `caption_features` on the cached features of the same images: the decoder
    and beam search alone, without image decoding and ResNet50.
`decode_ms_per_image` = caption_features time at batch 16 / 16, and `encoder_ms_per_image`
= (serving_default - caption_features) at batch 16 / 16: what an image costs in beam
search, and in decoding its bytes plus ResNet50, side by side.
`savedmodel_two_callers_images_per_s`: two threads each calling `serving_default` with
one image at a time, at once (what `serve --max-batch-size 1` runs on two batch threads),
and `savedmodel_batch16_vs_two_callers`, batch 16 against that: the most that batching
in a server can gain over two concurrent one-image calls on this machine.
`serve_photo_overhead`: a 4000x3000 JPEG (a phone photo) through an in-process `serve` on
loopback against the same `serving_default` call made directly, alternately (ratio of
medians): what the HTTP server adds, base64 and JSON and its header check included.

OUT is a trained run (default artifacts/demo, made by `python run_pipeline.py`). Without
one, or with --fresh, a small run is made in a temporary folder: generated demo images,
random encoder weights, the default decoder size trained for one epoch.

--synthetic measures the worst case at Flickr8k's sizes instead: the export's own graph
around a random ResNet50 and an untrained decoder of the default size (embedding 256,
units 512) over a 3,000-word vocabulary. An untrained decoder almost never writes `<end>`,
so every beam runs the full `max_length` (20 words): decoding costs at least as much as
for any trained model of that size. The same graph is also saved with the plain Keras
ResNet50 (BatchNorm not folded, as exports were before folding), and both SavedModels'
`serving_default` are timed alternately: one-image latency and batch-16 throughput,
before and after folding. The weights have random BatchNorm statistics
(`encoder.randomize_batch_normalization`), so the two graphs compute the same features.

The benchmark suite runs --synthetic and, beside it, the demo's trained decoder: a small
demo run (generated scenes, random encoder, the demo's decoder settings) exported with
beam 3, whose captions end with `<end>` as a trained model's do.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import timing, workloads
from pipeline.core import io_utils

BATCH_SIZE = 16
FRESH_NUM_IMAGES = 48


def _fresh_run(folder):
    from pipeline import export, extract, train
    from pipeline.data import demo_data

    print(f"making a small run in {folder} (demo images, random weights, 1 epoch)", flush=True)
    data_dir = demo_data.generate_demo_dataset(Path(folder) / "data", seed=0, num_images=FRESH_NUM_IMAGES)
    out = Path(folder) / "run"
    extract.run_extract(data_dir, out, {"encoder.weights": "random", "text.min_word_count": 1})
    train.run_train(out, {"train.epochs": 1})
    export.run_export(out, {})
    return out


SYNTHETIC_VOCABULARY = 3000


def synthetic_export(folder, beam_size=3):
    """Saves the export graph of a random encoder + untrained default-size decoder, folded
    and plain; returns (saved_model_dir, encoded images list[bytes], feature rows float32
    [16, 2048], decode dict, plain-encoder saved_model_dir)."""
    import io

    import numpy
    import tensorflow as tf
    from PIL import Image

    from models import captioner, decoder, encoder, image_decoding
    from pipeline.core import config as config_module
    from pipeline import export

    settings = config_module.PipelineConfig().replace({"decode.beam_size": beam_size})
    plain_encoder = encoder.build_encoder(None, settings.encoder.image_size, seed=0, folded=False)
    encoder.randomize_batch_normalization(plain_encoder, seed=1)
    encoder_model = encoder.fold_encoder(plain_encoder)
    decoder_model = decoder.build_decoder(settings.decoder, SYNTHETIC_VOCABULARY)
    words = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{index}" for index in range(SYNTHETIC_VOCABULARY - 4)]
    feature_captioner = captioner.FeatureCaptioner(decoder_model, words, settings.decode)
    saved_model_dirs = []
    for name, model in (("saved_model", encoder_model), ("saved_model_unfolded", plain_encoder)):
        image_captioner = captioner.ImageCaptioner(model, feature_captioner, settings.encoder.image_size)
        saved_model_dirs.append(Path(folder) / name)
        tf.saved_model.save(image_captioner, str(saved_model_dirs[-1]),
                            signatures=export.serving_signatures(image_captioner))

    generator = numpy.random.default_rng(0)
    images = []
    for _ in range(BATCH_SIZE):  # camera-like JPEGs, 500x375 as in Flickr8k
        pixels = generator.integers(0, 256, (375, 500, 3), dtype=numpy.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    decoded = tf.stack([image_decoding.decode_image(tf.constant(data), settings.encoder.image_size) for data in images])
    feature_rows = encoder_model(decoded, training=False).numpy()
    decode = {"beam_size": settings.decode.beam_size, "max_length": settings.decode.max_length}
    return saved_model_dirs[0], images, feature_rows, decode, saved_model_dirs[1]


TRAINED_NUM_IMAGES = 150


def trained_decode(out_dir, repeats, batch_repeats):
    """Beam search alone (`caption_features`) of a trained run's SavedModel on 16 of its cached rows."""
    import tensorflow as tf

    model_dir, _, feature_rows, decode = _run_inputs(out_dir)
    by_features = tf.saved_model.load(str(model_dir)).signatures["caption_features"]
    feature_rows = tf.constant(feature_rows)
    print("trained decoder, caption_features, 1 row:", file=sys.stderr)
    single = timing.time_calls(lambda: by_features(features=feature_rows[:1]), repeats, warmup=3)
    print(f"trained decoder, caption_features, batch {BATCH_SIZE}:", file=sys.stderr)
    batch = timing.time_calls(lambda: by_features(features=feature_rows), batch_repeats, warmup=1)
    captions = by_features(features=feature_rows)["captions"].numpy().tolist()
    return {
        "trained_beam_size": decode.get("beam_size"),
        "trained_mean_caption_words": statistics.mean(len(caption.split()) for caption in captions),
        "trained_single_features_latency_ms_median": 1000 * statistics.median(single),
        "savedmodel_decode_ms_per_image_trained": 1000 * statistics.median(batch) / BATCH_SIZE,
    }


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
    from pipeline.serving import server as http_server

    image = photos.photo_jpeg(width, height, numpy.random.default_rng(0))
    by_images = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    server = http_server.make_server(model_dir, port=0, max_body_mb=64, log_stream=io.StringIO()).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/models/captioner:predict"
    body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode("ascii")}]}).encode("utf-8")

    def over_http():
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()

    def direct():
        by_images(images=tf.constant([image])).get("captions").numpy()

    try:
        timings = timing.time_alternately({"direct": direct, "http": over_http}, repeats, warmup=1)
    finally:
        server.stop()
    direct_seconds, http_seconds = statistics.median(timings["direct"]), statistics.median(timings["http"])
    return http_seconds / direct_seconds, {
        "serve_photo_pixels": f"{width}x{height}",
        "serve_photo_kb": len(image) // 1024,
        "serve_photo_direct_ms": 1000 * direct_seconds,
        "serve_photo_http_ms": 1000 * http_seconds,
    }


def _run_inputs(out_dir):
    """(saved_model_dir, images list[bytes], feature rows, decode dict) of a trained run."""
    from pipeline.data import datasets, features

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


def measure(model_dir, images, feature_rows, decode, repeats, batch_repeats, unfolded_dir=None):
    """Times the SavedModel's two signatures on these inputs; returns the results (dict).

    unfolded_dir: the same graph with the plain Keras encoder; its `serving_default` is
    timed alternately with `model_dir`'s (keys ending in `_unfolded`).
    """
    import tensorflow as tf

    images = tf.constant(images)
    feature_rows = tf.constant(feature_rows)
    loaded = tf.saved_model.load(str(model_dir))
    by_images = {"folded": loaded.signatures["serving_default"]}
    if unfolded_dir is not None:
        by_images["unfolded"] = tf.saved_model.load(str(unfolded_dir)).signatures["serving_default"]
    by_features = loaded.signatures["caption_features"]

    print("serving_default, 1 image:", file=sys.stderr)
    single = timing.time_alternately({name: (lambda function=function: function(images=images[:1]))
                                for name, function in by_images.items()}, repeats, warmup=3)
    print("caption_features, 1 row:", file=sys.stderr)
    single_features = timing.time_calls(lambda: by_features(features=feature_rows[:1]), repeats, warmup=3)
    print(f"serving_default, batch {BATCH_SIZE}:", file=sys.stderr)
    batch = timing.time_alternately({name: (lambda function=function: function(images=images))
                               for name, function in by_images.items()}, batch_repeats, warmup=1)
    print(f"caption_features, batch {BATCH_SIZE}:", file=sys.stderr)
    batch_features = timing.time_calls(lambda: by_features(features=feature_rows), batch_repeats, warmup=1)
    print("serving_default, 1 image from each of two threads at once", file=sys.stderr)
    two_callers = timing.callers_images_per_s(by_images["folded"], images, callers=2, batch=1, calls=repeats)

    print("a 12-megapixel photo through serve and directly, alternately:", file=sys.stderr)
    overhead, photo = serve_overhead(model_dir, repeats=max(5, repeats // 2))

    # Beam search stops when every beam has ended, so its cost depends on caption length.
    captions = by_features(features=feature_rows)["captions"].numpy().tolist()
    mean_words = statistics.mean(len(caption.split()) for caption in captions)
    batch_seconds = statistics.median(batch["folded"])
    batch_features_seconds = statistics.median(batch_features)
    results = {
        "model_dir": str(model_dir),
        "beam_size": decode.get("beam_size"),
        "max_length": decode.get("max_length"),
        "cpu_count": os.cpu_count(),
        "tensorflow_version": tf.__version__,
        "single_latency_ms_median": 1000 * statistics.median(single["folded"]),
        "single_latency_ms_p90": 1000 * timing.percentile(single["folded"], 0.9),
        "single_features_latency_ms_median": 1000 * statistics.median(single_features),
        "batch_size": BATCH_SIZE,
        "batch_seconds_median": batch_seconds,
        "batch_images_per_second": BATCH_SIZE / batch_seconds,
        "batch_features_seconds_median": batch_features_seconds,
        "batch_features_rows_per_second": BATCH_SIZE / batch_features_seconds,
        "mean_caption_words": mean_words,
        "repeats": repeats,
        "batch_repeats": batch_repeats,
        # the benchmark suite's names
        "savedmodel_encoder_ms_per_image": 1000 * (batch_seconds - batch_features_seconds) / BATCH_SIZE,
        "savedmodel_decode_ms_per_image": 1000 * batch_features_seconds / BATCH_SIZE,
        "serve_photo_overhead": overhead,
        **photo,
        "savedmodel_two_callers_images_per_s": two_callers,
        # The most batching in a server can gain over two one-image calls side by side
        # (`serve --max-batch-size 1` on two batch threads): batch 16 against them.
        "savedmodel_batch16_vs_two_callers": BATCH_SIZE / batch_seconds / two_callers,
    }
    for name in by_images:
        suffix = "" if name == "folded" else f"_{name}"
        results[f"savedmodel_latency_ms{suffix}"] = 1000 * statistics.median(single[name])
        results[f"savedmodel_batch16_images_per_s{suffix}"] = BATCH_SIZE / statistics.median(batch[name])
    if unfolded_dir is not None:
        # Ratios of calls made side by side, the figures of folding.
        results["savedmodel_latency_folded_vs_unfolded"] = (
            results["savedmodel_latency_ms"] / results["savedmodel_latency_ms_unfolded"])
        results["savedmodel_batch16_folded_speedup"] = (
            results["savedmodel_batch16_images_per_s"] / results["savedmodel_batch16_images_per_s_unfolded"])
    return results


def run(quick=False):
    """The suite's entry point: --synthetic (folded and plain encoder) and the demo's trained
    decoder; returns the results (dict)."""
    repeats, batch_repeats = (10, 3) if quick else (30, 8)
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as temporary:
        model_dir, images, feature_rows, decode, unfolded_dir = synthetic_export(temporary)
        results = measure(model_dir, images, feature_rows, decode, repeats, batch_repeats, unfolded_dir)
        results["savedmodel_decode_ms_per_image_untrained"] = results.pop("savedmodel_decode_ms_per_image")
        trained_out = workloads.trained_demo_run(temporary, TRAINED_NUM_IMAGES, export_beam_size=3)
        results.update(trained_decode(trained_out, repeats, batch_repeats))
    return results


def print_table(results):
    decode_key = next(key for key in ("savedmodel_decode_ms_per_image", "savedmodel_decode_ms_per_image_untrained")
                      if key in results)
    rows = [
        ("serving_default, 1 image, median", f"{results['single_latency_ms_median']:.1f} ms"),
        ("serving_default, 1 image, p90", f"{results['single_latency_ms_p90']:.1f} ms"),
        ("caption_features, 1 row, median", f"{results['single_features_latency_ms_median']:.1f} ms"),
        (f"serving_default, batch {results['batch_size']}",
         f"{results['batch_seconds_median']:.3f} s = {results['batch_images_per_second']:.1f} images/s"),
        (f"caption_features, batch {results['batch_size']}",
         f"{results['batch_features_seconds_median']:.3f} s = {results['batch_features_rows_per_second']:.1f} rows/s"),
        (f"per image at batch {results['batch_size']}: image decoding + ResNet50",
         f"{results['savedmodel_encoder_ms_per_image']:.1f} ms"),
        (f"per image at batch {results['batch_size']}: beam search", f"{results[decode_key]:.1f} ms"),
        ("serving_default, 1 image from each of two threads at once",
         f"{results['savedmodel_two_callers_images_per_s']:.1f} images/s "
         f"(batch {results['batch_size']} / that = {results['savedmodel_batch16_vs_two_callers']:.3f})"),
        ("mean caption length", f"{results['mean_caption_words']:.1f} words"),
        (f"{results['serve_photo_pixels']} JPEG ({results['serve_photo_kb']} kB), SavedModel call",
         f"{results['serve_photo_direct_ms']:.0f} ms"),
        (f"{results['serve_photo_pixels']} JPEG, through serve",
         f"{results['serve_photo_http_ms']:.0f} ms = {results['serve_photo_overhead']:.3f}x"),
    ]
    if "savedmodel_latency_ms_unfolded" in results:
        rows += [
            ("plain Keras encoder (before folding): 1 image, median",
             f"{results['savedmodel_latency_ms_unfolded']:.1f} ms "
             f"(folded/plain {results['savedmodel_latency_folded_vs_unfolded']:.3f})"),
            (f"plain Keras encoder (before folding): batch {results['batch_size']}",
             f"{results['savedmodel_batch16_images_per_s_unfolded']:.1f} images/s "
             f"(folded/plain {results['savedmodel_batch16_folded_speedup']:.3f})"),
        ]
    if "savedmodel_decode_ms_per_image_trained" in results:
        rows.append((f"trained demo decoder, beam {results['trained_beam_size']}: beam search per image",
                     f"{results['savedmodel_decode_ms_per_image_trained']:.1f} ms "
                     f"({results['trained_mean_caption_words']:.1f} words)"))
    print(f"model {results['model_dir']}  beam {results['beam_size']}  max_length {results['max_length']}  "
          f"cpus {results['cpu_count']}  tensorflow {results['tensorflow_version']}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


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
        unfolded_dir = None
        if args.synthetic:
            *inputs, unfolded_dir = synthetic_export(temporary, args.beam_size or 3)
        else:
            if args.fresh or not (out_dir / "decoder.keras").is_file():
                out_dir = _fresh_run(temporary)
            elif args.export or not (out_dir / "saved_model" / "saved_model.pb").is_file():
                from pipeline import export

                export.run_export(out_dir, {"decode.beam_size": args.beam_size})
            inputs = _run_inputs(out_dir)
        results = measure(*inputs, args.repeats, args.batch_repeats, unfolded_dir)
    print_table(results)
    if args.json:
        io_utils.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
