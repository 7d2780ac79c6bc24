"""The HTTP server under load: throughput, latency, correctness and memory with concurrent clients.

    python -m benchmarks.bench_load [--out OUT] [--requests 1000] [--rounds 2] [--quick] [--json FILE]

Starts three `run_pipeline.py serve` subprocesses on one model (so each one's resident memory
is its own, read with psutil from its pid): one with the default server-side batching, one
with `--max-batch-size 1` (batching off, the same batch threads), and one with
`--max-batch-size 1 --num-batch-threads 1` (one model call at a time: the server before
batching). Each round sends the same requests to each server in turn (the order rotating
between rounds), from 8 client threads, one image per request through `serving_default`, a
tenth of them malformed, and reports for each:
  - `serve_p50_ms`, `serve_p99_ms` (batching), `serve_unbatched_p50_ms`, ... and
    `serve_one_at_a_time_p50_ms`, ...: latency of the good requests as clients see it,
    queueing included, over all rounds,
  - `serve_images_per_s`, `serve_unbatched_images_per_s`, `serve_one_at_a_time_images_per_s`:
    good requests answered per second of load (the malformed tenth included in the time);
    `serve_batching_speedup` (batching against batching off, target >= 1.4) with
    `serve_batching_p50_ratio` (<= 1), and `serve_vs_one_at_a_time_speedup` with
    `serve_vs_one_at_a_time_p50_ratio` (the default server against one call at a time),
  - `serve_mean_batch_size`: images per SavedModel call of the batching server (its metrics),
  - `serve_requests`, `serve_failed_good` (good requests without a 200 and their expected
    caption, both servers), `serve_wrong_bad` (bad ones without a 4xx and a JSON error),
  - `serve_rss_growth`: mean server RSS over the last quarter of a round / first quarter - 1,
    the largest over rounds and servers.
The batching server also takes each round's load over gRPC (`grpc_load`: TF Serving's client,
the same plan with gRPC's malformed requests), in the rotation: `serve_grpc_images_per_s`,
`serve_grpc_p50_ms`, ... beside REST's, and `serve_grpc_vs_rest_images_per_s`; its failures and
RSS count in `serve_failed_good`, `serve_wrong_bad` and `serve_rss_growth`.
Then, with the servers stopped, `serve_model_batching_gain`: the same SavedModel called
directly in the best groupings 8 one-image clients can form (their 8 images spread over
the batch threads, or all 8 in one call on one thread) against one image a call on every
batch thread (`serve_model_*_images_per_s`, in alternating rounds): what batching gains
in the model itself on this machine, so how much of the 1.4 target there is to take.
The expected caption of each input is the batching server's own answer in a sequential
warm-up, so the load checks that neither concurrency nor batching changes an answer.

OUT is a trained run with `saved_model/` (default artifacts/demo, made by `python
run_pipeline.py`); without one, the synthetic export of `benchmarks.bench_serving` is used.
`tests/test_load.py` drives the same machinery with mostly cheap feature requests.
"""

import argparse
import base64
import contextlib
import dataclasses
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import timing, workloads
from pipeline.core import io_utils

REPOSITORY = Path(__file__).resolve().parents[1]
PREDICT = "/v1/models/captioner:predict"
CLIENTS = 8
BAD_FRACTION = 10  # every tenth request is malformed
SERVER_START_SECONDS = 120
RSS_SAMPLE_SECONDS = 0.05
REQUEST_TIMEOUT_SECONDS = 120


@dataclasses.dataclass
class LoadRequest:
    """One request of the load: `body` (bytes) to POST to predict and what must come back.

    `captions` (list of str) for a good request (status 200, these captions in order);
    None for a malformed one (any 4xx with a JSON object `{"error": str}`).
    """

    kind: str
    body: bytes
    captions: list = None


@dataclasses.dataclass
class LoadResult:
    """What `run_load` saw: per-request outcomes and the server's RSS samples."""

    latencies_ms: list  # of the good requests that succeeded
    failed_good: list  # (index, kind, reason)
    wrong_bad: list  # (index, kind, reason)
    rss_samples: list  # (seconds since start, bytes)
    seconds: float

    def rss_growth(self):
        """Mean RSS of the last quarter of the run / mean of the first quarter - 1 (float)."""
        quarter = self.seconds / 4
        first = [rss for moment, rss in self.rss_samples if moment <= quarter]
        last = [rss for moment, rss in self.rss_samples if moment >= self.seconds - quarter]
        if not first or not last:
            raise RuntimeError(f"too few RSS samples ({len(self.rss_samples)}) in a {self.seconds:.2f} s run")
        return statistics.mean(last) / statistics.mean(first) - 1.0


class ServerProcess:
    """`run_pipeline.py serve` on a free port, in a subprocess; a context manager.

    `host` None leaves the command's default (loopback), which the tests check; `extra_args`
    (list of str) are more `serve` flags. `output` collects the server's stdout lines. gRPC
    listens on a free port too (`grpc_port`), so servers side by side do not compete for 8500.
    """

    def __init__(self, model_dir, max_body_mb=16.0, max_images=32, host=None, extra_args=()):
        command = [sys.executable, str(REPOSITORY / "run_pipeline.py"), "serve", "--model", str(model_dir),
                   "--port", "0", "--grpc-port", "0", "--max-body-mb", str(max_body_mb),
                   "--max-images", str(max_images),
                   *extra_args]
        if host is not None:
            command += ["--host", host]
        self.output = []
        self.grpc_port = None
        environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        # The server logs a line per request on stderr: to a file, so a full pipe never blocks it.
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=self._log,
                                        env=environment, text=True)
        self.host, self.port = self._wait_for_url()

    def _wait_for_url(self):
        # run_serve prints "  upload page: http://127.0.0.1:PORT/" once it is listening.
        timer = threading.Timer(SERVER_START_SECONDS, self.process.kill)
        timer.start()
        try:
            for line in self.process.stdout:
                self.output.append(line)
                if line.startswith("  grpc:"):  # "  grpc:        127.0.0.1:PORT  ...", before the page's line
                    self.grpc_port = int(line.split()[1].rsplit(":", 1)[1])
                if "upload page:" in line:
                    address = line.split("http://", 1)[1].strip().rstrip("/")
                    host, port = address.rsplit(":", 1)
                    threading.Thread(target=self._collect_output, daemon=True).start()
                    return host, int(port)
        finally:
            timer.cancel()
        self.stop()
        raise RuntimeError(f"the server did not start (exit code {self.process.poll()}): {''.join(self.output)}"
                           f"{self.log_text()[-2000:]}")

    def _collect_output(self):
        for line in self.process.stdout:  # also keeps the pipe from filling
            self.output.append(line)

    def rss(self):
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def log_text(self):
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def stop(self):
        """Ctrl-C (SIGINT), as a user stops it; kills it if it has not exited 30 s later. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()
        self._log.close()
        return False


def b64(image_bytes):
    return base64.b64encode(image_bytes).decode("ascii")


def image_body(images):
    """Predict body (bytes) of a `serving_default` request for `images` (list of bytes)."""
    return json.dumps({"instances": [{"b64": b64(image)} for image in images]}).encode()


def features_body(rows):
    """Predict body (bytes) of a `caption_features` request for `rows` (list of 2048 floats each)."""
    return json.dumps({"signature_name": "caption_features", "instances": [list(map(float, row)) for row in rows]}).encode()


def malformed_requests(valid_image, max_images, max_body_bytes):
    """One LoadRequest of each kind of malformed predict request (list), `captions` None."""
    return [
        LoadRequest("bad-json", b'{"instances": [{"b64": '),
        LoadRequest("bad-base64", json.dumps({"instances": [{"b64": "@@ not base64 @@"}]}).encode()),
        LoadRequest("not-an-image", image_body([b"plain text, not an image at all"])),
        LoadRequest("missing-instances", json.dumps({"signature_name": "serving_default"}).encode()),
        LoadRequest("too-many-instances", image_body([valid_image] * (max_images + 1))),
        LoadRequest("oversized-body", b" " * (max_body_bytes + 1)),
    ]


def plan(good, bad, total):
    """`total` requests cycling through `good`, with every BAD_FRACTION-th one taken from `bad` instead."""
    requests = []
    for index in range(total):
        if index % BAD_FRACTION == BAD_FRACTION - 1:
            requests.append(bad[(index // BAD_FRACTION) % len(bad)])
        else:
            requests.append(good[index % len(good)])
    return requests


def post(connection, body):
    """(status, parsed JSON or None, whether the server closes the connection) of one predict POST."""
    connection.request("POST", PREDICT, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    try:
        answer = json.loads(payload)
    except ValueError:
        answer = None
    return response.status, answer, response.will_close


def check(request, status, answer):
    """Why the answer is wrong for `request` (str), or None if it is right."""
    if request.captions is None:
        if not 400 <= status < 500:
            return f"status {status}, expected a 4xx"
        if not isinstance(answer, dict) or set(answer) != {"error"} or not isinstance(answer["error"], str):
            return f"answer {str(answer)[:200]} is not {{'error': str}}"
        return None
    if status != 200:
        return f"status {status}: {str(answer)[:300]}"
    try:
        captions = [prediction["caption"] for prediction in answer["predictions"]]
    except (TypeError, KeyError):
        return f"malformed answer {str(answer)[:300]}"
    if captions != request.captions:
        return f"captions {captions} != expected {request.captions}"
    return None


def drive_clients(server, requests, clients, client):
    """Runs `client(first, outcomes)` in `clients` threads, sampling `server`'s memory; a LoadResult.

    Client k sends requests k, k + clients, ... and sets `outcomes[index]` to
    (latency ms, reason it is wrong or None) for each. Shared by the REST and gRPC loads.
    """
    outcomes = [None] * len(requests)
    stop_sampling = threading.Event()
    samples = []
    started = time.perf_counter()

    def sample():
        while not stop_sampling.is_set():
            samples.append((time.perf_counter() - started, server.rss()))
            stop_sampling.wait(RSS_SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(first, outcomes), daemon=True) for first in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    stop_sampling.set()
    sampler.join()
    samples.append((seconds, server.rss()))
    latencies, failed_good, wrong_bad = [], [], []
    for index, (request, (latency, reason)) in enumerate(zip(requests, outcomes)):
        good = request.captions is not None
        if reason is not None:
            (failed_good if good else wrong_bad).append((index, request.kind, reason))
        elif good:
            latencies.append(latency)
    return LoadResult(latencies, failed_good, wrong_bad, samples, seconds)


def run_load(server, requests, clients=CLIENTS):
    """Sends `requests` (list of LoadRequest) to `server` (a ServerProcess) from `clients` threads.

    Client k sends requests k, k + clients, ... in order over one keep-alive connection
    (a new one after the server closes it). Returns a LoadResult.
    """

    def client(first, outcomes):
        connection = None
        for index in range(first, len(requests), clients):
            if connection is None:
                connection = http.client.HTTPConnection(server.host, server.port, timeout=REQUEST_TIMEOUT_SECONDS)
            sent = time.perf_counter()
            try:
                status, answer, closing = post(connection, requests[index].body)
            except (OSError, http.client.HTTPException) as error:
                outcomes[index] = (None, f"{type(error).__name__}: {error}")
                connection.close()
                connection = None
                continue
            outcomes[index] = ((time.perf_counter() - sent) * 1000.0, check(requests[index], status, answer))
            if closing:
                connection.close()
                connection = None
        if connection is not None:
            connection.close()

    return drive_clients(server, requests, clients, client)


def summary(result, requests):
    return {
        "serve_requests": len(requests),
        "serve_good_requests": sum(request.captions is not None for request in requests),
        "serve_failed_good": len(result.failed_good),
        "serve_wrong_bad": len(result.wrong_bad),
        "serve_p50_ms": round(timing.percentile(result.latencies_ms, 0.50), 2) if result.latencies_ms else None,
        "serve_p99_ms": round(timing.percentile(result.latencies_ms, 0.99), 2) if result.latencies_ms else None,
        "serve_rss_growth": round(result.rss_growth(), 4),
        "serve_rss_mb_end": round(result.rss_samples[-1][1] / 2**20, 1),
        "serve_seconds": round(result.seconds, 2),
        "serve_clients": CLIENTS,
        "cpu_count": os.cpu_count(),
    }


# name -> extra `serve` flags: the default batching, batching off (the same batch threads),
# and one model call at a time (the server before batching).
SERVERS = {"batched": [], "unbatched": ["--max-batch-size", "1"],
           "one_at_a_time": ["--max-batch-size", "1", "--num-batch-threads", "1"]}


def measure(model_dir, images, total_requests, rounds=2, max_images=4, max_body_mb=0.5):
    """Image-only load on each server of SERVERS, interleaved; returns the summary (dict)."""
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(ServerProcess(model_dir, max_body_mb, max_images, extra_args=flags))
                   for name, flags in SERVERS.items()}
        batched = servers["batched"]
        connection = http.client.HTTPConnection(batched.host, batched.port, timeout=REQUEST_TIMEOUT_SECONDS)
        good = []
        for image in images:  # one at a time: each input's expected caption
            status, answer, _ = post(connection, image_body([image]))
            if status != 200:
                raise RuntimeError(f"warm-up request failed with {status}: {answer}")
            good.append(LoadRequest("image", image_body([image]), [answer["predictions"][0]["caption"]]))
        connection.close()
        bad = malformed_requests(images[0], max_images, int(max_body_mb * 2**20))
        requests = plan(good, bad, total_requests)
        from benchmarks import grpc_load

        grpc_good = [grpc_load.good_request(image, request.captions[0]) for image, request in zip(images, good)]
        grpc_bad = grpc_load.malformed_requests(images[0], max_images, int(max_body_mb * 2**20))
        grpc_requests = plan(grpc_good, grpc_bad, total_requests)
        loads = {name: (lambda server=server: run_load(server, requests)) for name, server in servers.items()}
        loads["grpc"] = lambda: grpc_load.run_grpc_load(batched, grpc_requests)  # the batching server's gRPC port
        for server in servers.values():  # every batch size the load will make, before it is timed
            run_load(server, requests[:8 * CLIENTS])
        grpc_load.run_grpc_load(batched, grpc_requests[:8 * CLIENTS])
        results_by_server = {name: [] for name in loads}
        for round_index in range(rounds):
            shift = round_index % len(loads)
            for name in list(loads)[shift:] + list(loads)[:shift]:
                results_by_server[name].append(loads[name]())
        calls, instances = model_calls(batched)
        exit_codes = {name: server.stop() for name, server in servers.items()}
    results = _compare(results_by_server, requests)
    results.update(model_batching_gain(model_dir, images, rounds=GAIN_ROUNDS))
    results.update({"serve_exit_codes": exit_codes, "serve_rounds": rounds, "model_dir": str(model_dir),
                    "serve_model_calls": calls, "serve_mean_batch_size": round(instances / calls, 2)})
    return results


GAIN_IMAGES = 96  # per grouping and round (48 left rounds 0.94 to 1.41 apart)
GAIN_ROUNDS = 5


def groupings(threads):
    """{name: (calling threads, images a call)}: batching off on the servers' `threads` batch
    threads (one image a call each), and the best batches CLIENTS one-image clients can form:
    CLIENTS // threads on each thread, or all CLIENTS on one."""
    return {"unbatched": (threads, 1), "all_threads": (threads, max(1, CLIENTS // threads)),
            "one_thread": (1, CLIENTS)}


def model_batching_gain(model_dir, images, rounds):
    """What batching gains in the model call itself, with no server around it.

    Calls the SavedModel's `serving_default` directly, in this process, in each of the
    `groupings` of the servers' default batch threads (GAIN_IMAGES images each, the order
    reversed every other round), after the servers have stopped. Returns (dict)
    `serve_model_<grouping>_images_per_s` (medians) and `serve_model_batching_gain`: the
    median over rounds of the better batched grouping against batching off, with its
    rounds in `rounds_serve_model_batching_gain`. A server pays the same HTTP work per
    request either way, plus a little per model call (the batcher, the input tensor), which
    batching saves: `serve_batching_speedup` a little above this is that; below it, the
    server formed smaller batches than the clients allowed.
    """
    import tensorflow as tf

    from pipeline.serving import server as http_server

    function = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    images = tf.constant(images)
    plans = groupings(http_server.default_batch_threads())
    print(f"the SavedModel alone, {CLIENTS} clients' groupings {plans}:", file=sys.stderr, flush=True)
    rates = timing.in_alternating_rounds({
        name: (lambda callers=callers, batch=batch: timing.callers_images_per_s(
            function, images, callers, batch, calls=max(1, GAIN_IMAGES // (callers * batch))))
        for name, (callers, batch) in plans.items()}, rounds)
    gains = [max(threads, one) / unbatched for unbatched, threads, one in
             zip(rates["unbatched"], rates["all_threads"], rates["one_thread"])]
    figures = {f"serve_model_{name}_images_per_s": round(statistics.median(values), 2)
               for name, values in rates.items()}
    figures.update({"serve_model_batching_gain": round(statistics.median(gains), 3),
                    "rounds_serve_model_batching_gain": [round(value, 3) for value in gains]})
    return figures


def model_calls(server):
    """(SavedModel calls, instances in them) of `serving_default` so far, from the server's Prometheus page."""
    from prometheus_client import parser

    connection = http.client.HTTPConnection(server.host, server.port, timeout=REQUEST_TIMEOUT_SECONDS)
    try:
        connection.request("GET", "/monitoring/prometheus/metrics")
        text = connection.getresponse().read().decode("utf-8")
    finally:
        connection.close()
    values = {sample.name: sample.value for family in parser.text_string_to_metric_families(text)
              for sample in family.samples if sample.labels.get("signature") == "serving_default"}
    return int(values["captioner_batch_size_count"]), int(values["captioner_batch_size_sum"])


def _compare(results_by_server, requests):
    """The summary (dict) of LoadResults {server name: [one per round]} over the same `requests`."""
    figures = {}
    failures = []
    for name, round_results in results_by_server.items():
        latencies = [latency for result in round_results for latency in result.latencies_ms]
        seconds = sum(result.seconds for result in round_results)
        prefix = "serve_" if name == "batched" else f"serve_{name}_"
        figures[f"{prefix}p50_ms"] = round(timing.percentile(latencies, 0.50), 2) if latencies else None
        figures[f"{prefix}p99_ms"] = round(timing.percentile(latencies, 0.99), 2) if latencies else None
        figures[f"{prefix}images_per_s"] = round(len(latencies) / seconds, 2)
        figures[f"{prefix}round_images_per_s"] = [round(len(result.latencies_ms) / result.seconds, 2)
                                                  for result in round_results]
        for result in round_results:
            failures += [[name, *failure] for failure in result.failed_good + result.wrong_bad]
    all_results = [result for round_results in results_by_server.values() for result in round_results]
    figures.update({
        "serve_batching_speedup": round(figures["serve_images_per_s"] / figures["serve_unbatched_images_per_s"], 3),
        "serve_batching_p50_ratio": round(figures["serve_p50_ms"] / figures["serve_unbatched_p50_ms"], 3),
        "serve_vs_one_at_a_time_speedup": round(
            figures["serve_images_per_s"] / figures["serve_one_at_a_time_images_per_s"], 3),
        "serve_vs_one_at_a_time_p50_ratio": round(figures["serve_p50_ms"] / figures["serve_one_at_a_time_p50_ms"], 3),
        "serve_grpc_vs_rest_images_per_s": round(figures["serve_grpc_images_per_s"] / figures["serve_images_per_s"], 3),
        "serve_requests": len(requests) * len(all_results),
        "serve_good_requests": sum(request.captions is not None for request in requests) * len(all_results),
        "serve_failed_good": sum(len(result.failed_good) for result in all_results),
        "serve_wrong_bad": sum(len(result.wrong_bad) for result in all_results),
        "serve_rss_growth": round(max(result.rss_growth() for result in all_results), 4),
        "serve_rss_mb_end": round(max(result.rss_samples[-1][1] for result in all_results) / 2**20, 1),
        "serve_seconds": round(sum(result.seconds for result in all_results), 2),
        "serve_clients": CLIENTS,
        "cpu_count": os.cpu_count(),
        "failures": failures[:10],
    })
    return figures


def run(quick=False, out_dir="artifacts/demo", total_requests=None, rounds=2):
    """The suite's entry point; returns the results (dict)."""
    total_requests = total_requests or (200 if quick else 1000)
    with tempfile.TemporaryDirectory(prefix="bench_load_") as temporary:
        model_dir, images = workloads.saved_model_and_images(out_dir, temporary)
        return measure(model_dir, images, total_requests, rounds=rounds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="artifacts/demo", help="trained run with saved_model/ (else synthetic)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per server and round (default 1000, --quick 200)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each timing both servers")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, out_dir=args.out, total_requests=args.requests, rounds=args.rounds)
    print(f"{results['serve_requests']} requests ({results['serve_good_requests']} good) from {CLIENTS} clients, "
          f"{args.rounds} rounds over {len(SERVERS)} servers (and gRPC to the first), in {results['serve_seconds']:.1f} s on {results['cpu_count']} CPUs")
    for label, prefix in (("batching", "serve_"), ("batching, gRPC", "serve_grpc_"),
                          ("--max-batch-size 1", "serve_unbatched_"), ("one call at a time", "serve_one_at_a_time_")):
        print(f"  {label:<20} {results[prefix + 'images_per_s']:6.2f} images/s (rounds "
              f"{results[prefix + 'round_images_per_s']}), p50 {results[prefix + 'p50_ms']:.1f} ms, "
              f"p99 {results[prefix + 'p99_ms']:.1f} ms")
    print(f"  batching: {results['serve_batching_speedup']:.2f}x the throughput at "
          f"{results['serve_batching_p50_ratio']:.2f}x the p50; {results['serve_mean_batch_size']:.2f} images "
          f"per model call on average ({results['serve_model_calls']} calls, warm-up included); "
          f"{results['serve_vs_one_at_a_time_speedup']:.2f}x one call at a time at "
          f"{results['serve_vs_one_at_a_time_p50_ratio']:.2f}x its p50")
    print(f"  the SavedModel alone, no server: {results['serve_model_unbatched_images_per_s']:.2f} images/s one "
          f"image a call on each batch thread, {results['serve_model_all_threads_images_per_s']:.2f} with the "
          f"clients' images spread over them, {results['serve_model_one_thread_images_per_s']:.2f} all on one: "
          f"batching gains {results['serve_model_batching_gain']:.2f}x in the model "
          f"(rounds {results['rounds_serve_model_batching_gain']})")
    print(f"  {results['serve_failed_good']} good requests failed; bad answered wrongly: {results['serve_wrong_bad']}")
    print(f"  server RSS growth, first to last quarter of a round, largest: {100 * results['serve_rss_growth']:+.2f}% "
          f"(ends at {results['serve_rss_mb_end']:.0f} MB at most)")
    for failure in results["failures"]:
        print(f"  failure: {failure}")
    if args.json:
        io_utils.write_json(args.json, results)
    return 0 if results["serve_failed_good"] == 0 and results["serve_wrong_bad"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
