"""The benchmark suite: every benchmark of the project, in one run, as one JSON object.

    python -m benchmarks --quick --json benchmarks.json

Each benchmark runs in a fresh subprocess (its own TensorFlow threads and memory), one
after the other so they do not compete for the CPU; the figures that are compared with
each other (extract against its bound, training against the per-prefix baseline, bf16
against fp32, ...) are measured side by side inside one benchmark, so ratios hold on a
noisy machine even when absolute speeds do not. Prints a table with the targets.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.core import io_utils

# benchmark module -> what it measures
BENCHMARKS = {
    "bench_extract": "stage 1: extract vs the bare model, plain Keras, the GEMM limit and the naive loop; bf16 vs fp32",
    "bench_train": "stage 2: teacher forcing vs the per-prefix merge model",
    "bench_serving": "SavedModel latency, folded and plain encoder; encoder and beam-search ms per image",
    "bench_finetune": "self-critical fine-tuning: cost per epoch on Flickr8k-sized data, CIDEr-D reward speed",
    "bench_memory": "training peak memory on a small and a 20x larger cache",
    "bench_validation": "stage 2: the share of validation (val loss, greedy captions, CIDEr-D) in training",
    "bench_load": "HTTP server under load: batching against --max-batch-size 1 and one call at a time, latency, memory",
    "bench_warmup": "the first request to a fresh server, with and without the export's warm-up requests",
    "bench_multiworker": "two-worker train and finetune on loopback beside one process: epoch time, weight agreement",
    "bench_scale": "every stage at two dataset sizes (Karpathy-format, 32 px images): per-item cost growth, start-up, peak memory",
}

# figure -> (target description, test on the value or None)
TARGETS = {
    "extract_images_per_s": ("", None),
    "extract_bf16_images_per_s": ("", None),
    "extract_bound_images_per_s": ("", None),
    "extract_keras_images_per_s": ("", None),
    "extract_gemm_limit_images_per_s": ("", None),
    "extract_bf16_gemm_limit_images_per_s": ("", None),
    "extract_naive_images_per_s": ("", None),
    "extract_vs_bound": (">= 0.85", lambda value: value >= 0.85),
    "extract_vs_keras": (">= 1.10", lambda value: value >= 1.10),
    "extract_vs_gemm_limit": (">= 0.80", lambda value: value >= 0.80),
    "extract_vs_naive": (">= 3", lambda value: value >= 3),
    "extract_bf16_speedup": (">= 1.4", lambda value: value >= 1.4),
    "extract_bf16_vs_keras_fp32": (">= 1.8", lambda value: value >= 1.8),
    "extract_bf16_vs_gemm_limit": (">= 0.70", lambda value: value >= 0.70),
    "extract_folded_cosine": (">= 0.99999", lambda value: value >= 0.99999),
    "extract_bf16_cosine": (">= 0.99", lambda value: value >= 0.99),
    "train_captions_per_s": ("", None),
    "train_prefix_baseline_captions_per_s": ("", None),
    "train_speedup": (">= 10", lambda value: value >= 10),
    "finetune_captions_per_s": ("", None),
    "finetune_reward_captions_per_s": ("", None),
    "finetune_epoch_minutes_flickr8k": ("", None),
    "sampling_share_of_step": ("", None),
    "savedmodel_latency_ms": ("", None),
    "savedmodel_latency_ms_unfolded": ("", None),
    "savedmodel_batch16_images_per_s": ("", None),
    "savedmodel_batch16_images_per_s_unfolded": ("", None),
    "savedmodel_two_callers_images_per_s": ("", None),
    "savedmodel_batch16_vs_two_callers": ("", None),
    "savedmodel_encoder_ms_per_image": ("", None),
    "savedmodel_decode_ms_per_image_untrained": ("", None),
    "savedmodel_decode_ms_per_image_trained": ("", None),
    "serve_photo_overhead": ("< 1.4", lambda value: value < 1.4),
    "validation_greedy_share": ("<= 0.10", lambda value: value <= 0.10),
    "validation_share": ("", None),
    "train_peak_rss_mb_small": ("", None),
    "train_peak_rss_mb_large": ("", None),
    "train_peak_rss_ratio": ("< 1.3", lambda value: value < 1.3),
    "serve_images_per_s": ("", None),
    "serve_unbatched_images_per_s": ("", None),
    "serve_batching_speedup": (">= 1.4", lambda value: value >= 1.4),
    "serve_model_batching_gain": ("", None),
    "serve_mean_batch_size": ("", None),
    "serve_p50_ms": ("", None),
    "serve_unbatched_p50_ms": ("", None),
    "serve_batching_p50_ratio": ("<= 1", lambda value: value <= 1.0),
    "serve_one_at_a_time_images_per_s": ("", None),
    "serve_vs_one_at_a_time_speedup": ("", None),
    "serve_vs_one_at_a_time_p50_ratio": ("", None),
    "serve_p99_ms": ("", None),
    "serve_unbatched_p99_ms": ("", None),
    "serve_grpc_images_per_s": ("", None),
    "serve_grpc_p50_ms": ("", None),
    "serve_grpc_vs_rest_images_per_s": ("", None),
    "serve_failed_good": ("== 0", lambda value: value == 0),
    "serve_rss_growth": ("< 0.10", lambda value: value < 0.10),
    "serve_first_request_ms_cold": ("", None),
    "serve_first_request_ms_warm": ("", None),
    "serve_first_request_cold_vs_warm": ("> 1", lambda value: value > 1.0),
    "one_process_epoch_seconds": ("", None),
    "multiworker_epoch_seconds": ("", None),
    "multiworker_epoch_ratio": ("", None),
    "multiworker_weight_difference": ("< 1e-4", lambda value: value < 1e-4),
    "finetune_one_process_epoch_seconds": ("", None),
    "finetune_multiworker_epoch_seconds": ("", None),
    "finetune_multiworker_epoch_ratio": ("", None),
    "finetune_multiworker_weight_difference": ("< 1e-4", lambda value: value < 1e-4),
    "finetune_weight_change": ("", None),
    "scale_reward_setup_growth": ("<= 1.2", lambda value: value <= 1.2),
    "scale_extract_growth": ("", None),
    "scale_train_growth": ("", None),
    "scale_evaluate_growth": ("", None),
    "scale_verify_growth": ("", None),
    "scale_finetune_growth": ("", None),
    "scale_stages_growing": ("", None),
}


def _run_one(name, quick, json_path):
    """Child process: runs benchmarks.<name>.run(quick) and writes its dict as JSON."""
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    results = module.run(quick=quick)
    io_utils.write_json(json_path, results, default=float)


def run_suite(names, quick):
    """Runs the named benchmarks one after another; returns {"figures", "runs"}."""
    figures, runs = {}, {}
    environment = dict(os.environ)
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in names:
        print(f"== {name}: {BENCHMARKS[name]}", flush=True)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="captioner_bench_") as folder:
            json_path = Path(folder) / "result.json"
            command = [sys.executable, "-m", "benchmarks", "--run-one", name, "--child-json", str(json_path)]
            if quick:
                command.append("--quick")
            completed = subprocess.run(command, env=environment)
            seconds = time.monotonic() - started
            if completed.returncode != 0 or not json_path.exists():
                runs[name] = {"seconds": seconds, "error": f"exit code {completed.returncode}"}
                print(f"   {name} failed (exit code {completed.returncode})", flush=True)
                continue
            results = json.loads(json_path.read_text())
        runs[name] = {"seconds": round(seconds, 1), "results": results}
        figures.update({key: value for key, value in results.items() if key in TARGETS})
        print(f"   {name}: {seconds:.0f} s", flush=True)
    return {"figures": figures, "runs": runs}


def format_table(figures):
    lines = [f"{'figure':<40} {'value':>12}  {'target':<10} verdict"]
    for key, (target, test) in TARGETS.items():
        if key not in figures:
            continue
        value = figures[key]
        verdict = "" if test is None else ("meets" if test(value) else "MISSES")
        # Cosines are judged in their sixth decimal, everything else in its third.
        shown = (f"{value:.7f}" if key.endswith("cosine") else f"{value:.3f}") if isinstance(value, float) else str(value)
        lines.append(f"{key:<40} {shown:>12}  {target:<10} {verdict}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short form (a few minutes in all)")
    parser.add_argument("--json", help="write the figures and every benchmark's full results here")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run these benchmarks only")
    parser.add_argument("--run-one", choices=sorted(BENCHMARKS), help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        _run_one(args.run_one, args.quick, args.child_json)
        return 0

    started = time.monotonic()
    report = run_suite(args.only or list(BENCHMARKS), args.quick)
    report.update({
        "quick": args.quick,
        "seconds": round(time.monotonic() - started, 1),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    })
    print()
    print(format_table(report["figures"]))
    print(f"\n{len(report['runs'])} benchmarks in {report['seconds']:.0f} s "
          f"(load average at the end {report['load_average_at_end'][0]:.1f} on {os.cpu_count()} cores)")
    if args.json:
        io_utils.write_json(args.json, report, default=float)
    failed = [name for name, run in report["runs"].items() if "error" in run]
    return 1 if failed else 0


if __name__ == "__main__":
    from pipeline.core import console

    # As run_pipeline.py does: TensorFlow's C++ start-up lines (which read like failures)
    # are filtered out of stderr, for this process and the benchmarks it starts.
    console.quiet_tensorflow_logs()
    sys.exit(main())
