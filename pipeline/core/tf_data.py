"""The `tf.data` settings shared by the input pipelines of extraction and training.

Both pipelines set their parallelism and prefetch depth themselves and run with tf.data's
autotuner turned off. With autotuning on (TensorFlow 2.21), destroying an iterator
waits for the autotuner's background thread, which sleeps between its optimisation
passes for a period that doubles as the iterator lives (gdb on the stalled process:
`RootDataset::Iterator::~Iterator` waiting on a `Model::OptimizeLoop` thread asleep on its
condition variable). Measured here: 2 of 8 extraction passes over 192 images stalled 9.5
and 10.4 s when their iterator was released, and in `benchmarks/bench_extract.py` three of
five rounds ran at half speed for that reason alone. Our pipelines are simple enough not to
need the tuner: decoding runs on every core while the model computes, and prefetching two
batches keeps the model fed.
"""

import os


def cpu_count():
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def untuned_options(max_intra_op_parallelism=None):
    """tf.data.Options with autotuning off (see the module docstring).

    max_intra_op_parallelism: threads one op of the pipeline may use (None: TF's default).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    if max_intra_op_parallelism is not None:
        options.threading.max_intra_op_parallelism = max_intra_op_parallelism
    return options
