"""Distributed training, for `train` and `finetune` alike: the strategy, the cluster, the chief.

`make_strategy(name)` gives the strategy of `train.strategy` / `finetune.strategy`:
"default" (one device), "mirrored" (the local GPUs, or logical CPU devices) or
"multiworker" (the cluster of TF_CONFIG, checked by `check_tf_config`). In a cluster only
the chief writes OUT (`is_chief_worker`); the other workers write to a scratch folder of
their own (`worker_scratch_dir`), and a lost peer becomes one message naming the restart
(`lost_worker_errors`).
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

import tensorflow as tf

from pipeline.core import errors
from pipeline.data import run_folder

# A collective across workers that has not completed in this time fails, so workers whose
# peer hangs stop (for a restart with --resume) instead of waiting forever. A dead peer is
# found sooner, by the coordination service's heartbeats. Generous: the first collective
# (the variables' initial values) also waits for the slowest worker to load its cache.
COLLECTIVE_TIMEOUT_SECONDS = 600


class NestedReduceMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`tf.distribute.MultiWorkerMirroredStrategy` whose `reduce` takes what Keras 3 gives it.

    Keras 3's `fit` and `evaluate` peek at one distributed batch to build the model and
    hand the whole batch, a dict of PerReplica values, to `strategy.reduce`.
    MirroredStrategy reduces such a nest leaf by leaf; the collective strategy's
    `_reduce_to` converts its argument to one tensor and fails ("Attempt to convert a value
    ({'image_features': PerReplica:{...}, ...}) with an unsupported type (<class 'dict'>)").
    Reducing each leaf on its own is what MirroredStrategy does; the leaves of a batch have
    the same shape on every worker (`pipeline.training.inputs` slices them so), as the
    collective needs. Keras also reduces the replicas' scalar logs with `axis=0`, which
    fails on a scalar ("Invalid reduction dimension 0 for input with 0 dimensions"); the
    mean of scalars over replicas is their reduction with `axis=None`. (Reported upstream
    as keras-team/keras#20329 and #20585: Keras 3 `fit` under MultiWorkerMirroredStrategy.)
    """

    def reduce(self, reduce_op, value, axis):
        reduce = super().reduce

        def reduce_leaf(leaf):
            # Keras reduces each replica's scalar logs (loss, metrics) "along axis 0":
            # for scalars that is the mean over replicas, axis None.
            scalar = all(local.shape.rank == 0 for local in self.experimental_local_results(leaf))
            return reduce(reduce_op, leaf, None if scalar else axis)

        return tf.nest.map_structure(reduce_leaf, value)


def make_strategy(name):
    """The tf.distribute strategy named by `train.strategy` (or `finetune.strategy`).

    "default": the current (single-device) strategy. "mirrored": one replica per GPU, or,
    without GPUs, per logical CPU device (`tf.config.set_logical_device_configuration`).
    "multiworker": `NestedReduceMultiWorkerMirroredStrategy` on the cluster of TF_CONFIG,
    checked first (`check_tf_config`). Under "mirrored" and "multiworker" the batch size is
    the global batch, split across replicas; the loss is averaged over the non-pad tokens
    of the whole global batch (`pipeline.training.objective.global_token_mean_loss`), as on one device.
    """
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    if name == "multiworker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS)
        return NestedReduceMultiWorkerMirroredStrategy(communication_options=options)
    return tf.distribute.get_strategy()


def check_tf_config(raw):
    """Raises PipelineError unless `raw` (the TF_CONFIG string or None) describes this worker.

    Expected: {"cluster": {"worker": ["host:port", ...], "chief": [...]?}, "task": {"type":
    "worker"|"chief", "index": int}}, the task's index within its job's address list.
    """
    example = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}\'')
    if not raw:
        raise errors.PipelineError(
            f"--strategy multiworker needs the TF_CONFIG environment variable on every worker, e.g. {example}"
        )
    try:
        tf_config = json.loads(raw)
    except ValueError as error:
        raise errors.PipelineError(f"TF_CONFIG is not valid JSON ({error}); expected e.g. {example}") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
        raise errors.PipelineError(f"TF_CONFIG has no cluster with a 'worker' (or 'chief') address list; expected e.g. {example}")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a for a in addresses):
            raise errors.PipelineError(f"TF_CONFIG cluster[{job!r}] must be a list of 'host:port' strings, got {addresses!r}")
    if not isinstance(task, dict) or task.get("type") not in ("worker", "chief"):
        raise errors.PipelineError(f"TF_CONFIG task must be {{'type': 'worker' or 'chief', 'index': N}}, got {task!r}")
    index, addresses = task.get("index"), cluster.get(task["type"], [])
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(addresses):
        raise errors.PipelineError(
            f"TF_CONFIG task index {index!r} does not name one of the {len(addresses)} "
            f"{task['type']!r} address(es) of the cluster"
        )


def distribute_datasets(strategy, make_train, make_val):
    """(train, val) datasets for `model.fit` under `strategy`.

    make_train, make_val: input_context (tf.distribute.InputContext or None) -> tf.data.Dataset.
    Under a multi-worker strategy every worker builds the same global batches and takes
    its replicas' slices of each (the `input_context` of `pipeline.training.inputs`), through
    `strategy.distribute_datasets_from_function`; elsewhere the plain global-batch
    datasets, which Keras splits across the local replicas itself.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return make_train(None), make_val(None)
    return (strategy.distribute_datasets_from_function(make_train),
            strategy.distribute_datasets_from_function(make_val))


@contextlib.contextmanager
def lost_worker_errors(strategy_name, command, resume_point):
    """Turns a multi-worker collective that failed for want of a peer into one PipelineError line.

    A worker that dies (or never comes) stops the others in their next collective: the
    coordination service reports it unhealthy when its heartbeats stop, or the collective
    times out (COLLECTIVE_TIMEOUT_SECONDS). Every worker must then be restarted with --resume.

    Args:
        strategy_name: the run's strategy setting; errors pass through unless "multiworker".
        command: "train" or "finetune", for the message.
        resume_point: callable() -> str or None, where `--resume` would continue from (e.g.
            "after epoch 3"), None when the chief has no checkpoint yet.
    """
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
            tf.errors.AbortedError) as error:
        if strategy_name != "multiworker":
            raise
        point = resume_point()
        advice = (f"restart every worker with `{command} --resume` to continue {point}" if point else
                  f"restart every worker with `{command} --resume` (without it if the chief has no checkpoint yet)")
        raise errors.PipelineError(
            f"{command}: the cluster of TF_CONFIG lost a worker ({' '.join(errors.op_error_reason(error).split())}); "
            f"{advice}"
        ) from None


def is_chief_worker(strategy):
    """Whether this process writes OUT: always, except on the non-chief workers of a
    multi-worker cluster (the chief is the "chief" task, or else worker 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)


def worker_scratch_dir(out_dir, strategy):
    """A new, empty OUT/.worker-TYPE-INDEX.tmp/ for a non-chief worker's writes (Path).

    One per task, so workers sharing OUT never meet; a folder a killed worker left behind
    is replaced when it restarts, and the stage removes it when the worker ends.
    """
    resolver = strategy.cluster_resolver
    path = Path(out_dir) / run_folder.WORKER_SCRATCH_PATTERN.format(
        task_type=resolver.task_type, task_id=resolver.task_id)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def decoder_destination(out_dir, is_chief):
    """The end of a stage's summary line: where decoder.keras went, or that the chief writes it."""
    return f"-> {Path(out_dir) / run_folder.DECODER_FILE}" if is_chief else "(the chief writes decoder.keras)"
