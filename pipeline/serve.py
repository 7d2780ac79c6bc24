"""The `serve` command: an HTTP server in TensorFlow Serving's REST shape, with an upload page.

    python run_pipeline.py serve --model OUT/saved_model --port 8501

    POST /v1/models/captioner:predict   {"instances": [{"b64": "<base64 image>"}, ...]}
                                     -> {"predictions": [{"caption": "...", "score": -4.2}, ...]}
    GET  /v1/models/captioner           model status, as TF Serving answers it
    GET  /v1/models/captioner/metadata  signatures and the export's settings
    GET  /                              an upload page: pick an image, see it and its caption

Also accepted, as TF Serving does: `/v1/models/captioner/versions/1...`, the columnar
`{"inputs": [...]}` form (answered with `{"outputs": {"captions": [...], "scores": [...]}}`),
`{"instances": [{"images": {"b64": ...}}]}`, and `"signature_name": "caption_features"` with
2048-number feature rows as instances.

Every bad request gets a 4xx with `{"error": "..."}` and leaves the server serving. Request
bodies are bounded (`max_body_mb`, checked from Content-Length before reading) and so is the
number of images per request; model calls run one at a time, so memory stays bounded
however many clients connect.
"""

import base64
import binascii
import http
import http.server
import json
import math
import socket
import sys
import threading
import time
from pathlib import Path

import tensorflow as tf

from pipeline import caption, errors

MODEL_NAME = "captioner"
MODEL_VERSION = "1"
PAGE_FILE = Path(__file__).with_name("static") / "index.html"
FEATURE_DIM = 2048
# Requests allowed to hold a body in memory at once; the rest wait before reading theirs.
MAX_REQUESTS_IN_FLIGHT = 8
LINGER_SECONDS = 2.0  # see CaptionRequestHandler._lingering_close
LINGER_MAX_BYTES = 64 * 1024 * 1024
SOCKET_TIMEOUT_SECONDS = 60  # a client that stops sending mid-body frees its thread


class RequestError(Exception):
    """A client error: becomes an HTTP `status` response with `{"error": message}`."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = int(status)
        self.message = message


class CaptionServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server that holds one loaded SavedModel and the request limits.

    Attributes:
      captioner: the loaded `caption.ExportedCaptioner`.
      max_body_bytes: int, largest request body accepted.
      max_images: int, most instances per predict request.
    """

    daemon_threads = True  # Ctrl-C must not wait for idle keep-alive connections
    allow_reuse_address = True

    def __init__(self, address, captioner, max_body_bytes, max_images, page, log_stream=None):
        self.captioner = captioner
        self.max_body_bytes = max_body_bytes
        self.max_images = max_images
        self.page = page
        self.log_stream = log_stream if log_stream is not None else sys.stderr
        # One model call at a time: TF inference is thread-safe, but each concurrent call
        # holds its own batch of activations (ResNet50 at batch 32 is ~1 GB), and on a
        # small CPU they would only share the same cores anyway.
        self.model_lock = threading.Lock()
        self.body_slots = threading.BoundedSemaphore(MAX_REQUESTS_IN_FLIGHT)
        self.log_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6  # an instance attribute: the class stays IPv4
        super().__init__(address, CaptionRequestHandler)

    @property
    def url(self):
        """The server's base URL (str), e.g. "http://127.0.0.1:8501"."""
        host, port = self.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def log_line(self, line):
        with self.log_lock:
            print(line, file=self.log_stream, flush=True)


def make_server(model_dir, host="127.0.0.1", port=8501, max_body_mb=16, max_images=32, log_stream=None):
    """Loads the SavedModel in `model_dir` and binds a server to (host, port); does not serve yet.

    Port 0 picks a free port (see `server.server_address`). Call `serve_forever()` to serve
    and `shutdown()` / `server_close()` to stop. Bad limits or a missing model raise PipelineError.
    """
    if max_body_mb <= 0:
        raise errors.PipelineError(f"--max-body-mb must be positive, got {max_body_mb}")
    if max_images < 1:
        raise errors.PipelineError(f"--max-images must be at least 1, got {max_images}")
    captioner = caption.ExportedCaptioner(model_dir)
    page = PAGE_FILE.read_bytes()
    try:
        return CaptionServer((host, port), captioner, int(max_body_mb * 1024 * 1024), max_images, page, log_stream)
    except OSError as error:
        raise errors.PipelineError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None


def run_serve(model_dir, host="127.0.0.1", port=8501, max_body_mb=16, max_images=32):
    """Serves `model_dir` over HTTP until Ctrl-C; prints the URL first."""
    server = make_server(model_dir, host, port, max_body_mb, max_images)
    url = server.url
    print(f"serving {server.captioner.model_dir} as model {MODEL_NAME!r}", flush=True)
    print(f"  upload page: {url}/", flush=True)
    print(f"  predict:     POST {url}/v1/models/{MODEL_NAME}:predict  "
          f'{{"instances": [{{"b64": "..."}}]}}', flush=True)
    print("press Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        server.server_close()


class CaptionRequestHandler(http.server.BaseHTTPRequestHandler):
    """Routes one HTTP request; every answer is JSON except the upload page."""

    server_version = "Captioner"
    protocol_version = "HTTP/1.1"  # keep-alive: the page and scripted clients reuse connections
    timeout = SOCKET_TIMEOUT_SECONDS

    # --- routing -------------------------------------------------------------------------

    def do_GET(self):
        self._handle(self._route_get)

    def do_HEAD(self):
        self._handle(self._route_get, head=True)

    def do_POST(self):
        self._handle(self._route_post)

    def do_PUT(self):
        self._handle(self._method_not_allowed)

    do_DELETE = do_PATCH = do_PUT

    def _route_get(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return http.HTTPStatus.OK, self.server.page, "text/html; charset=utf-8"
        model_path = _model_path(path)
        if model_path == "":
            return http.HTTPStatus.OK, _model_status(), None
        if model_path == "/metadata":
            return http.HTTPStatus.OK, self._metadata(), None
        if model_path is not None and model_path.startswith(":"):
            raise RequestError(http.HTTPStatus.METHOD_NOT_ALLOWED, f"{model_path[1:]} needs POST, not GET")
        raise RequestError(http.HTTPStatus.NOT_FOUND, f"no such resource: {path}")

    def _route_post(self):
        path = self.path.split("?", 1)[0]
        model_path = _model_path(path)
        if model_path == ":predict":
            return http.HTTPStatus.OK, self._predict(self._read_json_body()), None
        if model_path in ("", "/metadata") or path in ("/", "/index.html"):
            self._drain_or_close()
            raise RequestError(http.HTTPStatus.METHOD_NOT_ALLOWED, f"{path} answers GET, not POST")
        self._drain_or_close()
        raise RequestError(http.HTTPStatus.NOT_FOUND, f"no such resource: {path} (predict is "
                                                      f"POST /v1/models/{MODEL_NAME}:predict)")

    def _method_not_allowed(self):
        self._drain_or_close()
        raise RequestError(http.HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} is not supported")

    # --- request handling ----------------------------------------------------------------

    def _handle(self, route, head=False):
        started = time.perf_counter()
        self._images_in_request = 0
        self._body_unread = False
        try:
            status, body, content_type = route()
        except RequestError as error:
            status, body, content_type = error.status, {"error": error.message}, None
        except Exception as error:  # noqa: BLE001 - a server bug must answer 500, not drop the connection
            status, body, content_type = http.HTTPStatus.INTERNAL_SERVER_ERROR, {
                "error": f"internal error: {type(error).__name__}: {error}"}, None
        if content_type is None:
            body = json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
            content_type = "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        if content_type.startswith("text/html"):
            # The page is self-contained: it may only talk back to this server.
            self.send_header("Content-Security-Policy", "default-src 'none'; img-src data:; "
                             "style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)
        if self._body_unread:
            self._lingering_close()
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        images = f" images={self._images_in_request}" if self._images_in_request else ""
        self.server.log_line(f'{self.client_address[0]} "{self.command} {self.path}" {int(status)} '
                             f"{len(body)}B {elapsed_ms:.1f}ms{images}")

    def log_request(self, code="-", size="-"):
        pass  # `_handle` logs one line per request, with its duration

    def log_error(self, format, *args):  # noqa: A002 - the base class's signature
        self.server.log_line(f"{self.client_address[0]} error: {format % args}")

    def _lingering_close(self):
        """Half-closes, then drops what the client is still sending, for a short while.

        Closing a socket with unread input makes the kernel send a reset, which can destroy
        the error response before the client reads it; so the server first says it is done
        writing, and reads (and discards) a bounded amount until the client closes too.
        """
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            deadline = time.monotonic() + LINGER_SECONDS
            discarded = 0
            while time.monotonic() < deadline and discarded < LINGER_MAX_BYTES:
                chunk = self.connection.recv(256 * 1024)
                if not chunk:
                    break
                discarded += len(chunk)
        except OSError:
            pass  # the client went away: nothing left to protect

    def _content_length(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._body_unread = True
            raise RequestError(http.HTTPStatus.LENGTH_REQUIRED,
                               "chunked request bodies are not supported: send Content-Length")
        value = self.headers.get("Content-Length")
        if value is None:
            raise RequestError(http.HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length header")
        try:
            length = int(value)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._body_unread = True
            raise RequestError(http.HTTPStatus.BAD_REQUEST, f"bad Content-Length header {value!r}")
        return length

    def _drain_or_close(self):
        """Reads and drops a small body so the connection stays usable; closes it otherwise."""
        try:
            length = self._content_length()
        except RequestError:
            self.close_connection = True
            return
        if length > 64 * 1024:
            self.close_connection = True
            self._body_unread = True
        elif length:
            self.rfile.read(length)

    def _read_json_body(self):
        length = self._content_length()
        limit = self.server.max_body_bytes
        if length > limit:
            # The body stays unread, so this connection cannot carry another request.
            self.close_connection = True
            self._body_unread = True
            raise RequestError(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"request body of {length} bytes is over the limit of {limit} bytes "
                               f"(--max-body-mb {limit / 1024 / 1024:g})")
        if length == 0:
            raise RequestError(http.HTTPStatus.BAD_REQUEST, 'empty request body: send JSON {"instances": [...]}')
        with self.server.body_slots:
            body = self.rfile.read(length)
            if len(body) != length:
                self.close_connection = True
                raise RequestError(http.HTTPStatus.BAD_REQUEST,
                                   f"request body ended after {len(body)} of {length} bytes")
            try:
                return json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise RequestError(http.HTTPStatus.BAD_REQUEST, f"request body is not valid JSON: {error}") from None

    # --- the model endpoints -------------------------------------------------------------

    def _predict(self, request):
        if not isinstance(request, dict):
            raise RequestError(http.HTTPStatus.BAD_REQUEST,
                               f'request must be a JSON object like {{"instances": [...]}}, got {type(request).__name__}')
        signature = request.get("signature_name", caption.SERVING_SIGNATURE)
        if signature not in (caption.SERVING_SIGNATURE, caption.FEATURES_SIGNATURE):
            raise RequestError(http.HTTPStatus.BAD_REQUEST,
                               f"unknown signature_name {signature!r}: use {caption.SERVING_SIGNATURE!r} "
                               f"or {caption.FEATURES_SIGNATURE!r}")
        if ("instances" in request) == ("inputs" in request):
            raise RequestError(http.HTTPStatus.BAD_REQUEST,
                               'request must have exactly one of "instances" (rows) or "inputs" (columns)')
        columnar = "inputs" in request
        items = request["inputs"] if columnar else request["instances"]
        input_name = "images" if signature == caption.SERVING_SIGNATURE else "features"
        field = "inputs" if columnar else "instances"
        if columnar and isinstance(items, dict):
            if set(items) != {input_name}:
                raise RequestError(http.HTTPStatus.BAD_REQUEST,
                                   f'"inputs" must name the one input {input_name!r}, got {sorted(items)}')
            items = items[input_name]
        if not isinstance(items, list):
            raise RequestError(http.HTTPStatus.BAD_REQUEST, f'"{field}" must be a list, got {type(items).__name__}')
        if not items:
            raise RequestError(http.HTTPStatus.BAD_REQUEST, f'"{field}" is empty: send at least one image')
        if len(items) > self.server.max_images:
            raise RequestError(http.HTTPStatus.BAD_REQUEST,
                               f'"{field}" has {len(items)} items, more than the limit of '
                               f"{self.server.max_images} per request (--max-images)")
        self._images_in_request = len(items)
        if signature == caption.SERVING_SIGNATURE:
            images = [_instance_image(item, index, field, unwrap=not columnar) for index, item in enumerate(items)]
            try:
                with self.server.model_lock:
                    captions, scores = self.server.captioner.caption_images(images)
            except tf.errors.InvalidArgumentError as error:
                # Instances were only header-checked (one decode per image, the model's, when
                # all are good): now decode each on its own to name the one that failed.
                for index, image_bytes in enumerate(images):
                    problem = caption.image_problem(image_bytes)
                    if problem:
                        raise RequestError(http.HTTPStatus.BAD_REQUEST, f"{field}[{index}]: {problem}") from None
                raise RequestError(http.HTTPStatus.BAD_REQUEST,
                                   f"the model cannot decode an image ({errors.op_error_reason(error)})") from None
        else:
            features = [_instance_features(item, index, field, unwrap=not columnar) for index, item in enumerate(items)]
            with self.server.model_lock:
                captions, scores = self.server.captioner.caption_features(features)
        scores = [score if math.isfinite(score) else None for score in scores]
        if columnar:
            return {"outputs": {"captions": captions, "scores": scores}}
        # `caption`/`score` are this API's names; TF Serving names each prediction's fields
        # after the SavedModel's outputs (`captions`, `scores`): both are sent, so a client
        # reading `captions`/`scores` runs unchanged against TensorFlow Serving.
        return {"predictions": [{"caption": text, "score": score, "captions": text, "scores": score}
                                for text, score in zip(captions, scores)]}

    def _metadata(self):
        metadata = self.server.captioner.metadata
        return {
            "model_spec": {"name": MODEL_NAME, "signature_name": "", "version": MODEL_VERSION},
            "metadata": {
                "signature_def": metadata.get("signatures", {}),
                "signature_names": self.server.captioner.signature_names,
                "decode": metadata.get("config", {}).get("decode", {}),
                "encoder": metadata.get("encoder", {}),
                "vocabulary_size": metadata.get("vocabulary_size"),
            },
        }


def _model_path(path):
    """The part of `path` after /v1/models/captioner[/versions/1], or None for other paths."""
    prefix = f"/v1/models/{MODEL_NAME}"
    if not path.startswith(prefix):
        return None
    rest = path[len(prefix):]
    version_prefix = f"/versions/{MODEL_VERSION}"
    if rest.startswith(version_prefix):
        rest = rest[len(version_prefix):]
    if rest in ("", "/metadata", ":predict"):
        return rest
    return None


def _model_status():
    return {"model_version_status": [{
        "version": MODEL_VERSION, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""},
    }]}


def _instance_image(item, index, field, unwrap):
    """Decoded bytes of one `{"b64": ...}` instance; RequestError naming the instance otherwise."""
    where = f"{field}[{index}]"
    if unwrap and isinstance(item, dict) and "images" in item and "b64" not in item:
        item = item["images"]  # the row form that names the input: {"images": {"b64": ...}}
    if not isinstance(item, dict) or "b64" not in item:
        raise RequestError(http.HTTPStatus.BAD_REQUEST,
                           f'{where} must be an object {{"b64": "<base64 image bytes>"}}, got {_describe(item)}')
    encoded = item["b64"]
    if not isinstance(encoded, str):
        raise RequestError(http.HTTPStatus.BAD_REQUEST, f'{where}.b64 must be a string, got {_describe(encoded)}')
    try:
        # TF Serving accepts both alphabets; validate=True rejects stray characters instead of skipping them.
        image_bytes = base64.b64decode(encoded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(http.HTTPStatus.BAD_REQUEST, f"{where}.b64 is not valid base64 ({error})") from None
    problem = caption.header_problem(image_bytes)
    if problem:
        raise RequestError(http.HTTPStatus.BAD_REQUEST, f"{where}: {problem}")
    return image_bytes


def _instance_features(item, index, field, unwrap):
    """One feature row (list of FEATURE_DIM floats) of a `caption_features` request."""
    where = f"{field}[{index}]"
    if unwrap and isinstance(item, dict) and set(item) == {"features"}:
        item = item["features"]
    if (not isinstance(item, list) or len(item) != FEATURE_DIM
            or not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in item)):
        raise RequestError(http.HTTPStatus.BAD_REQUEST,
                           f"{where} must be a list of {FEATURE_DIM} numbers (one image's features)")
    return item


def _describe(value):
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
