"""The HTTP server: a real server on 127.0.0.1 (ephemeral port) serving the exported demo model."""

import base64
import concurrent.futures
import http.client
import io
import json
import socket
import threading

import pytest
from PIL import Image

from pipeline import datasets, errors, features, serve
from tests.conftest import wait_until

MAX_IMAGES = 4
MAX_BODY_MB = 0.25
PREDICT = "/v1/models/captioner:predict"


@pytest.fixture(scope="module")
def live_server(exported_out):
    """(server, log) with the server serving in a background thread until the module ends."""
    log = io.StringIO()
    server = serve.make_server(exported_out / "saved_model", host="127.0.0.1", port=0,
                               max_body_mb=MAX_BODY_MB, max_images=MAX_IMAGES, log_stream=log)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, log
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def demo_images(exported_out):
    """Bytes of five demo images of the run (list of bytes)."""
    dataset = datasets.read_captions_json(exported_out)
    return [(dataset.image_dir / record.image_id).read_bytes() for record in dataset.images[:5]]


@pytest.fixture(scope="module")
def expected(live_server, demo_images):
    """{image bytes: (caption, score)} straight from the loaded SavedModel, one image per call."""
    server, _ = live_server
    answers = {}
    for image_bytes in demo_images:
        (caption_text,), (score,) = server.captioner.caption_images([image_bytes])
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
    status, answer, _ = request(server, "GET", "/v1/models/captioner")
    assert status == 200
    assert answer == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    status, answer, _ = request(server, "GET", "/v1/models/captioner/metadata")
    assert status == 200
    signatures = answer["metadata"]["signature_def"]
    assert signatures["serving_default"]["inputs"] == {"images": {"dtype": "string", "shape": [-1]}}
    assert signatures["caption_features"]["inputs"] == {"features": {"dtype": "float32", "shape": [-1, 2048]}}
    assert answer["metadata"]["decode"]["beam_size"] == 3
    status, page, response = request(server, "GET", "/")
    assert status == 200 and response.getheader("Content-Type") == "text/html; charset=utf-8"
    assert b'<input id="file" type="file"' in page and PREDICT.encode() in page
    assert b"http://" not in page and b"https://" not in page  # self-contained: nothing fetched elsewhere


def _png(color, size=(40, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


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


def test_one_log_line_per_request(live_server, demo_images):
    server, log = live_server
    before = len(log.getvalue().splitlines())
    request(server, "GET", "/v1/models/captioner")
    request(server, "POST", PREDICT, {"instances": [{"b64": b64(demo_images[0])}, {"b64": b64(demo_images[1])}]})
    # The server logs a request once its response is sent (the line carries the duration),
    # so the client can hold the answer a moment before the line is written.
    wait_until(lambda: len(log.getvalue().splitlines()) >= before + 2)
    lines = log.getvalue().splitlines()[before:]
    assert len(lines) == 2
    assert lines[0].startswith('127.0.0.1 "GET /v1/models/captioner" 200 ')
    assert lines[1].startswith(f'127.0.0.1 "POST {PREDICT}" 200 ') and lines[1].endswith(" images=2")


def test_make_server_refuses_bad_limits_and_missing_model(tmp_path, exported_out):
    with pytest.raises(errors.PipelineError, match="--max-images must be at least 1"):
        serve.make_server(exported_out / "saved_model", port=0, max_images=0)
    with pytest.raises(errors.PipelineError, match="no exported SavedModel here"):
        serve.make_server(tmp_path / "saved_model", port=0)
