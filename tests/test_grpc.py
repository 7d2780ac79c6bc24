"""TF Serving's gRPC API of `serve`, driven by TF Serving's own client (`tensorflow-serving-api`) over a real
channel on 127.0.0.1, beside the REST API of the same server."""

import base64
import concurrent.futures
import http.client
import io
import json
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from pipeline.data import features
from pipeline.serving import server as http_server
from pipeline.serving import tf_serving_files
from tests.helpers import metric_change, metric_samples, run_images

MAX_IMAGES = 4
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def served(exported_captioner):
    """(server, log): REST and gRPC on free ports, model "captioner" version 1 labelled "stable"."""
    log = io.StringIO()
    model = tf_serving_files.ServedModel("captioner", exported_captioner.model_dir, 1, (("stable", 1),))
    settings = http_server.ServeSettings(port=0, grpc_port=0, max_images=MAX_IMAGES, batch_timeout_ms=300)
    with http_server.CaptionServer(exported_captioner, settings, log_stream=log, model=model) as server:
        yield server, log


@pytest.fixture(scope="module")
def channel(served):
    server, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_address[1]}") as channel:
        yield channel


@pytest.fixture(scope="module")
def demo_images(exported_out):
    """Bytes of four demo images of the run (list of bytes)."""
    return run_images(exported_out, 4)


def predict_request(images=None, signature="", model="captioner", version=None, label=None, tensor=None):
    """A PredictRequest as a TF Serving client builds it: `images` (list of bytes) as a DT_STRING [N] tensor."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    if tensor is None:
        tensor = tf.make_tensor_proto(images, dtype=tf.string)
    request.inputs["features" if signature == "caption_features" else "images"].CopyFrom(tensor)
    return request


def predict(channel, request):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=TIMEOUT_S)


def captions_of(response):
    return [text.decode("utf-8") for text in tf.make_ndarray(response.outputs["captions"])]


def rest_predict(server, body, path="/v1/models/captioner:predict"):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=TIMEOUT_S)
    try:
        connection.request("POST", path, body=json.dumps(body).encode())
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_predict_on_serving_default_gives_rest_captions(served, channel, demo_images):
    server, _ = served
    response = predict(channel, predict_request(demo_images))
    status, answer = rest_predict(server, {"instances": [{"b64": base64.b64encode(image).decode()}
                                                         for image in demo_images]})
    assert status == 200
    assert captions_of(response) == [prediction["caption"] for prediction in answer["predictions"]]
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]),
                               [prediction["score"] for prediction in answer["predictions"]], rtol=1e-6)
    assert response.outputs["scores"].dtype == tf.float32.as_datatype_enum
    assert response.model_spec.name == "captioner" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    # The label and the explicit version name the same model.
    assert captions_of(predict(channel, predict_request(demo_images[:1], label="stable"))) == captions_of(response)[:1]
    assert captions_of(predict(channel, predict_request(demo_images[:1], version=1))) == captions_of(response)[:1]


def test_predict_on_caption_features_takes_a_float_tensor(served, channel, exported_out, exported_captioner):
    rows = np.asarray(features.read_features(exported_out).features[:3], dtype=np.float32)
    request = predict_request(signature="caption_features", tensor=tf.make_tensor_proto(rows))
    response = predict(channel, request)
    expected, _ = exported_captioner.caption_features(rows)
    assert captions_of(response) == expected
    assert response.model_spec.signature_name == "caption_features"


def test_get_model_metadata_gives_the_signature_defs_of_rest(served, channel):
    server, _ = served
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "captioner"
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=TIMEOUT_S)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    assert signature_map.signature_def["serving_default"].inputs["images"].dtype == tf.string.as_datatype_enum
    assert signature_map.signature_def["caption_features"].inputs["features"].dtype == tf.float32.as_datatype_enum
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=TIMEOUT_S)
    connection.request("GET", "/v1/models/captioner/metadata")
    rest = json.loads(connection.getresponse().read())["metadata"]["signature_def"]["signature_def"]
    connection.close()
    assert {name: json_format.MessageToDict(signature, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)
            for name, signature in signature_map.signature_def.items()} == rest
    assert response.model_spec.version.value == 1


def test_get_model_status_reports_the_version_available(served, channel):
    server, log = served
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    for spec in ({}, {"version": 1}, {"label": "stable"}):
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "captioner"
        if "version" in spec:
            request.model_spec.version.value = spec["version"]
        if "label" in spec:
            request.model_spec.version_label = spec["label"]
        (status,) = stub.GetModelStatus(request, timeout=TIMEOUT_S).model_version_status
        assert status.version == 1 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert status.status.error_code == 0 and status.status.error_message == ""


def _bad_predicts(images):
    undecodable = images[0][:len(images[0]) // 3]  # a whole JPEG header, then nothing
    float_images = tf.make_tensor_proto(np.zeros((1,), np.float32))
    wrong_input = predict_request(images[:1])
    wrong_input.inputs["pixels"].CopyFrom(wrong_input.inputs.pop("images"))
    return [
        ("wrong signature", predict_request(images[:1], signature="classify"),
         grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "classify" not found.'),
        ("unknown version", predict_request(images[:1], version=2),
         grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(captioner, 2)"),
        ("unknown model", predict_request(images[:1], model="other"),
         grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(other)"),
        ("unknown label", predict_request(images[:1], label="canary"),
         grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: canary"),
        ("undecodable image", predict_request([images[1], undecodable]),
         grpc.StatusCode.INVALID_ARGUMENT, "images[1]: not a readable"),
        ("not an image", predict_request([b"hello"]), grpc.StatusCode.INVALID_ARGUMENT, "images[0]: not a readable"),
        ("wrong dtype", predict_request(tensor=float_images),
         grpc.StatusCode.INVALID_ARGUMENT, "Expects arg[0] to be string but float is provided"),
        ("features as double", predict_request(signature="caption_features",
                                               tensor=tf.make_tensor_proto(np.zeros((1, 2048)))),
         grpc.StatusCode.INVALID_ARGUMENT, "Expects arg[0] to be float but double is provided"),
        ("wrong feature width", predict_request(signature="caption_features",
                                                tensor=tf.make_tensor_proto(np.zeros((1, 7), np.float32))),
         grpc.StatusCode.INVALID_ARGUMENT, "must have shape [N, 2048], got [1, 7]"),
        ("wrong input name", wrong_input, grpc.StatusCode.INVALID_ARGUMENT, "Missing but required: {images}"),
        ("too many images", predict_request(images[:1] * (MAX_IMAGES + 1)),
         grpc.StatusCode.INVALID_ARGUMENT, "(--max-images)"),
    ]


def test_bad_requests_get_tf_servings_status_and_the_server_keeps_answering(served, channel, demo_images):
    expected = captions_of(predict(channel, predict_request(demo_images[:2])))
    for name, request, code, message in _bad_predicts(demo_images):
        with pytest.raises(grpc.RpcError) as raised:
            predict(channel, request)
        assert raised.value.code() == code, name
        assert message in raised.value.details(), (name, raised.value.details())
        assert captions_of(predict(channel, predict_request(demo_images[:2]))) == expected, name
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    for name, version, message in (("other", None, "Could not find any versions of model other"),
                                   ("captioner", 3, "Could not find version 3 of model captioner")):
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        if version:
            request.model_spec.version.value = version
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetModelStatus(request, timeout=TIMEOUT_S)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND and raised.value.details() == message
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["graph"])
    metadata.model_spec.name = "captioner"
    with pytest.raises(grpc.RpcError) as raised:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(metadata, timeout=TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "Metadata field graph is not supported"


def _at_once(server, channel, jobs):
    """The result of each job (api, images), all sent at once: captions, or the gRPC code / HTTP status."""
    barrier = threading.Barrier(len(jobs))

    def call(job):
        api, images = job
        barrier.wait()
        if api == "grpc":
            try:
                return captions_of(predict(channel, predict_request(images)))
            except grpc.RpcError as error:
                return error.code()
        status, answer = rest_predict(server, {"instances": [{"b64": base64.b64encode(image).decode()}
                                                             for image in images]})
        return [prediction["caption"] for prediction in answer["predictions"]] if status == 200 else status

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(call, jobs))


def test_grpc_and_rest_requests_share_batches_and_a_bad_one_fails_alone(served, channel, demo_images):
    server, _ = served
    expected = {image: captions_of(predict(channel, predict_request([image])))[0] for image in demo_images}
    key = ("captioner_batch_size_count", (("signature", "serving_default"),))
    before = metric_samples(server).get(key, 0.0)
    good = [("grpc", demo_images[:2]), ("rest", demo_images[1:3]), ("grpc", demo_images[3:]), ("rest", demo_images[:1])]
    results = _at_once(server, channel, good)
    assert results == [[expected[image] for image in images] for _, images in good]
    assert metric_samples(server)[key] - before < len(good)  # requests of both APIs shared model calls

    undecodable = demo_images[0][:len(demo_images[0]) // 3]  # a whole JPEG header: only the model's decode fails
    mixed = [("grpc", demo_images[:2]), ("grpc", [demo_images[2], undecodable]), ("rest", demo_images[1:3]),
             ("rest", [undecodable])]
    results = _at_once(server, channel, mixed)
    assert results[1] == grpc.StatusCode.INVALID_ARGUMENT and results[3] == 400
    for index in (0, 2):
        assert results[index] == [expected[image] for image in mixed[index][1]]


def test_metrics_count_grpc_calls_by_api(served, channel, demo_images):
    server, log = served
    before = metric_samples(server)
    predict(channel, predict_request(demo_images[:2]))
    with pytest.raises(grpc.RpcError):
        predict(channel, predict_request(demo_images[:1], version=7))
    after = metric_samples(server)

    def change(name, **labels):
        return metric_change(before, after, name, **labels)

    assert change("captioner_requests_total", api="grpc", route="predict", status="OK") == 1
    assert change("captioner_requests_total", api="grpc", route="predict", status="NOT_FOUND") == 1
    assert change("captioner_request_latency_seconds_count", api="grpc", route="predict") == 2
    assert change("captioner_images_captioned_total", signature="serving_default") == 2
    assert change("captioner_requests_total", api="rest", route="metrics", status="200") == 1  # the `before` read
    assert '"gRPC Predict" OK ' in log.getvalue() and '"gRPC Predict" NOT_FOUND ' in log.getvalue()


def test_rest_routes_version_labels(served, demo_images):
    server, _ = served
    body = {"instances": [{"b64": base64.b64encode(demo_images[0]).decode()}]}
    status, by_label = rest_predict(server, body, "/v1/models/captioner/labels/stable:predict")
    assert status == 200
    assert by_label == rest_predict(server, body)[1]
    status, answer = rest_predict(server, body, "/v1/models/captioner/labels/canary:predict")
    assert status == 400 and answer["error"] == "Unrecognized servable version label: canary"
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=TIMEOUT_S)
    connection.request("GET", "/v1/models/captioner/labels/stable")
    answer = json.loads(connection.getresponse().read())
    connection.close()
    assert answer["model_version_status"][0]["state"] == "AVAILABLE"
