"""What each device does for each stage: the rows to read the day a GPU is at hand.

    python -m benchmarks.bench_gpu [--quick] [--xla] [--json FILE]

Per device TensorFlow lists (the CPU always, then every GPU), with the figures of one
device measured side by side in alternating rounds:

- extraction: images/s of the folded ResNet50 (random weights, 224 px, extraction's own
  batch for the device, `device.EXTRACTION_BATCH`, pixels already decoded) at fp32 and at the device's 16-bit
  precision (bf16 on a CPU with bf16 instructions, fp16 on a GPU); with `--xla` (the
  default on a GPU) each again compiled by XLA (`jit_compile`);
- decoder training: captions/s of `train`'s compiled decoder (`train.precision` fp32 against
  bf16 on a CPU, fp16 on a GPU) at Flickr8k size: 30,000 synthetic captions over ~3,000
  words, 512 units, batches of 128 (`benchmarks.workloads.flickr8k_sized_cache`);
- fine-tuning: captions/s of `finetune`'s step (sampling, CIDEr-D, update; `finetune.precision`
  likewise) on the same cache with the default settings (`benchmarks.bench_finetune`);
- SavedModel: images/s of `serving_default` (random encoder, untrained Flickr8k-sized
  decoder, beam 3) on 500x375 JPEGs at batch 1, 16 and 64, decoding included.

And once for the machine: images/s one CPU core decodes for extraction (extraction's own
input pipeline, CPU seconds per image), and from it the cores that keep each device's
best extraction rate fed. Without a GPU, the GPU section says so plainly (and names the
NVIDIA GPUs the operating system shows, if TensorFlow cannot use them).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import timing
from pipeline.core import io_utils

IMAGE_SIZE = 224
SAVEDMODEL_BATCHES = (1, 16, 64)
TRAIN_BATCH = 128
TRAIN_UNITS, TRAIN_EMBEDDING = 512, 256
DECODE_IMAGES = 64
DECODE_BATCH = 32


def devices():
    """[(kind "CPU"/"GPU", TensorFlow device name "/CPU:0", "/GPU:0", ...)]: the CPU, then each GPU."""
    import tensorflow as tf

    return [("CPU", "/CPU:0")] + [("GPU", f"/GPU:{index}")
                                  for index, _ in enumerate(tf.config.list_physical_devices("GPU"))]


def sixteen_bit_precision(kind):
    """The 16-bit precision worth measuring on a device kind, or None (a CPU without bf16 instructions)."""
    from pipeline.core import device

    if kind == "GPU":
        return "fp16"
    return "bf16" if device.cpu_flags() & set(device.BF16_CPU_FLAGS) else None


def extraction_rows(kind, device_name, xla, repeats):
    """{"fp32": images/s, "bf16"/"fp16": ..., "fp32_xla": ..., ...} of the encoder alone on `device_name`."""
    import tensorflow as tf

    from models import encoder
    from pipeline.core import device

    batch = device.EXTRACTION_BATCH[kind]
    precisions = ["fp32"] + [precision for precision in [sixteen_bit_precision(kind)] if precision]
    functions = {}
    with tf.device(device_name):
        pixels = tf.random.stateless_uniform([batch, IMAGE_SIZE, IMAGE_SIZE, 3], seed=[0, 1], maxval=255.0)
        for precision in precisions:
            model = encoder.build_encoder(None, IMAGE_SIZE, seed=0, precision=precision)
            for compiled in ([False, True] if xla else [False]):
                function = tf.function(lambda images, model=model: model(images, training=False), jit_compile=compiled)
                name = precision + ("_xla" if compiled else "")
                functions[name] = lambda function=function: function(pixels).numpy()
        print(f"{device_name} extraction, batch {batch}: {', '.join(functions)}", file=sys.stderr)
        seconds = timing.time_alternately(functions, repeats, warmup=1)
    return {name: round(batch / statistics.median(values), 2) for name, values in seconds.items()}


def decode_per_core(repeats):
    """Images/s one CPU core decodes (500x375 JPEGs -> 224 px float32), as extraction's input pipeline runs."""
    import numpy as np

    from benchmarks import photos
    from pipeline import extract

    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        names = [f"photo_{index:03d}.jpg" for index in range(DECODE_IMAGES)]
        for name in names:
            (Path(folder) / name).write_bytes(photos.photo_jpeg(500, 375, rng))
        passes = []
        for _ in range(max(2, repeats // 2)):
            started = time.process_time()
            for _ids, _images in extract.image_dataset(folder, names, IMAGE_SIZE, DECODE_BATCH):
                pass
            passes.append((time.process_time() - started) / len(names))
    return round(1.0 / min(passes), 2)


def training_rows(kind, device_name, batches, repeats):
    """{"fp32": captions/s, "bf16"/"fp16": ...} of `train`'s compiled decoder at Flickr8k size on `device_name`."""
    import keras
    import tensorflow as tf

    from benchmarks import workloads
    from pipeline.core import config as config_module
    from pipeline.training import inputs, objective

    features, rows, token_rows = workloads.flickr8k_sized_cache()
    split = inputs.CaptionSplit(rows, token_rows, images=len(features))
    precisions = ["fp32"] + [precision for precision in [sixteen_bit_precision(kind)] if precision]
    functions = {}
    with tf.device(device_name):
        dataset = inputs.make_training_dataset(split, inputs.InMemoryFeatures(features), TRAIN_BATCH, shuffle_seed=0)
        for precision in precisions:
            keras.utils.set_random_seed(0)
            config = config_module.PipelineConfig().replace({
                "decoder.units": TRAIN_UNITS, "decoder.embedding_dim": TRAIN_EMBEDDING, "train.batch_size": TRAIN_BATCH,
                "train.precision": precision})
            model = objective.build_model(config, workloads.VOCABULARY_WORDS, workloads.FEATURE_DIM)
            functions[precision] = lambda model=model: model.fit(dataset, steps_per_epoch=batches, epochs=1, verbose=0)
        print(f"{device_name} decoder training, {batches} batches of {TRAIN_BATCH}: {', '.join(functions)}",
              file=sys.stderr)
        seconds = timing.time_alternately(functions, repeats, warmup=1)
    return {name: round(batches * TRAIN_BATCH / statistics.median(values), 1) for name, values in seconds.items()}


def finetune_rows(kind, device_name, steps, repeats):
    """{"fp32": captions/s, "bf16"/"fp16": ...} of `finetune`'s step (`scst.Stepper`) at Flickr8k size
    on `device_name`."""
    import tensorflow as tf

    from benchmarks import bench_finetune

    precisions = ["fp32"] + [precision for precision in [sixteen_bit_precision(kind)] if precision]
    functions, captions = {}, {}
    with tf.device(device_name):
        for precision in precisions:
            stepper = bench_finetune.flickr8k_stepper(precision)
            captions[precision] = steps * stepper.settings.batch_size * stepper.settings.samples
            functions[precision] = lambda run_step=stepper.run: [run_step(step) for step in range(steps)]
        print(f"{device_name} fine-tuning, {steps} steps: {', '.join(functions)}", file=sys.stderr)
        seconds = timing.time_alternately(functions, repeats, warmup=1)
    return {name: round(captions[name] / statistics.median(values), 1) for name, values in seconds.items()}


def savedmodel_rows(model_dir, images, device_name, repeats):
    """{"batch_1": images/s, "batch_16": ..., "batch_64": ...} of serving_default on `device_name`."""
    import tensorflow as tf

    with tf.device(device_name):
        serve = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
        functions = {}
        for batch in SAVEDMODEL_BATCHES:
            batch_images = tf.constant((images * (batch // len(images) + 1))[:batch])
            functions[f"batch_{batch}"] = (
                lambda batch_images=batch_images: serve(images=batch_images)["captions"].numpy())
        print(f"{device_name} SavedModel: {', '.join(functions)}", file=sys.stderr)
        seconds = timing.time_alternately(functions, repeats, warmup=1)
    return {name: round(int(name.split("_")[1]) / statistics.median(values), 2) for name, values in seconds.items()}


def run(quick=False, xla=None):
    """Runs every row on every device present; returns the results dict (see the module docstring).

    quick: fewer rounds and training batches. xla: also time the encoder compiled by XLA
    (None: on a GPU only, where it can pay for its compile time).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from benchmarks import bench_serving
    from pipeline.core import console, device

    repeats = 3 if quick else 5
    train_batches = 12 if quick else 40
    finetune_steps = 4 if quick else 12
    gpu_warning = device.unusable_gpu_warning()
    results = {
        "mode": "quick" if quick else "full",
        "machine": {"cpu": device.device_record("fp32").removesuffix(" (fp32)"),
                    "tensorflow_gpus": device.gpu_names(), "os_nvidia_gpus": console.machine_nvidia_gpus()},
        "decode_images_per_s_per_core": decode_per_core(repeats),
    }
    if not results["machine"]["tensorflow_gpus"]:
        results["gpu"] = "no GPU: TensorFlow lists none" + (f" ({gpu_warning})" if gpu_warning else "")
    with tempfile.TemporaryDirectory() as folder:
        model_dir, images, *_ = bench_serving.synthetic_export(folder)
        for kind, device_name in devices():
            started = time.monotonic()
            row = {"extract_images_per_s": extraction_rows(kind, device_name, kind == "GPU" if xla is None else xla,
                                                           repeats),
                   "train_captions_per_s": training_rows(kind, device_name, train_batches, repeats),
                   "finetune_captions_per_s": finetune_rows(kind, device_name, finetune_steps, repeats),
                   "savedmodel_images_per_s": savedmodel_rows(model_dir, images, device_name, repeats)}
            extraction = row["extract_images_per_s"]
            training = row["train_captions_per_s"]
            mixed = [name for name in training if name != "fp32"]
            row["train_mixed_speedup"] = round(training[mixed[0]] / training["fp32"], 3) if mixed else None
            finetuning = row["finetune_captions_per_s"]
            row["finetune_mixed_speedup"] = round(finetuning[mixed[0]] / finetuning["fp32"], 3) if mixed else None
            row["extract_16bit_speedup"] = (round(max(value for name, value in extraction.items() if name[:4] != "fp32")
                                                  / extraction["fp32"], 3) if len(extraction) > 1 else None)
            row["decode_cores_to_feed_best_extraction"] = round(
                max(extraction.values()) / results["decode_images_per_s_per_core"], 2)
            row["seconds"] = round(time.monotonic() - started, 1)
            results[device_name.strip("/").replace(":", "")] = row
    return results


def print_table(results):
    """The results as aligned text lines (stdout)."""
    print(f"machine: {results['machine']['cpu']}; TensorFlow GPUs: {results['machine']['tensorflow_gpus'] or 'none'}")
    print(f"decoding for extraction: {results['decode_images_per_s_per_core']:.1f} images/s per CPU core")
    for key, row in results.items():
        if not isinstance(row, dict) or "extract_images_per_s" not in row:
            continue
        print(f"\n{key}:")
        for section in ("extract_images_per_s", "train_captions_per_s", "finetune_captions_per_s",
                        "savedmodel_images_per_s"):
            print(f"  {section:28s} " + ", ".join(f"{name} {value:.1f}" for name, value in row[section].items()))
        for name in ("extract_16bit_speedup", "train_mixed_speedup", "finetune_mixed_speedup",
                     "decode_cores_to_feed_best_extraction"):
            print(f"  {name:38s} {row[name]}")
    if "gpu" in results:
        print(f"\nGPU: {results['gpu']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and training batches")
    parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the encoder compiled by XLA (default: on a GPU only)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = run(args.quick, args.xla)
    print_table(results)
    if args.json:
        io_utils.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    from pipeline.core import console

    console.quiet_tensorflow_logs()
    sys.exit(main())
