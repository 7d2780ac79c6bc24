"""The `serve` command: a model server in TensorFlow Serving's REST and gRPC shapes, with an upload page.

    python run_pipeline.py serve --model OUT/saved_model --port 8501 --grpc-port 8500 [--max-batch-size 16]
    python run_pipeline.py serve --model-config-file OUT/serving/models.config \
        --batching-parameters-file OUT/serving/batching_parameters.txt

    POST /v1/models/captioner[/versions/1 | /labels/stable]:predict
         {"instances": [{"b64": "<base64 image>"}, ...]}       (row format)
      -> {"predictions": [{"caption": "...", "score": -4.2, "captions": "...", "scores": -4.2}, ...]}
         {"inputs": {"images": [{"b64": "..."}, ...]}}          (columnar format)
      -> {"outputs": {"captions": [...], "scores": [...]}}
         "signature_name": "caption_features" with 2048-number feature rows as instances
    GET  /v1/models/captioner[/versions/1]            model status, as TF Serving answers it
    GET  /v1/models/captioner[/versions/1]/metadata   the SavedModel's signature defs, TF Serving's JSON
    GET  /monitoring/prometheus/metrics               Prometheus text (TF Serving's path)
    GET  /                                            an upload page: pick an image, see its caption
    gRPC tensorflow.serving.PredictionService (Predict, GetModelMetadata), ModelService (GetModelStatus)

The server itself is `pipeline.serving.server` (connections, batching, metrics, life cycle)
over `pipeline.serving.rest_api` (request and answer bodies) and
`pipeline.serving.exported_model` (the loaded SavedModel), with `grpc_api` (gRPC), `warmup`
(the export's warm-up requests, replayed at start-up) and `tf_serving_files` (models.config,
batching_parameters.txt).
"""

from pipeline.serving import server

DEFAULT_GRPC_PORT = 8500  # TF Serving's gRPC port (its REST port, 8501, is --port's default)


def run_serve(model_dir, host="127.0.0.1", port=8501, max_body_mb=16.0, max_images=32, max_batch_size=16,
              batch_timeout_ms=server.DEFAULT_BATCH_TIMEOUT_MS, num_batch_threads=None, read_timeout_s=60.0,
              grpc_port=DEFAULT_GRPC_PORT, model_config_file=None, batching_parameters_file=None):
    """Serves `model_dir` over REST (and gRPC on `grpc_port`, unless None) until SIGTERM or Ctrl-C; prints the URLs first.

    `num_batch_threads` None is the CPU cores; TF Serving's `model_config_file` and
    `batching_parameters_file` decide over the other arguments (`server.make_server`); bad
    settings, files or a missing model raise PipelineError.
    """
    caption_server = server.make_server(model_dir, host, port, max_body_mb, max_images, max_batch_size,
                                        batch_timeout_ms, num_batch_threads, read_timeout_s, grpc_port=grpc_port,
                                        model_config_file=model_config_file,
                                        batching_parameters_file=batching_parameters_file)
    caption_server.run()
