"""The first request to a fresh `serve`, with and without the export's warm-up requests.

    python -m benchmarks.bench_warmup [--out OUT] [--rounds 3] [--quick] [--json FILE]

Two copies of one SavedModel: one with `assets.extra/tf_serving_warmup_requests` (as
`export` writes it), one without. Each round starts `run_pipeline.py serve` on each copy (the
order alternating between rounds), waits until it says it is serving (after the warm-up, if
any), then times its first predict request (one image, REST) and the second one. Reports
  - `serve_first_request_ms_warm`, `serve_first_request_ms_cold`: the first request's
    latency, median over rounds, with and without the warm-up file,
  - `serve_first_request_cold_vs_warm`: their ratio (how many times longer the first user
    waits without warm-up), with its rounds in `rounds_serve_first_request_cold_vs_warm`,
  - `serve_second_request_ms`: the steady state (both servers' second requests, median),
  - `serve_start_seconds_warm`, `serve_start_seconds_cold`: process start to serving, median.

OUT is a trained run with `saved_model/` (default artifacts/demo); without one, the
synthetic export of `benchmarks.bench_serving` is used.
"""

import argparse
import http.client
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import bench_load, timing, workloads
from pipeline.core import io_utils


def _model_copies(model_dir, folder):
    """{"warm": SavedModel folder with the warm-up file, "cold": the same without it}."""
    from pipeline.serving import warmup

    copies = {name: Path(folder) / name for name in ("warm", "cold")}
    for copy in copies.values():
        shutil.copytree(model_dir, copy)
    warmup.write_warmup_file(copies["warm"], "captioner")  # what export writes (the demo export may predate it)
    warmup.warmup_path(copies["cold"]).unlink(missing_ok=True)
    return copies


def _timed_post(server, body):
    """Milliseconds (float) one predict request takes, on a new connection; RuntimeError unless answered 200."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=bench_load.REQUEST_TIMEOUT_SECONDS)
    try:
        sent = time.perf_counter()
        status, answer, _ = bench_load.post(connection, body)
        elapsed = (time.perf_counter() - sent) * 1000.0
    finally:
        connection.close()
    if status != 200:
        raise RuntimeError(f"predict answered {status}: {answer}")
    return elapsed


def first_requests(model_dir, image, rounds):
    """{"warm"/"cold": [(start seconds, first ms, second ms) per round]} of fresh servers on
    the two copies, `timing.in_alternating_rounds`."""
    body = bench_load.image_body([image])

    def fresh_server(name):
        started = time.perf_counter()
        with bench_load.ServerProcess(copies[name]) as server:
            start_seconds = time.perf_counter() - started
            first = _timed_post(server, body)
            second = _timed_post(server, body)
            if server.stop() != 0:
                raise RuntimeError(f"the {name} server exited with {server.process.returncode}")
        print(f"  {name}: serving after {start_seconds:.1f} s, first request {first:.0f} ms, "
              f"second {second:.0f} ms", file=sys.stderr, flush=True)
        return start_seconds, first, second

    with tempfile.TemporaryDirectory(prefix="bench_warmup_") as folder:
        copies = _model_copies(model_dir, folder)
        return timing.in_alternating_rounds({name: (lambda name=name: fresh_server(name)) for name in ("warm", "cold")},
                                            rounds)


def summary(timings):
    """The figures (dict) of `first_requests`' timings."""
    def median(name, column):
        return statistics.median(row[column] for row in timings[name])

    ratios = [cold[1] / warm[1] for warm, cold in zip(timings["warm"], timings["cold"])]
    return {
        "serve_first_request_ms_warm": round(median("warm", 1), 1),
        "serve_first_request_ms_cold": round(median("cold", 1), 1),
        "serve_first_request_cold_vs_warm": round(statistics.median(ratios), 2),
        "rounds_serve_first_request_cold_vs_warm": [round(ratio, 2) for ratio in ratios],
        "serve_second_request_ms": round(statistics.median(row[2] for rows in timings.values() for row in rows), 1),
        "serve_start_seconds_warm": round(median("warm", 0), 2),
        "serve_start_seconds_cold": round(median("cold", 0), 2),
    }


def run(quick=False, out_dir="artifacts/demo", rounds=None):
    """The suite's entry point; returns the results (dict)."""
    rounds = rounds or (2 if quick else 3)
    with tempfile.TemporaryDirectory(prefix="bench_warmup_model_") as folder:
        model_dir, images = workloads.saved_model_and_images(out_dir, folder)
        results = summary(first_requests(model_dir, images[0], rounds))
    results.update({"serve_warmup_rounds": rounds, "model_dir": str(model_dir)})
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="artifacts/demo", help="trained run with saved_model/ (else synthetic)")
    parser.add_argument("--rounds", type=int, default=None, help="server starts per copy (default 3, --quick 2)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, out_dir=args.out, rounds=args.rounds)
    print(f"first request to a fresh server: {results['serve_first_request_ms_cold']:.0f} ms without warm-up, "
          f"{results['serve_first_request_ms_warm']:.0f} ms with it: {results['serve_first_request_cold_vs_warm']:.2f}x "
          f"(rounds {results['rounds_serve_first_request_cold_vs_warm']}); "
          f"second request {results['serve_second_request_ms']:.0f} ms")
    print(f"serving after {results['serve_start_seconds_cold']:.1f} s without warm-up, "
          f"{results['serve_start_seconds_warm']:.1f} s with it (the replay is done before)")
    if args.json:
        io_utils.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
