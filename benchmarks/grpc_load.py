"""bench_load's load over gRPC: TF Serving's client (`tensorflow-serving-api`) against a `serve` process.

The same plan as the REST load (`bench_load.plan`: one image a request through
`serving_default`, every tenth request malformed), sent by `bench_load.CLIENTS` threads,
each with its own channel (as each REST client has its own keep-alive connection), to the
server's gRPC port; the server's RSS is sampled meanwhile. A good request must come back OK
with its expected caption; a malformed one with the status code TF Serving gives it.
"""

import time

import grpc
import numpy as np
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2

from benchmarks import bench_load

# The codes the server may answer a malformed request with (gRPC itself refuses an oversized message).
_PREDICT = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].methods_by_name["Predict"]
PREDICT_METHOD = f"/{_PREDICT.containing_service.full_name}/{_PREDICT.name}"  # as PredictionServiceStub calls it
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.RESOURCE_EXHAUSTED}


def predict_request(images=None, signature="", version=None, tensor=None):
    """A serialized PredictRequest for model "captioner" (bytes): `images` (list of bytes) as DT_STRING [N]."""
    from tensorflow import make_tensor_proto

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "captioner"
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["images"].CopyFrom(tensor if tensor is not None else make_tensor_proto(images))
    return request.SerializeToString()


def good_request(image, caption):
    return bench_load.LoadRequest("image", predict_request([image]), [caption])


def malformed_requests(valid_image, max_images, max_body_bytes):
    """One LoadRequest of each kind of malformed gRPC predict request (list), `captions` None."""
    from tensorflow import make_tensor_proto

    return [
        bench_load.LoadRequest("not-an-image", predict_request([b"plain text, not an image at all"])),
        bench_load.LoadRequest("wrong-dtype", predict_request(tensor=make_tensor_proto(np.zeros(1, np.float32)))),
        bench_load.LoadRequest("unknown-signature", predict_request([valid_image], signature="classify")),
        bench_load.LoadRequest("unknown-version", predict_request([valid_image], version=9)),
        bench_load.LoadRequest("too-many-instances", predict_request([valid_image] * (max_images + 1))),
        bench_load.LoadRequest("oversized-message", predict_request([b"\xff\xd8\xff" + b" " * max_body_bytes])),
    ]


def _check(request, response, error):
    """Why the answer is wrong for `request` (str), or None if it is right."""
    if request.captions is None:
        if error is None:
            return "answered OK, expected a refusal"
        return None if error.code() in REFUSALS else f"{error.code().name}: {error.details()}"
    if error is not None:
        return f"{error.code().name}: {error.details()}"
    captions = [text.decode("utf-8") for text in response.outputs["captions"].string_val]
    return None if captions == request.captions else f"captions {captions} != expected {request.captions}"


def run_grpc_load(server, requests, clients=bench_load.CLIENTS):
    """Sends `requests` (LoadRequests of serialized PredictRequests) to `server`'s gRPC port; a LoadResult."""

    def client(first, outcomes):
        with grpc.insecure_channel(f"{server.host}:{server.grpc_port}") as channel:
            # PredictionServiceStub's Predict method, taking requests serialized beforehand as the REST
            # load's bodies are, so the clients' time goes to the server's answers.
            predict = channel.unary_unary(PREDICT_METHOD, response_deserializer=predict_pb2.PredictResponse.FromString)
            for index in range(first, len(requests), clients):
                sent = time.perf_counter()
                response = error = None
                try:
                    response = predict(requests[index].body, timeout=bench_load.REQUEST_TIMEOUT_SECONDS)
                except grpc.RpcError as raised:
                    error = raised
                outcomes[index] = ((time.perf_counter() - sent) * 1000.0, _check(requests[index], response, error))

    return bench_load.drive_clients(server, requests, clients, client)
