"""TF Serving's gRPC API: `tensorflow.serving.PredictionService` and `ModelService`, on `serve --grpc-port`.

    PredictionService.Predict           model_spec {name, version | version_label, signature_name},
                                        inputs {"images": DT_STRING [N]} (serving_default) or
                                        {"features": DT_FLOAT [N, 2048]} (caption_features)
                                     -> outputs {"captions": DT_STRING [N], "scores": DT_FLOAT [N]}
    PredictionService.GetModelMetadata  metadata_field ["signature_def"] -> the SavedModel's SignatureDefMap
    ModelService.GetModelStatus         -> the served version, LOADING while warming up, then AVAILABLE

The servicers are `tensorflow-serving-api`'s generated ones, so any TF Serving client (its
`prediction_service_pb2_grpc.PredictionServiceStub`) works unchanged. Predict requests go into
the same batching queue as REST's (`submit`), so the instances of gRPC and REST requests
arriving together share model calls. Errors carry the status codes and messages TF Serving
gives for the same request: NOT_FOUND for an unknown model or version, INVALID_ARGUMENT for an
unknown version label, a bad tensor, dtype or image, FAILED_PRECONDITION for an unknown
signature (TF Serving's "Serving signature key ... not found."). A request's error is its own:
the batcher reruns a refused batch request by request.

The server is grpcio's thread-pool server: a handler thread waits on its batch's future while
the model runs in the batch threads. Requests beyond `2 * workers` at once get RESOURCE_EXHAUSTED
from grpcio itself, which bounds the memory held by waiting requests.
"""

import concurrent.futures
import dataclasses
import time
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from models import encoder
from pipeline.core import errors
from pipeline.serving import exported_model, tf_serving_files

SIGNATURE_DEF_FIELD = "signature_def"  # the one metadata field TF Serving answers
# signature -> (its one input's name, the dtype it takes, the shape of one instance)
INPUTS = {
    exported_model.SERVING_SIGNATURE: ("images", types_pb2.DT_STRING, ()),
    exported_model.FEATURES_SIGNATURE: ("features", types_pb2.DT_FLOAT, (encoder.FEATURE_DIM,)),
}
OUTPUT_NAMES = ("captions", "scores")
ROUTES = {"Predict": "predict", "GetModelMetadata": "metadata", "GetModelStatus": "status"}  # metrics labels


class Refusal(Exception):
    """Ends an RPC with `code` (grpc.StatusCode) and `message`."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass
class GrpcBackend:
    """What the gRPC API needs from the server it is part of.

    model: tf_serving_files.ServedModel (name, version, labels).
    model_dir: the SavedModel folder (its saved_model.pb holds the signature defs).
    submit: submit(signature, items) -> concurrent.futures.Future of [(caption str, score float)],
      the server's batching queue; items are image bytes or float32 [2048] rows.
    model_state: model_state() -> "LOADING" or "AVAILABLE".
    metrics: the server's `ServeMetrics`: each answered RPC is counted with api="grpc".
    log_stream: text stream of the request log (a line per RPC).
    max_images: instances per request at most (--max-images).
    """

    model: tf_serving_files.ServedModel
    model_dir: Path
    submit: object
    model_state: object
    metrics: object
    log_stream: object
    max_images: int

    def observe(self, method, code, seconds, facts):
        """Counts and logs one answered RPC; facts: {"peer": str, "signature": str, "instances": int}."""
        route = ROUTES[method]
        self.metrics.requests.labels("grpc", route, code).inc()
        self.metrics.latency.labels("grpc", route).observe(seconds)
        if code == "OK" and facts["instances"]:
            self.metrics.captioned.labels(facts["signature"]).inc(facts["instances"])
        images = f" images={facts['instances']}" if facts["instances"] else ""
        print(f'{facts["peer"]} "gRPC {method}" {code} {seconds * 1000.0:.1f}ms{images}', file=self.log_stream,
              flush=True)


class GrpcServer:
    """The gRPC API of one `serve` process; `start()` listens, `stop()` drains."""

    def __init__(self, backend, workers, max_message_bytes):
        self.backend = backend
        self.port = None
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=2 * workers,
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     # grpcio sets SO_REUSEPORT by default: a second server on the same port would
                     # then share it silently instead of failing to start.
                     ("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_PredictionService(backend), self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(backend), self._server)

    def start(self, host, port):
        """Listens on host:port (port 0: a free one); returns the port. PipelineError if it cannot."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise errors.PipelineError(f"cannot listen for gRPC on {address} (--grpc-port; in use?)")
        self._server.start()
        return self.port

    def stop(self, grace_seconds):
        """Refuses new RPCs, lets those in flight finish within `grace_seconds`; returns when stopped."""
        self._server.stop(grace_seconds).wait()


def _answered(method):
    """Wraps a servicer method: Refusal and ModelSpecError end the RPC with their code; each RPC is observed."""

    def handler(self, request, context):
        started = time.perf_counter()
        facts = {"peer": context.peer(), "signature": "", "instances": 0}
        code = grpc.StatusCode.OK
        try:
            return method(self, request, context, facts)
        except tf_serving_files.ModelSpecError as error:
            code = grpc.StatusCode[error.code]
            context.abort(code, error.message)
        except Refusal as error:
            code = error.code
            context.abort(code, error.message)
        except Exception as error:  # noqa: BLE001 - a server bug answers INTERNAL, the server goes on
            code = grpc.StatusCode.INTERNAL
            context.abort(code, f"internal error: {type(error).__name__}: {error}")
        finally:
            self.backend.observe(method.__name__, code.name, time.perf_counter() - started, facts)

    handler.__name__ = method.__name__
    return handler


def _version_of(model_spec):
    """The version a ModelSpec asks for (int or None) and its label (str or None)."""
    choice = model_spec.WhichOneof("version_choice")
    if choice == "version":
        return model_spec.version.value, None
    if choice == "version_label":
        return None, model_spec.version_label
    return None, None


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, backend):
        self.backend = backend
        self.signature_defs = exported_model.read_signature_defs(backend.model_dir)

    @_answered
    def Predict(self, request, context, facts):
        model = self.backend.model
        version = model.resolve(request.model_spec.name, *_version_of(request.model_spec))
        signature = request.model_spec.signature_name or exported_model.SERVING_SIGNATURE
        if signature not in INPUTS or signature not in self.signature_defs:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature}" not found.')
        facts["signature"] = signature
        input_name = INPUTS[signature][0]
        items = _read_input(signature, request.inputs, self.backend.max_images)
        facts["instances"] = len(items)
        outputs = _output_names(request.output_filter)
        try:
            results = self.backend.submit(signature, items).result()
        except tf.errors.InvalidArgumentError as error:
            raise _diagnose(signature, input_name, items, error) from None
        response = predict_pb2.PredictResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = version
        response.model_spec.signature_name = signature
        captions = np.array([text.encode("utf-8") for text, _ in results], dtype=object)
        scores = np.array([score for _, score in results], dtype=np.float32)
        for name, values in (("captions", captions), ("scores", scores)):
            if name in outputs:
                response.outputs[name].CopyFrom(tf.make_tensor_proto(values))
        return response

    @_answered
    def GetModelMetadata(self, request, context, facts):
        if not request.HasField("model_spec"):
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        if not request.metadata_field:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                           "GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != SIGNATURE_DEF_FIELD:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
        model = self.backend.model
        version = model.resolve(request.model_spec.name, *_version_of(request.model_spec))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in self.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature_def)
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
        return response


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, backend):
        self.backend = backend

    @_answered
    def GetModelStatus(self, request, context, facts):
        version = self.backend.model.resolve_status(request.model_spec.name, *_version_of(request.model_spec))
        response = get_model_status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add()
        status.version = version
        status.state = get_model_status_pb2.ModelVersionStatus.State.Value(self.backend.model_state())
        return response  # status.status: error_code OK, empty message, as TF Serving answers a loaded model


def _dtype_name(dtype):
    """TensorFlow's name of a DataType enum in its messages: DT_FLOAT -> "float"."""
    return types_pb2.DataType.Name(dtype)[3:].lower()


def _read_input(signature, inputs, max_images):
    """The instances (list of bytes, or of float32 [2048] rows) of a Predict request's `inputs`; Refusal if bad."""
    input_name, dtype, instance_shape = INPUTS[signature]
    if list(inputs) != [input_name]:
        sent, extra = sorted(inputs), sorted(set(inputs) - {input_name})
        missing = "" if input_name in inputs else input_name
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f"input size does not match signature: {len(inputs)}!=1 len({{{','.join(sent)}}}) != "
                       f"len({{{input_name}}}). Sent extra: {{{','.join(extra)}}}. Missing but required: {{{missing}}}.")
    proto = inputs[input_name]
    if proto.dtype != dtype:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f"Expects arg[0] to be {_dtype_name(dtype)} but {_dtype_name(proto.dtype)} is provided")
    try:
        array = tf.make_ndarray(proto)
    except (ValueError, TypeError):
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {input_name}") from None
    if array.ndim != 1 + len(instance_shape) or tuple(array.shape[1:]) != instance_shape:
        wanted = ", ".join(["N", *map(str, instance_shape)])
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f"input {input_name} must have shape [{wanted}], got {list(array.shape)}")
    if not 1 <= len(array) <= max_images:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f"input {input_name} has {len(array)} instances: send 1 to {max_images} per request "
                       f"(--max-images)")
    if signature != exported_model.SERVING_SIGNATURE:
        return list(array)
    items = [bytes(item) for item in array]
    for index, image_bytes in enumerate(items):
        problem = exported_model.header_problem(image_bytes)
        if problem:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{input_name}[{index}]: {problem}")
    return items


def _output_names(output_filter):
    """The outputs to answer: all, or those `output_filter` names (Refusal for an unknown one)."""
    for name in output_filter:
        if name not in OUTPUT_NAMES:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                           f"output tensor alias not found in signature: {name} Outputs expected to be in the "
                           f"set {{{','.join(OUTPUT_NAMES)}}}.")
    return set(output_filter) or set(OUTPUT_NAMES)


def _diagnose(signature, input_name, items, error):
    """The Refusal for a request whose own model call was refused: which image, and why."""
    if signature == exported_model.SERVING_SIGNATURE:
        for index, image_bytes in enumerate(items):
            problem = exported_model.image_problem(image_bytes)
            if problem:
                return Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{input_name}[{index}]: {problem}")
    return Refusal(grpc.StatusCode.INVALID_ARGUMENT, errors.op_error_reason(error))
