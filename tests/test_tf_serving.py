"""What `export` writes for TF Serving (warm-up requests, models.config, batching_parameters.txt), read with
TF Serving's own protos and tools, and `serve` run from the same files."""

import http.client
import io
import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from pipeline.core import errors
from pipeline.serving import tf_serving_files, warmup
from pipeline.serving import server as http_server
from tests.helpers import wait_until

REPOSITORY = Path(__file__).resolve().parents[1]
# TF Serving's batching guide documents these four, each an Int64Value (`{ value: N }`) in
# session_bundle_config.proto's BatchingParameters, with these field numbers.
DOCUMENTED_BATCHING_FIELDS = {"max_batch_size": 1, "batch_timeout_micros": 2, "max_enqueued_batches": 3,
                              "num_batch_threads": 4}


def test_exported_warmup_requests_replay_against_the_saved_model(exported_out):
    for model_dir in (exported_out / "saved_model", exported_out / "serving" / "captioner" / "1"):
        path = model_dir / "assets.extra" / "tf_serving_warmup_requests"
        records = [prediction_log_pb2.PredictionLog.FromString(record.numpy())
                   for record in tf.data.TFRecordDataset(str(path))]
        assert 1 <= len(records) <= 1000  # TF Serving's limit
        assert [record.WhichOneof("log_type") for record in records] == ["predict_log"] * len(records)
    loaded = tf.saved_model.load(str(exported_out / "saved_model"))
    seen = set()
    for record in records:
        request = record.predict_log.request
        signature = request.model_spec.signature_name
        inputs = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
        outputs = loaded.signatures[signature](**inputs)
        captions = [text.decode("utf-8") for text in outputs["captions"].numpy()]
        assert len(captions) == len(next(iter(inputs.values()))) and all(captions)
        assert outputs["scores"].dtype == tf.float32
        seen.add((signature, *[f"{name}:{tensor.dtype.name}:{tensor.shape.rank}" for name, tensor in inputs.items()]))
    # A JPEG and a PNG through serving_default, a float32 batch through caption_features.
    images = [tf.make_ndarray(record.predict_log.request.inputs["images"])[0] for record in records
              if record.predict_log.request.model_spec.signature_name == "serving_default"]
    assert sorted(image[:3] for image in images) == [b"\x89PN", b"\xff\xd8\xff"]
    assert seen == {("serving_default", "images:string:1"), ("caption_features", "features:float32:2")}


def test_models_config_parses_as_tf_servings_model_server_config(exported_out):
    config = text_format.Parse((exported_out / "serving" / "models.config").read_text(),
                               model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == "captioner" and model.model_platform == "tensorflow"
    # The tensorflow/serving image's model root, where OUT/serving is mounted: TF Serving takes absolute paths only.
    assert model.base_path == "/models/captioner"
    assert list(model.model_version_policy.specific.versions) == [1]
    assert dict(model.version_labels) == {"stable": 1}
    served = tf_serving_files.read_models_config(exported_out / "serving" / "models.config")
    assert served.model_dir == exported_out / "serving" / "captioner" / "1" and served.labels == (("stable", 1),)


def test_batching_parameters_hold_the_documented_fields_with_serves_defaults(exported_out):
    text = (exported_out / "serving" / "batching_parameters.txt").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    fields = {}
    for line in lines:  # the guide's format, one field a line: `name { value: N }`, N an integer
        match = re.fullmatch(r"(\w+) \{ value: (\d+) \}", line)
        assert match, line
        fields[match[1]] = int(match[2])
    assert list(fields) == list(DOCUMENTED_BATCHING_FIELDS)
    defaults = http_server.ServeSettings()
    assert fields == {"max_batch_size": defaults.max_batch_size,
                      "batch_timeout_micros": round(defaults.batch_timeout_ms * 1000),
                      "max_enqueued_batches": defaults.requests_in_flight,
                      "num_batch_threads": defaults.num_batch_threads}
    # The proto the file is parsed with has TF Serving's field numbers and wrapper types.
    descriptor = tf_serving_files.BatchingParameters.DESCRIPTOR
    assert descriptor.full_name == "tensorflow.serving.BatchingParameters"
    for name, number in DOCUMENTED_BATCHING_FIELDS.items():
        field = descriptor.fields_by_name[name]
        assert field.number == number and field.message_type.full_name == "google.protobuf.Int64Value"
    assert tf_serving_files.read_batching_parameters(exported_out / "serving" / "batching_parameters.txt") == (
        fields, [])


@pytest.mark.parametrize("text, message", [
    ("max_batch_size: 8\n", 'Expected "{"'),
    ("max_batch_size { value: 1.5 }\n", "Couldn't parse integer"),
    ("max_batch_size { value: 8 }\nbatch_size { value: 8 }\n", "batch_size"),
])
def test_a_batching_file_tf_serving_would_refuse_is_refused(tmp_path, text, message):
    path = tmp_path / "batching_parameters.txt"
    path.write_text(text)
    with pytest.raises(errors.PipelineError, match=re.escape(message)):
        tf_serving_files.read_batching_parameters(path)


def test_a_damaged_warmup_file_stops_the_server_as_in_tf_serving(tmp_path, exported_out):
    model_dir = tmp_path / "model"
    (model_dir / "assets.extra").mkdir(parents=True)
    (model_dir / "assets.extra" / "tf_serving_warmup_requests").write_bytes(b"not a TFRecord file at all")
    with pytest.raises(errors.ArtifactError, match="not a readable file of PredictionLog records"):
        warmup.read_warmup_file(model_dir)


def test_serve_logs_the_warmup_before_reporting_available(exported_captioner):
    assert warmup.read_warmup_file(exported_captioner.model_dir)
    log = io.StringIO()
    settings = http_server.ServeSettings(port=0)
    server = http_server.CaptionServer(exported_captioner, settings, log_stream=log)
    assert server.model_state == "LOADING"
    with server:
        assert server.model_state == "AVAILABLE"
        assert server.warmup_report.requests == 3 and server.warmup_report.seconds > 0
        assert re.search(r"warm-up: 3 requests of tf_serving_warmup_requests replayed in \d+\.\d\d s", log.getvalue())


def test_status_says_loading_until_the_warmup_is_done(exported_captioner):
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    settings = http_server.ServeSettings(port=0, grpc_port=0)
    server = http_server.CaptionServer(exported_captioner, settings, log_stream=io.StringIO())
    server.warmup_records = server.warmup_records * 8  # a warm-up long enough to be seen
    starting = threading.Thread(target=server.start)
    starting.start()
    try:
        assert wait_until(lambda: server.grpc_address is not None, seconds=60)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "captioner"
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_address[1]}") as channel:
            (status,) = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request).model_version_status
        connection = http.client.HTTPConnection(*server.server_address, timeout=60)
        connection.request("GET", "/v1/models/captioner")
        rest_state = json.loads(connection.getresponse().read())["model_version_status"][0]["state"]
        connection.close()
        assert status.state == get_model_status_pb2.ModelVersionStatus.LOADING and rest_state == "LOADING"
        assert server.warmup_report is None
    finally:
        starting.join()
        server.stop()
    assert server.warmup_report.requests == 24 and server.model_state == "AVAILABLE"


def test_serve_runs_from_models_config_and_batching_file(tmp_path, exported_out, exported_captioner):
    serving = tmp_path / "serving"
    (serving / "captioner").mkdir(parents=True)
    (serving / "captioner" / "1").symlink_to(exported_out / "serving" / "captioner" / "1")
    (serving / "models.config").write_text((exported_out / "serving" / "models.config").read_text())
    (serving / "batching_parameters.txt").write_text(
        tf_serving_files.batching_parameters_text(max_batch_size=4, batch_timeout_micros=5000, max_enqueued_batches=6,
                                                  num_batch_threads=1))
    command = [sys.executable, str(REPOSITORY / "run_pipeline.py"), "serve", "--port", "0", "--grpc-port", "0",
               "--model-config-file", str(serving / "models.config"),
               "--batching-parameters-file", str(serving / "batching_parameters.txt")]
    process = subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = []
        for line in process.stdout:
            banner.append(line)
            if "upload page:" in line:
                break
        text = "".join(banner)
        assert "as model 'captioner' version 1, label 'stable' (batches of up to 4 instances, 5 ms timeout, " \
               "1 batch thread(s))" in text, text
        assert "warm-up: 3 requests" in text
        grpc_port = int(re.search(r"grpc: +127\.0\.0\.1:(\d+)", text)[1])
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "captioner"
        request.model_spec.version_label = "stable"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto([warmup.sample_images()[0]]))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=120)
        expected, _ = exported_captioner.caption_images([warmup.sample_images()[0]])
        assert [text.decode() for text in tf.make_ndarray(response.outputs["captions"])] == expected
        assert np.isfinite(tf.make_ndarray(response.outputs["scores"])).all()
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    assert process.returncode == 0
