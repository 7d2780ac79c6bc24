"""The names of the files and folders of a run folder `OUT/`, each defined here once.

Stages take these names from `pipeline.data.run_folder`, which reads `OUT/` for them. They
live in this leaf, which imports nothing, because the modules that own a file's format
(`pipeline.core.config`, `pipeline.data.datasets`, `pipeline.data.features`) need them
too, and `run_folder` reads through those modules: defined there, they would import
each other.
"""

# Written by `extract`.
CONFIG_FILE = "config.json"  # every setting that produced the artifacts beside it
CAPTIONS_FILE = "captions.json"  # the normalized dataset
VOCAB_FILE = "vocab.json"
FEATURES_FILE = "features.h5"  # the image vectors, one row per image
FEATURES_SHARD_PATTERN = "features.shard-{index}-of-{count}.h5"  # one shard of a sharded `extract`
EXTRACT_ERRORS_FILE = "extract_errors.json"  # the images extraction could not use, with the reason
EXTRACT_ERRORS_SHARD_PATTERN = "extract_errors.shard-{index}-of-{count}.json"

# Written by `train`.
DECODER_FILE = "decoder.keras"  # the decoder the later stages use (after `finetune`: the fine-tuned one)
HISTORY_FILE = "history.json"  # one entry per validation period
CHECKPOINT_DIR = "checkpoints"  # Keras BackupAndRestore's files and STOPPING_FILE
STOPPING_FILE = "stopping.json"  # in CHECKPOINT_DIR: the early-stopping state of the last periods
LOG_DIR = "logs"  # TensorBoard

# Written by `finetune`.
XE_DECODER_FILE = "decoder_xe.keras"  # the cross-entropy decoder fine-tuning started from
FINETUNE_HISTORY_FILE = "finetune_history.json"
FINETUNE_CHECKPOINT_DIR = "finetune_checkpoints"
REWARD_STATE_FILE = "reward_state.npz"  # in FINETUNE_CHECKPOINT_DIR: the CIDEr-D document frequencies
FINETUNE_LOG_DIR = "logs/finetune"

# Written by `evaluate`.
METRICS_FILE = "metrics.json"
XE_METRICS_FILE = "metrics_xe.json"  # the cross-entropy decoder's, after `finetune`
TEST_CAPTIONS_FILE = "captions_test.json"
REPORT_FILE = "report.html"

# Written by `export`.
SAVED_MODEL_DIR = "saved_model"
SERVING_DIR = "serving"  # TF Serving's base path: serving/<model name>/<version>/

# A multi-worker run's non-chief worker writes here instead of OUT (removed when it ends).
WORKER_SCRATCH_PATTERN = ".worker-{task_type}-{task_id}.tmp"
# `python run_pipeline.py` (the demo) generates its dataset into OUT/data/.
DEMO_DATA_DIR = "data"
