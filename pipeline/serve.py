"""The `serve` command: an HTTP model server in TensorFlow Serving's REST shape, with an upload page.

    python run_pipeline.py serve --model OUT/saved_model --port 8501 [--max-batch-size 16]

    POST /v1/models/captioner[/versions/1]:predict
         {"instances": [{"b64": "<base64 image>"}, ...]}       (row format)
      -> {"predictions": [{"caption": "...", "score": -4.2, "captions": "...", "scores": -4.2}, ...]}
         {"inputs": {"images": [{"b64": "..."}, ...]}}          (columnar format)
      -> {"outputs": {"captions": [...], "scores": [...]}}
         "signature_name": "caption_features" with 2048-number feature rows as instances
    GET  /v1/models/captioner[/versions/1]            model status, as TF Serving answers it
    GET  /v1/models/captioner[/versions/1]/metadata   the SavedModel's signature defs, TF Serving's JSON
    GET  /monitoring/prometheus/metrics               Prometheus text (TF Serving's path)
    GET  /                                            an upload page: pick an image, see its caption

The server itself is `pipeline.serving.server` (connections, batching, metrics, life cycle)
over `pipeline.serving.rest_api` (request and answer bodies) and
`pipeline.serving.exported_model` (the loaded SavedModel).
"""

from pipeline.serving import server


def run_serve(model_dir, host="127.0.0.1", port=8501, max_body_mb=16.0, max_images=32, max_batch_size=16,
              batch_timeout_ms=server.DEFAULT_BATCH_TIMEOUT_MS, num_batch_threads=None, read_timeout_s=60.0):
    """Serves `model_dir` over HTTP until SIGTERM or Ctrl-C; prints the URL first.

    `num_batch_threads` None is the CPU cores; bad settings or a missing model raise PipelineError.
    """
    caption_server = server.make_server(model_dir, host, port, max_body_mb, max_images, max_batch_size,
                                        batch_timeout_ms, num_batch_threads, read_timeout_s)
    caption_server.run()
