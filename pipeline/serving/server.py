"""The HTTP model server: TF Serving's REST routes on aiohttp, with batching, metrics and an upload page.

`make_server(model_dir, ...)` loads an export into a `CaptionServer`; `start()` serves in a
background thread (tests, benchmarks), `run()` in this one until SIGTERM or Ctrl-C (the
`serve` stage). Request and answer bodies are `pipeline.serving.rest_api`'s; this module
owns the connection: routing, body limits and timeouts, the log line and metrics of each
request, and the life cycle. With `grpc_port` set, TF Serving's gRPC API (`grpc_api`)
answers beside REST, through the same batcher and metrics. The export's warm-up requests
(`warmup`) are replayed at start-up before the model is reported AVAILABLE, as TF Serving does.

Model calls run in a `batching.Batcher`: the instances of concurrent predict requests are
captioned in one SavedModel call, as TF Serving's batching does, and each request gets its
own predictions back. Every bad request gets a 4xx with `{"error": "..."}` and leaves the
server serving. Request bodies are bounded (`max_body_mb`, checked from Content-Length
before reading), so is the number of images per request and the number of requests holding
a body at once; a body that does not arrive within `read_timeout_s` gets a 408. SIGTERM (or
Ctrl-C) stops accepting connections, lets the requests in flight finish, then returns.
"""

import asyncio
import concurrent.futures
import dataclasses
import http
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import prometheus_client
import tensorflow as tf
from aiohttp import web

from pipeline.core import errors, tf_data
from pipeline.serving import batching, exported_model, grpc_api, rest_api, tf_serving_files, warmup

PAGE_FILE = Path(__file__).parent / "static" / "index.html"
METRICS_PATH = "/monitoring/prometheus/metrics"
# Predict requests holding a body at once (reading, parsing, queued or in a model call) is
# the larger of this and twice --max-batch-size; the others wait before reading theirs.
MIN_REQUESTS_IN_FLIGHT = 8
LINGER_SECONDS = 2.0  # after an early error answer, unread body bytes are dropped this long
SHUTDOWN_GRACE_SECONDS = 60.0  # SIGTERM: the longest in-flight requests may take to finish
PARSER_THREADS = 2  # JSON and base64 of large bodies run off the event loop
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# TF Serving's batching guide for CPU-only servers: as many batch threads as CPU cores, and a
# timeout of 0 to a few ms. Measured here (docs/SERVING.md, "How the defaults were chosen"):
# 2 ms beat 0, 5 and 10 ms.
DEFAULT_BATCH_TIMEOUT_MS = 2.0


def default_batch_threads():
    """The CPU cores this process may run on (int >= 1): `--num-batch-threads`'s default."""
    return tf_data.cpu_count()


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """The `serve` command's settings (its flags), checked by `check()`.

    Batching follows TF Serving's knobs: `max_batch_size` instances per model call at most
    (1 turns batching off), `batch_timeout_ms` longest wait for a batch to fill after its
    first request arrived, `num_batch_threads` model calls that may run at once (default:
    the CPU cores, `default_batch_threads()`), `max_enqueued_batches` requests of each API
    holding a body at once, so batches queued at most (None: `requests_in_flight`'s default;
    later requests wait, where TF Serving refuses them). `grpc_port` None: no gRPC; 0: a free port.
    """

    host: str = "127.0.0.1"
    port: int = 8501
    max_body_mb: float = 16.0
    max_images: int = 32
    max_batch_size: int = 16
    batch_timeout_ms: float = DEFAULT_BATCH_TIMEOUT_MS
    num_batch_threads: int = dataclasses.field(default_factory=default_batch_threads)
    read_timeout_s: float = 60.0
    max_enqueued_batches: int = None
    grpc_port: int = None

    @property
    def requests_in_flight(self):
        """Requests of one API that may hold their body at once (int), so the most batches ever queued."""
        default = max(MIN_REQUESTS_IN_FLIGHT, 2 * self.max_batch_size)
        return default if self.max_enqueued_batches is None else self.max_enqueued_batches

    def check(self):
        """Raises PipelineError naming the flag of the first bad setting."""
        rules = [
            (self.max_body_mb > 0, f"--max-body-mb must be positive, got {self.max_body_mb}"),
            (self.max_images >= 1, f"--max-images must be at least 1, got {self.max_images}"),
            (self.max_batch_size >= 1, f"--max-batch-size must be at least 1, got {self.max_batch_size}"),
            (self.batch_timeout_ms >= 0, f"--batch-timeout-ms must be 0 or more, got {self.batch_timeout_ms}"),
            (self.num_batch_threads >= 1, f"--num-batch-threads must be at least 1, got {self.num_batch_threads}"),
            (self.read_timeout_s > 0, f"--read-timeout-s must be positive, got {self.read_timeout_s}"),
            (self.requests_in_flight >= 1, f"max_enqueued_batches must be at least 1, got {self.max_enqueued_batches}"),
            (self.grpc_port is None or 0 <= self.grpc_port < 65536, f"--grpc-port must be 0-65535, got {self.grpc_port}"),
        ]
        for good, message in rules:
            if not good:
                raise errors.PipelineError(message)


class ServeMetrics:
    """The server's Prometheus metrics, in a registry of their own (one per server).

    requests by API ("rest", "grpc"), route and status (HTTP code or gRPC code name), request
    latency by API and route, model-call (batch) sizes, and images (or feature rows) captioned, by signature.
    """

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "captioner_requests", "Requests answered, by API, route and status (HTTP code or gRPC code name)",
            ["api", "route", "status"], registry=self.registry)
        self.latency = prometheus_client.Histogram(
            "captioner_request_latency_seconds", "Time from a request's arrival to its answer sent, by API and route",
            ["api", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = prometheus_client.Histogram(
            "captioner_batch_size", "Instances per SavedModel call, by signature", ["signature"],
            buckets=BATCH_SIZE_BUCKETS, registry=self.registry)
        self.captioned = prometheus_client.Counter(
            "captioner_images_captioned", "Instances captioned and answered, by signature", ["signature"],
            registry=self.registry)

    def text(self):
        """The Prometheus text exposition (bytes)."""
        return prometheus_client.generate_latest(self.registry)


def make_server(model_dir, host="127.0.0.1", port=8501, max_body_mb=16.0, max_images=32, max_batch_size=16,
                batch_timeout_ms=DEFAULT_BATCH_TIMEOUT_MS, num_batch_threads=None, read_timeout_s=60.0,
                log_stream=None, grpc_port=None, model_config_file=None, batching_parameters_file=None):
    """Loads the SavedModel in `model_dir` into a CaptionServer; does not listen yet.

    Port 0 picks a free port; `batch_timeout_ms` None is DEFAULT_BATCH_TIMEOUT_MS, `num_batch_threads`
    None the CPU cores, `grpc_port` None no gRPC. TF Serving's files decide over the arguments:
    `model_config_file` the model (folder, name, version, labels; `model_dir` unused) and
    `batching_parameters_file` the batching fields it sets. `server.start()` serves in a background
    thread (tests), `server.run()` in this one until SIGTERM or Ctrl-C. Bad settings, files or a
    missing model raise PipelineError.
    """
    if batch_timeout_ms is None:
        batch_timeout_ms = DEFAULT_BATCH_TIMEOUT_MS
    if num_batch_threads is None:
        num_batch_threads = default_batch_threads()
    settings = ServeSettings(host, port, max_body_mb, max_images, max_batch_size, batch_timeout_ms,
                             num_batch_threads, read_timeout_s, grpc_port=grpc_port)
    if batching_parameters_file is not None:
        settings = dataclasses.replace(settings, **tf_serving_files.batching_settings(batching_parameters_file))
    settings.check()
    model = tf_serving_files.read_models_config(model_config_file) if model_config_file is not None else None
    captioner = exported_model.ExportedCaptioner(model.model_dir if model else model_dir)
    return CaptionServer(captioner, settings, log_stream, model)


class CaptionServer:
    """One loaded SavedModel behind an aiohttp server, with a batcher and metrics.

    Attributes:
      captioner: the loaded `exported_model.ExportedCaptioner`.
      settings: ServeSettings.
      model: the served `tf_serving_files.ServedModel` (default: "captioner", version 1, no labels).
      model_state: "LOADING", then "AVAILABLE" once the warm-up (`warmup_report`, or None) is done.
      metrics: ServeMetrics.
      server_address: (host, port) once listening; grpc_address the same for gRPC (or None).
    """

    def __init__(self, captioner, settings, log_stream=None, model=None):
        settings.check()
        self.captioner = captioner
        self.settings = settings
        self.model = model or tf_serving_files.ServedModel(rest_api.MODEL_NAME, captioner.model_dir,
                                                           int(rest_api.MODEL_VERSION))
        self.model_state = "LOADING"
        self.warmup_records = warmup.read_warmup_file(captioner.model_dir)
        self.warmup_report = self.grpc_address = self._grpc = None
        self.page = PAGE_FILE.read_bytes()
        self.metrics = ServeMetrics()
        self.log_stream = log_stream if log_stream is not None else sys.stderr
        self.max_body_bytes = int(settings.max_body_mb * 1024 * 1024)
        self.server_address = None
        self.signature_defs = rest_api.read_signature_defs(captioner.model_dir)
        self._loop = None
        self._stop_requested = None
        self._stopping = False
        self._requests_in_flight = 0
        self._no_request_in_flight = None
        self._thread = None
        self._batcher = None
        self._body_slots = None
        self._parsers = None

    @property
    def url(self):
        """The server's base URL (str), e.g. "http://127.0.0.1:8501"."""
        host, port = self.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    # --- life cycle ------------------------------------------------------------------------

    def run(self):
        """Serves in this (main) thread until SIGTERM or SIGINT; in-flight requests finish first."""
        asyncio.run(self._serve(on_listening=self._print_banner, handle_signals=True))

    def start(self):
        """Serves in a background thread; returns self once listening (PipelineError if it cannot)."""
        listening = threading.Event()
        failure = []

        def serve():
            try:
                asyncio.run(self._serve(on_listening=listening.set, handle_signals=False))
            except BaseException as error:  # noqa: BLE001 - reported to the starting thread
                failure.append(error)
                listening.set()

        self._thread = threading.Thread(target=serve, name="caption-server", daemon=True)
        self._thread.start()
        listening.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        return self

    def stop(self):
        """Stops a server started with `start()` as SIGTERM would; returns once it has stopped."""
        if self._thread is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop_requested.set)
        self._thread.join()
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
        return False

    async def _serve(self, on_listening, handle_signals):
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self._no_request_in_flight = asyncio.Event()
        self._no_request_in_flight.set()
        settings = self.settings
        self._body_slots = asyncio.Semaphore(settings.requests_in_flight)
        self._parsers = concurrent.futures.ThreadPoolExecutor(PARSER_THREADS, thread_name_prefix="parse")
        self._batcher = batching.Batcher(self._run_batch, settings.max_batch_size, settings.batch_timeout_ms / 1000.0,
                                         settings.num_batch_threads, on_call=self._observe_call)
        application = web.Application(client_max_size=self.max_body_bytes)
        application.router.add_route("*", "/{path:.*}", self._dispatch)
        # keepalive_timeout also closes connections that never send a request.
        runner = web.AppRunner(application, handle_signals=False, access_log=None,
                               keepalive_timeout=settings.read_timeout_s, lingering_time=LINGER_SECONDS,
                               shutdown_timeout=LINGER_SECONDS)  # after our own wait, below
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
            try:
                await site.start()
            except OSError as error:
                raise errors.PipelineError(
                    f"cannot listen on {settings.host}:{settings.port} ({error.strerror or error})") from None
            self.server_address = runner.addresses[0][:2]
            if settings.grpc_port is not None:
                backend = grpc_api.GrpcBackend(self.model, self.captioner.model_dir, self._batcher.submit,
                                               lambda: self.model_state, self.metrics, self.log_stream,
                                               settings.max_images)
                self._grpc = grpc_api.GrpcServer(backend, settings.requests_in_flight, self.max_body_bytes)
                self.grpc_address = (settings.host, self._grpc.start(settings.host, settings.grpc_port))
            if handle_signals:
                for signal_number in (signal.SIGTERM, signal.SIGINT):
                    self._loop.add_signal_handler(signal_number, self._on_signal, signal_number)
            # Listening: status says LOADING until the warm-up, through the requests' own `_run_batch`, is done.
            self.warmup_report = await self._loop.run_in_executor(
                None, warmup.warm_up, self.captioner.model_dir, self.warmup_records, self._run_batch, self.log_stream)
            self.model_state = "AVAILABLE"
            on_listening()
            await self._stop_requested.wait()
        finally:
            # Closes the listening socket, waits for the requests in flight (their model calls
            # keep running in the batch threads), then closes the connections. aiohttp's own
            # graceful close stops reading at once, which would lose the rest of a body still
            # arriving, so the wait for requests in flight is ours.
            self._stopping = True
            # gRPC drains beside REST: stops taking calls, lets those in flight finish.
            grpc_stopped = self._grpc and self._loop.run_in_executor(None, self._grpc.stop, SHUTDOWN_GRACE_SECONDS)
            for site in list(runner.sites):
                await site.stop()
            try:
                await asyncio.wait_for(self._no_request_in_flight.wait(), SHUTDOWN_GRACE_SECONDS)
            except asyncio.TimeoutError:
                pass  # the rest are cut off by the close below
            await runner.cleanup()
            if grpc_stopped:
                await grpc_stopped
            await self._loop.run_in_executor(None, self._batcher.close)
            self._parsers.shutdown()
        if handle_signals:
            print("stopped", flush=True)

    def _on_signal(self, signal_number):
        print(f"{signal.Signals(signal_number).name}: stopping (no new connections; finishing requests in flight)",
              flush=True)
        self._stop_requested.set()

    def _print_banner(self):
        url = self.url
        settings = self.settings
        batching_text = (f"batches of up to {settings.max_batch_size} instances, {settings.batch_timeout_ms:g} ms "
                         f"timeout" if settings.max_batch_size > 1 else "batching off")
        # The threads count with batching off too: one-image calls run side by side.
        batching_text += f", {settings.num_batch_threads} batch thread(s)"
        labels = "".join(f", label {label!r}" for label, _ in self.model.labels)
        print(f"serving {self.captioner.model_dir} as model {self.model.name!r} version {self.model.version}{labels} "
              f"({batching_text})", flush=True)
        if self.grpc_address is not None:  # first: a launcher waiting for "upload page:" has read it then
            print(f"  grpc:        {self.url[7:].rsplit(':', 1)[0]}:{self.grpc_address[1]}  "
                  f"tensorflow.serving.PredictionService, ModelService", flush=True)
        print(f"  upload page: {url}/", flush=True)
        print(f"  predict:     POST {url}/v1/models/{self.model.name}:predict  "
              f'{{"instances": [{{"b64": "..."}}]}}', flush=True)
        print(f"  metrics:     {url}{METRICS_PATH}", flush=True)
        print("SIGTERM or Ctrl-C stops it (requests in flight finish first)", flush=True)

    # --- requests ------------------------------------------------------------------------

    async def _dispatch(self, request):
        """Every request comes here: routes it, answers errors as JSON, logs one line, counts it."""
        started = time.perf_counter()
        self._requests_in_flight += 1
        self._no_request_in_flight.clear()
        try:
            return await self._answer(request, started)
        finally:
            self._requests_in_flight -= 1
            if self._requests_in_flight == 0:
                self._no_request_in_flight.set()

    async def _answer(self, request, started):
        route, handler = self._route(request)
        facts = {"images": 0}
        try:
            response = await handler(request, facts)
        except rest_api.RequestError as error:
            response = _json_response({"error": error.message}, status=error.status)
            if error.close:
                response.force_close()
        except Exception as error:  # noqa: BLE001 - a server bug must answer 500, not drop the connection
            response = _json_response({"error": f"internal error: {type(error).__name__}: {error}"},
                                      status=http.HTTPStatus.INTERNAL_SERVER_ERROR)
        if self._stopping:
            response.force_close()  # a keep-alive client must reconnect (to another replica)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        if response.content_type == "text/html":
            # The page is self-contained: it may only talk back to this server.
            response.headers["Content-Security-Policy"] = (
                "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                "connect-src 'self'")
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            pass  # the client left before its answer: still logged and counted below
        elapsed = time.perf_counter() - started
        self.metrics.requests.labels("rest", route, str(response.status)).inc()
        self.metrics.latency.labels("rest", route).observe(elapsed)
        images = f" images={facts['images']}" if facts["images"] else ""
        print(f'{request.remote} "{request.method} {request.raw_path}" {response.status} '
              f"{len(response.body or b'')}B {elapsed * 1000.0:.1f}ms{images}", file=self.log_stream, flush=True)
        return response

    def _route(self, request):
        """(route label for metrics, handler coroutine function) of a request."""
        path = request.path
        try:
            model_path = rest_api.model_path(path, self.model)
        except rest_api.RequestError as error:  # a label the model does not have
            return "other", _refuse(error.status, error.message)
        method = request.method
        if method in ("GET", "HEAD"):
            if path in ("/", "/index.html"):
                return "page", self._page
            if path == METRICS_PATH:
                return "metrics", self._metrics_page
            if model_path == "":
                return "status", self._status
            if model_path == "/metadata":
                return "metadata", self._metadata
            if model_path == ":predict":
                return "predict", _refuse(http.HTTPStatus.METHOD_NOT_ALLOWED, "predict needs POST, not GET")
        elif method == "POST":
            if model_path == ":predict":
                return "predict", self._predict
            if model_path in ("", "/metadata") or path in ("/", "/index.html", METRICS_PATH):
                return "other", _refuse(http.HTTPStatus.METHOD_NOT_ALLOWED, f"{path} answers GET, not POST")
            return "other", _refuse(http.HTTPStatus.NOT_FOUND, f"no such resource: {path} (predict is "
                                                               f"POST /v1/models/{self.model.name}:predict)")
        else:
            return "other", _refuse(http.HTTPStatus.METHOD_NOT_ALLOWED, f"method {method} is not supported")
        return "other", _refuse(http.HTTPStatus.NOT_FOUND, f"no such resource: {path}")

    async def _page(self, request, facts):
        return web.Response(body=self.page, content_type="text/html", charset="utf-8")

    async def _metrics_page(self, request, facts):
        return web.Response(body=self.metrics.text(), headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def _status(self, request, facts):
        return _json_response(rest_api.status_body(self.model.version, self.model_state))

    async def _metadata(self, request, facts):
        return _json_response(rest_api.metadata_body(self.signature_defs, self.captioner.metadata, self.model.name,
                                                     self.model.version))

    async def _predict(self, request, facts):
        length = self._body_length(request)
        async with self._body_slots:
            try:
                body = await asyncio.wait_for(request.content.readexactly(length), self.settings.read_timeout_s)
            except asyncio.TimeoutError:
                raise rest_api.RequestError(
                    http.HTTPStatus.REQUEST_TIMEOUT,
                    f"the request body did not arrive within {self.settings.read_timeout_s:g} s (--read-timeout-s)",
                    close=True) from None
            except asyncio.IncompleteReadError as error:
                raise rest_api.RequestError(http.HTTPStatus.BAD_REQUEST,
                                            f"request body ended after {len(error.partial)} of {length} bytes",
                                            close=True) from None
            call = await self._loop.run_in_executor(self._parsers, rest_api.parse_predict, body,
                                                    self.settings.max_images)
            del body
            facts["images"] = len(call.items)
            try:
                results = await asyncio.wrap_future(self._batcher.submit(call.signature, call.items))
            except tf.errors.InvalidArgumentError as error:
                raise await self._loop.run_in_executor(self._parsers, rest_api.diagnose, call, error) from None
        self.metrics.captioned.labels(call.signature).inc(len(results))
        captions = [text for text, _ in results]
        scores = [score if math.isfinite(score) else None for _, score in results]
        if call.columnar:
            return _json_response({"outputs": {"captions": captions, "scores": scores}})
        # `caption`/`score` are this API's names; TF Serving names each prediction's fields
        # after the SavedModel's outputs (`captions`, `scores`): both are sent, so a client
        # reading `captions`/`scores` runs unchanged against TensorFlow Serving.
        return _json_response({"predictions": [
            {"caption": text, "score": score, "captions": text, "scores": score}
            for text, score in zip(captions, scores)]})

    def _body_length(self, request):
        """The declared body length (int) of a predict request, checked against the limit."""
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            raise rest_api.RequestError(http.HTTPStatus.LENGTH_REQUIRED,
                                        "chunked request bodies are not supported: send Content-Length", close=True)
        length = request.content_length
        if length is None:
            raise rest_api.RequestError(http.HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length header")
        if length > self.max_body_bytes:
            raise rest_api.RequestError(
                http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body of {length} bytes is over the limit of {self.max_body_bytes} bytes "
                f"(--max-body-mb {self.max_body_bytes / 1024 / 1024:g})", close=True)
        if length == 0:
            raise rest_api.RequestError(http.HTTPStatus.BAD_REQUEST,
                                        'empty request body: send JSON {"instances": [...]}')
        return length

    # --- the model, in the batch threads -------------------------------------------------------

    def _run_batch(self, signature, items):
        """[(caption, score)] for `items` of one signature, in one SavedModel call (split by pixels)."""
        if signature == exported_model.SERVING_SIGNATURE:
            captions, scores = self.captioner.caption_images(items)
        else:
            captions, scores = self.captioner.caption_features(items)
        return list(zip(captions, scores))

    def _observe_call(self, signature, size):
        self.metrics.batch_size.labels(signature).observe(size)


def _json_response(data, status=http.HTTPStatus.OK):
    """A JSON answer; Content-Type "application/json" with no charset parameter (JSON is UTF-8), as TF Serving sends."""
    body = json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return web.Response(body=body, status=status, content_type="application/json")


def _refuse(status, message):
    async def handler(request, facts):
        raise rest_api.RequestError(status, message)

    return handler
