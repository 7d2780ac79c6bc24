"""TensorFlow Serving's REST API, without the HTTP: request bodies in, checked calls and answer bodies out.

    POST /v1/models/captioner[/versions/1 | /labels/stable]:predict
         {"instances": [{"b64": "<base64 image>"}, ...]}       (row format)
         {"inputs": {"images": [{"b64": "..."}, ...]}}          (columnar format)
         "signature_name": "caption_features" with 2048-number feature rows as instances
    GET  /v1/models/captioner[/versions/1 | /labels/stable]            `status_body()`
    GET  /v1/models/captioner[/versions/1 | /labels/stable]/metadata   `metadata_body()`: the signature defs

(the model's name, version and labels are the served model's: `tf_serving_files.ServedModel`).

`parse_predict` turns a predict body into a `PredictCall` or raises `RequestError` naming
the field and instance at fault; `diagnose` names the instance the model refused. Nothing
here touches a socket, so the HTTP server (`pipeline.serving.server`) and any other front
end answer the same requests with the same messages.
"""

import base64
import binascii
import dataclasses
import http
import json
import re

from google.protobuf import json_format

from models import encoder
from pipeline.core import errors
from pipeline.serving import exported_model

MODEL_NAME = "captioner"
MODEL_VERSION = "1"
FEATURE_DIM = encoder.FEATURE_DIM  # floats in one `caption_features` instance


class RequestError(Exception):
    """A client error: becomes an HTTP `status` response with `{"error": message}`.

    `close`: the connection cannot carry another request (its body is left unread).
    """

    def __init__(self, status, message, close=False):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.close = close


def status_body(version=int(MODEL_VERSION), state="AVAILABLE"):
    """The model-status answer (dict), as TF Serving gives it: `state` "LOADING" while the
    warm-up requests replay, then "AVAILABLE"."""
    return {"model_version_status": [{
        "version": str(version), "state": state, "status": {"error_code": "OK", "error_message": ""},
    }]}


def metadata_body(signature_defs, metadata, name=MODEL_NAME, version=int(MODEL_VERSION)):
    """The metadata answer (dict): TF Serving's, plus `metadata.captioner`.

    Args:
      signature_defs: `read_signature_defs(model_dir)` of the served model.
      metadata: the export's `assets.extra/captioner.json` (dict; {} when absent).
      name, version: the served model's name (str) and version (int).
    """
    return {
        "model_spec": {"name": name, "signature_name": "", "version": str(version)},
        "metadata": {
            "signature_def": {"signature_def": signature_defs},
            # Ours, beside TF Serving's one key: what produced the export.
            "captioner": {
                "decode": metadata.get("config", {}).get("decode", {}),
                "encoder": metadata.get("encoder", {}),
                "vocabulary_size": metadata.get("vocabulary_size"),
            },
        },
    }


@dataclasses.dataclass
class PredictCall:
    """A checked predict request: its signature, instances and which format answers it."""

    signature: str
    items: list  # bytes (images) or lists of FEATURE_DIM floats
    columnar: bool
    field: str  # "instances" or "inputs", for error messages


def parse_predict(body, max_images):
    """Parses and checks a predict body (bytes) into a PredictCall; RequestError if it is bad.

    Images are only header-checked here (`exported_model.header_problem`): the model's decode
    is the one decode of a good image.
    """
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(http.HTTPStatus.BAD_REQUEST, f"request body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise RequestError(http.HTTPStatus.BAD_REQUEST,
                           f'request must be a JSON object like {{"instances": [...]}}, got {type(request).__name__}')
    signature = request.get("signature_name", exported_model.SERVING_SIGNATURE)
    if signature not in (exported_model.SERVING_SIGNATURE, exported_model.FEATURES_SIGNATURE):
        raise RequestError(http.HTTPStatus.BAD_REQUEST,
                           f"unknown signature_name {signature!r}: use {exported_model.SERVING_SIGNATURE!r} "
                           f"or {exported_model.FEATURES_SIGNATURE!r}")
    if ("instances" in request) == ("inputs" in request):
        raise RequestError(http.HTTPStatus.BAD_REQUEST,
                           'request must have exactly one of "instances" (rows) or "inputs" (columns)')
    columnar = "inputs" in request
    items = request["inputs"] if columnar else request["instances"]
    input_name = "images" if signature == exported_model.SERVING_SIGNATURE else "features"
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
    if len(items) > max_images:
        raise RequestError(http.HTTPStatus.BAD_REQUEST,
                           f'"{field}" has {len(items)} items, more than the limit of '
                           f"{max_images} per request (--max-images)")
    read = _instance_image if signature == exported_model.SERVING_SIGNATURE else _instance_features
    items = [read(item, index, field, unwrap=not columnar) for index, item in enumerate(items)]
    return PredictCall(signature, items, columnar, field)


def diagnose(call, error):
    """The RequestError (to raise) for a request whose own model call was refused."""
    if call.signature == exported_model.SERVING_SIGNATURE:
        # Instances were only header-checked: decode each on its own to name the one that failed.
        for index, image_bytes in enumerate(call.items):
            problem = exported_model.image_problem(image_bytes)
            if problem:
                return RequestError(http.HTTPStatus.BAD_REQUEST, f"{call.field}[{index}]: {problem}")
        return RequestError(http.HTTPStatus.BAD_REQUEST,
                            f"the model cannot decode an image ({errors.op_error_reason(error)})")
    return RequestError(http.HTTPStatus.BAD_REQUEST, f"the model refused the features ({errors.op_error_reason(error)})")


def read_signature_defs(model_dir):
    """The SavedModel's signature defs in TF Serving's metadata JSON (dict name -> SignatureDef).

    Read from `saved_model.pb` itself, so dtypes ("DT_STRING"), shapes (`tensor_shape.dim`,
    sizes as strings) and tensor names are the export's own, printed the way TF Serving
    prints them (proto field names, fields at their defaults included).
    """
    return {name: json_format.MessageToDict(signature_def, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)
            for name, signature_def in exported_model.read_signature_defs(model_dir).items()}


def model_path(path, model):
    """The part of `path` after /v1/models/NAME[/versions/N | /labels/LABEL] of the served model, or None.

    `model`: the served `tf_serving_files.ServedModel`. None for other paths, models and
    versions; a label the model does not have is TF Serving's 400 (an INVALID_ARGUMENT).
    """
    match = re.fullmatch(rf"/v1/models/{re.escape(model.name)}(?:/versions/([^/:]+)|/labels/([^/:]+))?"
                         rf"(/metadata|:predict)?", path)
    if match is None:
        return None
    version, label, rest = match.groups()
    if version is not None and version != str(model.version):
        return None
    if label is not None and label not in dict(model.labels):
        raise RequestError(http.HTTPStatus.BAD_REQUEST, f"Unrecognized servable version label: {label}")
    return rest or ""


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
    problem = exported_model.header_problem(image_bytes)
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
    """A JSON value as an error message quotes it: at most 60 characters."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
