"""The server under load and its hardening: a real `run_pipeline.py serve` subprocess on 127.0.0.1.

The load is 2,000 predict requests from 8 client threads. Most good ones are cheap but
real (`caption_features` rows from the run's cache: the decoder and beam search only);
one good request in fifteen is a JPEG or PNG through `serving_default` (ResNet50); every tenth
request is malformed. Expected captions come from the same SavedModel loaded in this
process, for the very batch each request sends.
"""

import http.client
import inspect
import io
import json
import signal
import socket
import time

import pytest
from PIL import Image

from benchmarks import bench_load
from pipeline import serve
from pipeline.data import features
from pipeline.serving import server as http_server
from tests.helpers import image_bytes, run_images, wait_until

TOTAL_REQUESTS = 2000
MAX_IMAGES = 4
MAX_BODY_MB = 0.5
MAX_RSS_GROWTH = 0.10


@pytest.fixture(scope="module")
def server(exported_out):
    with bench_load.ServerProcess(exported_out / "saved_model", max_body_mb=MAX_BODY_MB,
                                  max_images=MAX_IMAGES) as process:
        yield process


@pytest.fixture(scope="module")
def good_requests(exported_out, exported_captioner):
    """(feature requests, image requests): LoadRequests with the captions the model writes for them."""
    captioner = exported_captioner
    rows = features.read_features(exported_out).features
    feature_requests = []
    for start in range(0, 40, 2):  # 20 distinct batches of 1 to 3 rows
        batch = rows[start:start + 1 + start % 3].tolist()
        captions, _ = captioner.caption_features(batch)
        feature_requests.append(bench_load.LoadRequest("features", bench_load.features_body(batch), captions))
    images = run_images(exported_out, 3)
    images.append(image_bytes(Image.open(io.BytesIO(images[0])).convert("RGB"), "PNG"))
    image_requests = []
    for image in images:
        captions, _ = captioner.caption_images([image])
        image_requests.append(bench_load.LoadRequest("image", bench_load.image_body([image]), captions))
    assert all(request.captions[0] for request in feature_requests + image_requests)  # real captions
    return feature_requests, image_requests, images


def test_load_answers_every_request_correctly_and_memory_stays_flat(server, good_requests):
    feature_requests, image_requests, images = good_requests
    bad = bench_load.malformed_requests(images[0], MAX_IMAGES, int(MAX_BODY_MB * 2**20))
    # Warm-up, so the first quarter measures serving rather than TF's first-call allocations.
    bench_load.run_load(server, feature_requests + image_requests + bad, clients=1)
    good = []
    for index in range(len(feature_requests) * len(image_requests)):
        if index % 15 == 14:  # one good request in fifteen carries an image: ResNet50 costs ~150 ms here
            good.append(image_requests[(index // 15) % len(image_requests)])
        else:
            good.append(feature_requests[index % len(feature_requests)])
    requests = bench_load.plan(good, bad, TOTAL_REQUESTS)
    assert sum(request.captions is None for request in requests) == TOTAL_REQUESTS // 10
    assert {request.kind for request in requests if request.captions is None} == {request.kind for request in bad}

    result = bench_load.run_load(server, requests, clients=8)

    results = bench_load.summary(result, requests)
    print(f"\nload: {json.dumps(results)}")
    assert result.failed_good == []
    assert result.wrong_bad == []
    assert server.process.poll() is None, server.log_text()[-2000:]
    assert len(result.latencies_ms) == TOTAL_REQUESTS - TOTAL_REQUESTS // 10
    assert len(result.rss_samples) >= 20
    assert result.rss_growth() < MAX_RSS_GROWTH, result.rss_samples
    # One log line per request, with its status, and no traceback.
    # The server writes a request's line once its response is sent: wait for the last ones.
    wait_until(lambda: server.log_text().count(f'"POST {bench_load.PREDICT}" 200 ') >= len(result.latencies_ms))
    log = server.log_text()
    assert log.count(f'"POST {bench_load.PREDICT}" 200 ') >= len(result.latencies_ms)
    assert "Traceback" not in log


def test_binds_loopback_by_default(server):
    assert server.host == "127.0.0.1"  # the fixture's server runs without --host
    for function in (http_server.make_server, serve.run_serve):
        assert inspect.signature(function).parameters["host"].default == "127.0.0.1"
    # Nothing listens on the machine's other addresses at the server's port.
    other = _non_loopback_address()
    if other is not None:
        with pytest.raises(OSError):
            socket.create_connection((other, server.port), timeout=5).close()


def _non_loopback_address():
    """An IPv4 address of this machine that is not loopback (str), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


TRAVERSALS = [
    "/../../etc/passwd",
    "/static/../serve.py",
    "/static/../../run_pipeline.py",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/static/%2e%2e/serve.py",
    "/..%2fserve.py",
    "/static/index.html",
    "/index.html/../../etc/passwd",
    "//etc/passwd",
    "/v1/models/captioner/../../../etc/passwd",
    "/v1/models/captioner/metadata/../../../../pipeline/serve.py",
    "/serve.py",
    "/pipeline/serve.py",
    "/%00",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_no_file_outside_the_page_is_served(server, path):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", "localhost")
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 404
    assert response.getheader("Content-Type") == "application/json"
    assert set(json.loads(body)) == {"error"}
    for secret in (b"root:", b"import ", b"def ", b"<html", b"#!/usr/bin"):
        assert secret not in body


def test_limits_are_enforced_on_the_wire(server, good_requests):
    _, _, images = good_requests
    limit = int(MAX_BODY_MB * 2**20)
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        status, answer, closing = bench_load.post(connection, b" " * (limit + 1))
        assert status == 413 and f"over the limit of {limit} bytes" in answer["error"] and closing
        connection.close()
        status, answer, _ = bench_load.post(connection, bench_load.image_body([images[0]] * (MAX_IMAGES + 1)))
        assert status == 400 and f"more than the limit of {MAX_IMAGES}" in answer["error"]
        status, answer, _ = bench_load.post(connection, bench_load.image_body([images[0]] * MAX_IMAGES))
        assert status == 200 and len(answer["predictions"]) == MAX_IMAGES
    finally:
        connection.close()


def _read_response(connection):
    """(status, parsed JSON) of the next response on a raw socket."""
    response = http.client.HTTPResponse(connection)
    response.begin()
    return response.status, json.loads(response.read())


def _refuses_connections(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_stops_accepting_finishes_the_request_in_flight_and_exits_0(exported_out, good_requests):
    feature_requests, _, _ = good_requests
    first, slow = feature_requests[0], feature_requests[1]
    with bench_load.ServerProcess(exported_out / "saved_model", max_body_mb=MAX_BODY_MB,
                                  max_images=MAX_IMAGES) as server:
        with socket.create_connection((server.host, server.port), timeout=60) as connection:
            head = f"POST {bench_load.PREDICT} HTTP/1.1\r\nHost: test\r\nContent-Length: {{}}\r\n\r\n"
            connection.sendall(head.format(len(first.body)).encode() + first.body)
            assert _read_response(connection)[0] == 200  # the server holds this connection
            # A slow client: half of the body, then SIGTERM while the server waits for the rest.
            half = len(slow.body) // 2
            connection.sendall(head.format(len(slow.body)).encode() + slow.body[:half])
            time.sleep(1.0)  # the server reads the head and starts the request: nothing to poll for
            server.process.send_signal(signal.SIGTERM)
            assert wait_until(lambda: any("SIGTERM: stopping" in line for line in server.output), seconds=30)
            assert wait_until(lambda: _refuses_connections(server.host, server.port), seconds=30)
            assert server.process.poll() is None  # still finishing the request in flight
            connection.sendall(slow.body[half:])
            status, answer = _read_response(connection)
            assert status == 200
            assert [prediction["caption"] for prediction in answer["predictions"]] == slow.captions
        assert server.process.wait(60) == 0
        assert server.log_text().count(f'"POST {bench_load.PREDICT}" 200 ') == 2
        assert "Traceback" not in server.log_text()
