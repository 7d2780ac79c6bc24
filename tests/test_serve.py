"""The HTTP server: a real server on 127.0.0.1 (ephemeral port) serving the exported demo model."""

import base64
import concurrent.futures
import http.client
import io
import json
import os
import socket
import threading
import time

import pytest
from PIL import Image

from pipeline.core import errors
from pipeline.data import features
from pipeline.serving import server as http_server
from tests.helpers import image_bytes, metric_change, metric_samples, run_images, wait_until

MAX_IMAGES = 4
MAX_BODY_MB = 0.25
PREDICT = "/v1/models/captioner:predict"


@pytest.fixture(scope="module")
def live_server(exported_captioner):
    """(server, log): a server with the default batching, serving in a background thread until the module ends."""
    log = io.StringIO()
    settings = http_server.ServeSettings(port=0, max_body_mb=MAX_BODY_MB, max_images=MAX_IMAGES)
    with http_server.CaptionServer(exported_captioner, settings, log_stream=log) as server:
        yield server, log


@pytest.fixture(scope="module")
def demo_images(exported_out):
    """Bytes of five demo images of the run (list of bytes)."""
    return run_images(exported_out, 5)


@pytest.fixture(scope="module")
def expected(exported_captioner, demo_images):
    """{image bytes: (caption, score)} straight from the loaded SavedModel, one image per call."""
    answers = {}
    for image_bytes in demo_images:
        (caption_text,), (score,) = exported_captioner.caption_images([image_bytes])
        answers[image_bytes] = (caption_text, score)
    return answers


def request(server, method, path, body=None, headers=None):
    """(status, parsed JSON or raw bytes, response headers) of one request on a new connection."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=120)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        payload = response.read()
        if response.getheader("Content-Type", "").startswith("application/json"):
            payload = json.loads(payload)
        return response.status, payload, response
    finally:
        connection.close()


def b64(image_bytes):
    return base64.b64encode(image_bytes).decode("ascii")


def assert_prediction(answer, expected_pairs):
    """`answer["predictions"]` matches [(caption, score)] in order."""
    predictions = answer["predictions"]
    assert [prediction["caption"] for prediction in predictions] == [pair[0] for pair in expected_pairs]
    # TF Serving's field names (the SavedModel's outputs) carry the same values.
    assert all(prediction["captions"] == prediction["caption"] and prediction["scores"] == prediction["score"]
               for prediction in predictions)
    # Batches of different sizes may round differently inside ResNet50's matrix products.
    assert [prediction["score"] for prediction in predictions] == pytest.approx(
        [pair[1] for pair in expected_pairs], abs=1e-3)


def test_several_instances_in_one_request_come_back_in_order(live_server, demo_images, expected):
    server, _ = live_server
    chosen = [demo_images[2], demo_images[0], demo_images[3]]
    status, answer, _ = request(server, "POST", PREDICT, {"instances": [{"b64": b64(image)} for image in chosen]})
    assert status == 200
    assert_prediction(answer, [expected[image] for image in chosen])
    assert all(pair[0] for pair in expected.values())  # the trained model writes words


def test_tf_serving_request_variants(live_server, demo_images, expected, exported_out):
    server, _ = live_server
    image = demo_images[1]
    status, answer, _ = request(server, "POST", "/v1/models/captioner/versions/1:predict",
                                {"signature_name": "serving_default", "instances": [{"images": {"b64": b64(image)}}]})
    assert status == 200
    assert_prediction(answer, [expected[image]])
    status, answer, _ = request(server, "POST", PREDICT, {"inputs": {"images": [{"b64": b64(image)}]}})
    assert status == 200
    assert answer["outputs"]["captions"] == [expected[image][0]]
    cache = features.read_features(exported_out)
    rows = cache.features[:2].tolist()
    status, answer, _ = request(server, "POST", PREDICT, {"signature_name": "caption_features", "instances": rows})
    assert status == 200
    assert len(answer["predictions"]) == 2 and all(prediction["caption"] for prediction in answer["predictions"])


def test_status_metadata_and_page(live_server):
    server, _ = live_server
    for path in ("/v1/models/captioner", "/v1/models/captioner/versions/1"):
        status, answer, _ = request(server, "GET", path)
        assert status == 200
        assert answer == {"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    status, answer, _ = request(server, "GET", "/v1/models/captioner/versions/1/metadata")
    assert status == 200
    assert answer["model_spec"] == {"name": "captioner", "signature_name": "", "version": "1"}
    # TF Serving's shape: metadata.signature_def.signature_def, dtypes and shapes as its protos print them.
    signatures = answer["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "caption_features"} <= set(signatures)
    vector = {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False}
    serving = signatures["serving_default"]
    assert serving["method_name"] == "tensorflow/serving/predict"
    assert {name: (tensor["dtype"], tensor["tensor_shape"]) for name, tensor in serving["inputs"].items()} == {
        "images": ("DT_STRING", vector)}
    assert {name: (tensor["dtype"], tensor["tensor_shape"]) for name, tensor in serving["outputs"].items()} == {
        "captions": ("DT_STRING", vector), "scores": ("DT_FLOAT", vector)}
    features_input = signatures["caption_features"]["inputs"]["features"]
    assert features_input["dtype"] == "DT_FLOAT"
    assert features_input["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}, {"size": "2048", "name": ""}]
    assert answer["metadata"]["captioner"]["decode"]["beam_size"] == 3
    status, answer, _ = request(server, "GET", "/v1/models/captioner/versions/2")
    assert status == 404 and "no such resource" in answer["error"]
    status, page, response = request(server, "GET", "/")
    assert status == 200 and response.getheader("Content-Type") == "text/html; charset=utf-8"
    assert b'<input id="file" type="file"' in page and PREDICT.encode() in page
    assert b"http://" not in page and b"https://" not in page  # self-contained: nothing fetched elsewhere


def test_columnar_format_answers_outputs_by_name(live_server, demo_images, expected):
    server, _ = live_server
    chosen = [demo_images[3], demo_images[1]]
    instances = [{"b64": b64(image)} for image in chosen]
    for inputs in ({"images": instances}, instances):  # TF Serving accepts both for a single input
        status, answer, _ = request(server, "POST", "/v1/models/captioner/versions/1:predict", {"inputs": inputs})
        assert status == 200
        assert set(answer) == {"outputs"} and set(answer["outputs"]) == {"captions", "scores"}
        assert answer["outputs"]["captions"] == [expected[image][0] for image in chosen]
        assert answer["outputs"]["scores"] == pytest.approx([expected[image][1] for image in chosen], abs=1e-3)
    status, answer, _ = request(server, "POST", PREDICT, {"inputs": {"pixels": instances}})
    assert status == 400 and "must name the one input 'images'" in answer["error"]


def _png(color, size=(40, 30)):
    return image_bytes(Image.new("RGB", size, color), "PNG")


BAD_REQUESTS = [
    # (id, method, path, body, headers, status, fragment of the error message)
    ("invalid-json", "POST", PREDICT, b"{not json", {}, 400, "not valid JSON"),
    ("not-an-object", "POST", PREDICT, b"[1, 2]", {}, 400, "must be a JSON object"),
    ("missing-instances", "POST", PREDICT, {"images": []}, {}, 400, 'exactly one of "instances"'),
    ("instance-without-b64", "POST", PREDICT, {"instances": [{"data": "AAAA"}]}, {}, 400,
     'instances[0] must be an object {"b64"'),
    ("b64-not-a-string", "POST", PREDICT, {"instances": [{"b64": 12}]}, {}, 400, "instances[0].b64 must be a string"),
    ("bad-base64", "POST", PREDICT, {"instances": [{"b64": "@@not base64@@"}]}, {}, 400,
     "instances[0].b64 is not valid base64"),
    ("not-an-image", "POST", PREDICT, {"instances": [{"b64": b64(b"just some text")}]}, {}, 400,
     "instances[0]: not a readable JPEG, PNG, GIF or BMP image"),
    ("truncated-image", "POST", PREDICT, {"instances": [{"b64": b64(_png((9, 9, 9))[:40])}]}, {}, 400,
     "instances[0]: not a readable"),
    ("second-instance-bad", "POST", PREDICT,
     {"instances": [{"b64": b64(_png((200, 0, 0)))}, {"b64": b64(b"GIF89a")}]}, {}, 400, "instances[1]"),
    ("empty-list", "POST", PREDICT, {"instances": []}, {}, 400, '"instances" is empty'),
    ("too-many-instances", "POST", PREDICT, {"instances": [{"b64": b64(_png((1, 2, 3)))}] * (MAX_IMAGES + 1)}, {},
     400, f"more than the limit of {MAX_IMAGES}"),
    ("body-over-limit", "POST", PREDICT, b"x" * int(MAX_BODY_MB * 1024 * 1024 + 1), {}, 413, "over the limit"),
    ("unknown-signature", "POST", PREDICT, {"signature_name": "train", "instances": [{"b64": "AAAA"}]}, {}, 400,
     "unknown signature_name"),
    ("bad-feature-row", "POST", PREDICT, {"signature_name": "caption_features", "instances": [[1.0, 2.0]]}, {}, 400,
     "must be a list of 2048 numbers"),
    ("empty-body", "POST", PREDICT, b"", {}, 400, "empty request body"),
    ("unknown-get", "GET", "/v1/models/other", None, {}, 404, "no such resource"),
    ("path-traversal", "GET", "/../../etc/passwd", None, {}, 404, "no such resource"),
    ("static-folder", "GET", "/static/index.html", None, {}, 404, "no such resource"),
    ("unknown-post", "POST", "/v1/models/other:predict", {"instances": []}, {}, 404, "no such resource"),
    ("predict-by-get", "GET", PREDICT, None, {}, 405, "needs POST"),
    ("delete", "DELETE", "/v1/models/captioner", None, {}, 405, "not supported"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_json_error_and_server_keeps_serving(live_server, demo_images, expected, case):
    server, _ = live_server
    _, method, path, body, headers, expected_status, fragment = case
    status, answer, _ = request(server, method, path, body, headers)
    assert status == expected_status
    assert set(answer) == {"error"} and fragment in answer["error"], answer
    status, answer, _ = request(server, "POST", PREDICT, {"instances": [{"b64": b64(demo_images[0])}]})
    assert status == 200
    assert_prediction(answer, [expected[demo_images[0]]])


def test_oversized_content_length_is_refused_before_the_body_is_read(live_server):
    server, _ = live_server
    with socket.create_connection(server.server_address[:2], timeout=30) as connection:
        # Declares 1 GB and sends none of it: an answer proves the server did not wait to read it.
        connection.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {1 << 30}\r\n\r\n".encode())
        response = connection.makefile("rb").read()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in head
    assert "over the limit" in json.loads(body)["error"]


def test_chunked_body_without_length_gets_411(live_server):
    server, _ = live_server
    with socket.create_connection(server.server_address[:2], timeout=30) as connection:
        connection.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
                           "5\r\nhello\r\n0\r\n\r\n".encode())
        response = connection.makefile("rb").read()
    assert response.startswith(b"HTTP/1.1 411 ")
    assert b"Content-Length" in response.partition(b"\r\n\r\n")[2]


def test_concurrent_requests_are_all_answered_correctly(live_server, demo_images, expected):
    server, _ = live_server
    # Eight clients at once, each with its own mix, so a crossed answer would show.
    jobs = [[demo_images[(start + offset) % len(demo_images)] for offset in range(1 + start % 3)]
            for start in range(8)]

    def call(images):
        return request(server, "POST", PREDICT, {"instances": [{"b64": b64(image)} for image in images]})

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, jobs))
    for images, (status, answer, _) in zip(jobs, results):
        assert status == 200
        assert_prediction(answer, [expected[image] for image in images])


def test_keep_alive_connection_serves_several_requests(live_server, demo_images, expected):
    server, _ = live_server
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
    try:
        for image in demo_images[:2]:
            connection.request("POST", PREDICT, body=json.dumps({"instances": [{"b64": b64(image)}]}))
            response = connection.getresponse()
            assert response.status == 200
            assert_prediction(json.loads(response.read()), [expected[image]])
    finally:
        connection.close()


def _settled_line_count(log, quiet_seconds=0.5, limit_seconds=10.0):
    """The number of lines in `log` (a StringIO) once no line has arrived for `quiet_seconds`."""
    deadline = time.monotonic() + limit_seconds
    count, since = len(log.getvalue().splitlines()), time.monotonic()
    while time.monotonic() - since < quiet_seconds and time.monotonic() < deadline:
        time.sleep(0.02)
        now = len(log.getvalue().splitlines())
        if now != count:
            count, since = now, time.monotonic()
    return count


def test_one_log_line_per_request(live_server, demo_images):
    server, log = live_server
    # The module's server is shared: an earlier test's last line may still be on its way
    # (written just after that response was sent). Count once the log has been still a moment.
    before = _settled_line_count(log)
    request(server, "GET", "/v1/models/captioner")
    request(server, "POST", PREDICT, {"instances": [{"b64": b64(demo_images[0])}, {"b64": b64(demo_images[1])}]})
    # The server logs a request once its response is sent (the line carries the duration),
    # so the client can hold the answer a moment before the line is written.
    wait_until(lambda: len(log.getvalue().splitlines()) >= before + 2)
    lines = log.getvalue().splitlines()[before:]
    assert len(lines) == 2
    assert lines[0].startswith('127.0.0.1 "GET /v1/models/captioner" 200 ')
    assert lines[1].startswith(f'127.0.0.1 "POST {PREDICT}" 200 ') and lines[1].endswith(" images=2")


def test_batching_defaults_are_tf_servings_for_a_cpu_server(exported_out):
    import run_pipeline

    # Flags left out reach make_server as None: the settings' defaults decide.
    args = run_pipeline.build_parser().parse_args(["serve", "--model", str(exported_out / "saved_model")])
    assert (args.batch_timeout_ms, args.num_batch_threads) == (None, None)
    server = http_server.make_server(args.model, port=0, batch_timeout_ms=args.batch_timeout_ms,
                               num_batch_threads=args.num_batch_threads)
    # As many batch threads as cores this process may use (TF Serving: port::MaxParallelism()).
    assert server.settings.num_batch_threads == len(os.sched_getaffinity(0)) >= 1
    assert server.settings.batch_timeout_ms == http_server.DEFAULT_BATCH_TIMEOUT_MS == 2.0
    assert server.settings.max_batch_size == 16


def test_make_server_refuses_bad_settings_and_missing_model(tmp_path, exported_out):
    model = exported_out / "saved_model"
    for settings, message in [({"max_images": 0}, "--max-images must be at least 1"),
                              ({"max_batch_size": 0}, "--max-batch-size must be at least 1"),
                              ({"batch_timeout_ms": -1}, "--batch-timeout-ms must be 0 or more"),
                              ({"num_batch_threads": 0}, "--num-batch-threads must be at least 1"),
                              ({"read_timeout_s": 0}, "--read-timeout-s must be positive")]:
        with pytest.raises(errors.PipelineError, match=message):
            http_server.make_server(model, port=0, **settings)
    with pytest.raises(errors.PipelineError, match="no exported SavedModel here"):
        http_server.make_server(tmp_path / "saved_model", port=0)


def test_metrics_count_requests_latency_batches_and_images(live_server, demo_images):
    server, _ = live_server
    before = metric_samples(server)
    request(server, "GET", "/v1/models/captioner")
    request(server, "POST", PREDICT, {"instances": [{"b64": b64(demo_images[0])}, {"b64": b64(demo_images[1])}]})
    request(server, "POST", PREDICT, {"instances": [{"b64": "@@"}]})
    after = metric_samples(server)

    def change(name, **labels):
        return metric_change(before, after, name, **labels)

    assert change("captioner_requests_total", api="rest", route="status", status="200") == 1
    assert change("captioner_requests_total", api="rest", route="predict", status="200") == 1
    assert change("captioner_requests_total", api="rest", route="predict", status="400") == 1
    assert change("captioner_requests_total", api="rest", route="metrics", status="200") == 1  # the `before` read
    assert change("captioner_request_latency_seconds_count", api="rest", route="predict") == 2
    assert change("captioner_request_latency_seconds_sum", api="rest", route="predict") > 0
    assert change("captioner_request_latency_seconds_bucket", api="rest", route="predict", le="+Inf") == 2
    assert change("captioner_images_captioned_total", signature="serving_default") == 2
    assert change("captioner_batch_size_count", signature="serving_default") == 1
    assert change("captioner_batch_size_sum", signature="serving_default") == 2


@pytest.fixture(scope="module")
def batching_server(exported_captioner):
    """A server whose batches wait up to 500 ms to fill, so concurrent requests surely share a model call."""
    settings = http_server.ServeSettings(port=0, max_images=MAX_IMAGES, max_batch_size=16, batch_timeout_ms=500)
    with http_server.CaptionServer(exported_captioner, settings, log_stream=io.StringIO()) as server:
        yield server


def _concurrently(server, bodies):
    """The (status, answer, response) of each body POSTed to predict, all sent at once from their own threads."""
    barrier = threading.Barrier(len(bodies))

    def call(body):
        barrier.wait()
        return request(server, "POST", PREDICT, body)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(call, bodies))


def test_concurrent_requests_share_a_model_call_and_get_their_own_predictions(batching_server, demo_images,
                                                                             expected):
    jobs = [[demo_images[0]], [demo_images[2], demo_images[1]], [demo_images[3]],
            [demo_images[4], demo_images[0], demo_images[2]], [demo_images[1]]]
    before = metric_samples(batching_server)
    results = _concurrently(batching_server, [{"instances": [{"b64": b64(image)} for image in job]} for job in jobs])
    for job, (status, answer, _) in zip(jobs, results):
        assert status == 200
        assert_prediction(answer, [expected[image] for image in job])
    after = metric_samples(batching_server)
    key = ("captioner_batch_size_count", (("signature", "serving_default"),))
    calls = after[key] - before.get(key, 0.0)
    sum_key = ("captioner_batch_size_sum", (("signature", "serving_default"),))
    assert after[sum_key] - before.get(sum_key, 0.0) == sum(map(len, jobs))
    assert calls < len(jobs)  # at least two requests shared a model call


def test_an_instance_that_does_not_decode_fails_only_its_own_request(batching_server, demo_images, expected):
    # Passes the header check (a whole PNG header), fails the model's decode: the batch is refused,
    # then each request runs on its own.
    undecodable = _png((9, 9, 9))[:40]
    jobs = [[demo_images[0], demo_images[1]], [demo_images[2], undecodable], [demo_images[3]]]
    before = metric_samples(batching_server)
    results = _concurrently(batching_server, [{"instances": [{"b64": b64(image)} for image in job]} for job in jobs])
    status, answer, _ = results[1]
    assert status == 400 and answer["error"].startswith("instances[1]: not a readable"), answer
    for job, (status, answer, _) in (pair for index, pair in enumerate(zip(jobs, results)) if index != 1):
        assert status == 200
        assert_prediction(answer, [expected[image] for image in job])
    after = metric_samples(batching_server)
    key = ("captioner_images_captioned_total", (("signature", "serving_default"),))
    assert after[key] - before.get(key, 0.0) == 3


def test_a_body_that_stalls_gets_408_after_the_read_timeout(exported_captioner, demo_images, expected):
    settings = http_server.ServeSettings(port=0, read_timeout_s=1.0)
    with http_server.CaptionServer(exported_captioner, settings, log_stream=io.StringIO()) as server:
        body = json.dumps({"instances": [{"b64": b64(demo_images[0])}]}).encode()
        with socket.create_connection(server.server_address, timeout=30) as connection:
            connection.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                               + body[:len(body) // 2])
            sent = time.monotonic()
            response = connection.makefile("rb").read()  # to the server's close
            waited = time.monotonic() - sent
        head, _, answer = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head
        assert "--read-timeout-s" in json.loads(answer)["error"]
        assert waited >= 0.9  # not answered before the client had its second to send the rest
        # A connection that never sends a request is closed after the timeout too.
        with socket.create_connection(server.server_address, timeout=30) as idle:
            assert idle.recv(1) == b""
        status, answer, _ = request(server, "POST", PREDICT, {"instances": [{"b64": b64(demo_images[0])}]})
        assert status == 200
        assert_prediction(answer, [expected[demo_images[0]]])
