"""The cross-entropy objective `train` optimizes: the loss, the learning-rate schedule, the compiled decoder.

`global_token_mean_loss` is `models.decoder.masked_loss` normalized by the tokens of the
whole global batch, so training under a distribution strategy follows the same gradient
as on one device. It is registered with Keras (package "captioner") when this module is
imported, so a compiled decoder.keras reloads with `keras.saving.load_model` once it is.
"""

import keras
import tensorflow as tf

from models import decoder, encoder, schedules
from pipeline.core import device
from pipeline.data import text

# Training steps run per tf.function call (Keras `steps_per_execution`).
STEPS_PER_EXECUTION = 4


@keras.saving.register_keras_serializable(package="captioner")
def global_token_mean_loss(targets, logits):
    """The training loss: `models.decoder.masked_loss` normalized by the global batch's tokens.

    targets: int [B, T], logits: float32 [B, T, V] -> float32 scalar. On one device it is
    `masked_loss`: the sum of per-token losses over non-pad targets / their number. Under a
    distribution strategy each replica sees a slice of the global batch; Keras divides each
    replica's loss by the number of replicas R and sums their gradients. A per-replica
    `masked_loss` would then train on the mean of the replicas' token means, which weights
    a token of a replica with few tokens more than one of a replica with many. Here each
    replica returns R * (its token-loss sum) / (non-pad targets of the whole global batch,
    summed across replicas), so the summed gradient is exactly the gradient of the global
    token mean, and the reported loss (the replicas' mean) is the global token mean as well.
    """
    local_mean = decoder.masked_loss(targets, logits)
    replica_context = tf.distribute.get_replica_context()
    num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replica_context is None or num_replicas == 1:
        return local_mean
    local_tokens = tf.reduce_sum(tf.cast(tf.not_equal(tf.cast(targets, tf.int32), text.PAD_ID), tf.float32))
    global_tokens = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, local_tokens)
    return local_mean * tf.math.divide_no_nan(local_tokens * float(num_replicas), global_tokens)


def make_schedule(config, total_steps):
    """The learning-rate schedule of `config.train` (a `models.schedules.WarmupSchedule`):
    `train.learning_rate` after `train.warmup_steps` of linear warm-up, then cut on plateaus
    or decayed along a cosine ending at `total_steps` (the cap), per `train.lr_schedule`.
    Call inside the strategy scope of the model it drives."""
    train_config = config.train
    return schedules.WarmupSchedule(
        train_config.learning_rate, train_config.warmup_steps, decay=train_config.lr_schedule,
        total_steps=max(int(total_steps), train_config.warmup_steps + 1),
    )


def steps_per_execution_for(steps_per_epoch, limit=STEPS_PER_EXECUTION):
    """The largest steps per tf.function call <= `limit` that divides `steps_per_epoch` (int >= 1).

    On the endless training stream Keras runs whole executions, so a count not dividing
    the (Keras) epoch, here the validation period, would carry batches of the next one into it.
    """
    return next(count for count in range(max(1, min(limit, steps_per_epoch)), 0, -1) if steps_per_epoch % count == 0)


def make_optimizer(precision, learning_rate, clipnorm):
    """Adam with `clipnorm`; under fp16 wrapped in Keras' dynamic loss scaling.

    float16 gradients underflow below ~6e-8 (bfloat16 has float32's range and needs none):
    `LossScaleOptimizer` scales the loss up before the gradients are taken (`scale_loss`,
    done by `fit` itself), unscales them, and skips a step whose gradients overflowed.
    precision: a resolved name ("fp32", "bf16", "fp16"); learning_rate: float or schedule.
    """
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate, clipnorm=clipnorm)
    return keras.optimizers.LossScaleOptimizer(optimizer) if precision == "fp16" else optimizer


def build_model(config, vocab_size, feature_dim, steps_per_execution=STEPS_PER_EXECUTION, learning_rate=None):
    """The decoder of `config.decoder`, compiled for training as `run_train` trains it.

    Call inside `strategy.scope()` to distribute it. Computes in `train.precision`
    (`models.decoder.build_decoder`'s dtype policy; "auto" resolved for this machine), Adam
    with `train.clipnorm` and `learning_rate` (a float or schedule; None: `train.learning_rate`,
    constant; loss scaling under fp16, `make_optimizer`), `global_token_mean_loss`,
    `MaskedAccuracy`; several steps per `tf.function` call (`steps_per_execution`, 1 with
    several replicas) to spare the per-step Python round trip.
    Returns a compiled `keras.Model` (inputs and outputs as `models.decoder.build_decoder`).
    """
    if tf.distribute.get_strategy().num_replicas_in_sync > 1:
        # Keras 3.15's multi-step loop over a distributed iterator fails under
        # MirroredStrategy ("You must feed a value for placeholder tensor ...while/cond"):
        # one step per call there.
        steps_per_execution = 1
    precision = device.resolve_precision(config.train.precision, setting="train.precision (--precision)")
    model = decoder.build_decoder(config.decoder, vocab_size, feature_dim,
                                  dtype_policy=encoder.PRECISION_POLICIES[precision])
    if learning_rate is None:
        learning_rate = config.train.learning_rate
    model.compile(
        optimizer=make_optimizer(precision, learning_rate, config.train.clipnorm),
        loss=global_token_mean_loss,
        metrics=[decoder.MaskedAccuracy()],
        steps_per_execution=steps_per_execution,
    )
    return model
