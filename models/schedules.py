"""The training learning-rate schedule: linear warm-up, then a plateau-driven scale or a cosine decay.

`WarmupSchedule(peak, warmup_steps, decay="plateau")` gives, at optimizer step s (0-based),

    lr(s) = peak * min(1, (s + 1) / warmup_steps) * scale

where `scale` is a non-trainable variable (1.0 at the start) that the training loop
multiplies by a factor when validation stops improving (reduce-on-plateau), so the cuts
happen between steps while the warm-up is computed per step inside the graph. With
`decay="cosine"` the scale is not used; after warm-up the rate follows half a cosine from
`peak` down to `peak * final_fraction` at `total_steps`.
"""

import math

import keras
import tensorflow as tf

DECAYS = ("plateau", "cosine")


@keras.saving.register_keras_serializable(package="captioner")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule(step int scalar tensor) -> float32 scalar` learning rate (see the module docstring)."""

    def __init__(self, peak, warmup_steps, decay="plateau", total_steps=0, final_fraction=0.0):
        """
        Args:
            peak: float > 0, the rate after warm-up (and before any cut).
            warmup_steps: int >= 0; 0 starts at `peak`.
            decay: "plateau" (the rate times `scale`) or "cosine" (needs `total_steps`).
            total_steps: int, where the cosine reaches its end (unused by "plateau").
            final_fraction: float in [0, 1], the cosine's last rate as a share of `peak`.
        """
        super().__init__()
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}")
        if not peak > 0 or warmup_steps < 0:
            raise ValueError(f"peak must be > 0 and warmup_steps >= 0, got {peak} and {warmup_steps}")
        if decay == "cosine" and total_steps <= warmup_steps:
            raise ValueError(f"a cosine decay needs total_steps > warmup_steps, got {total_steps} <= {warmup_steps}")
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.total_steps = int(total_steps)
        self.final_fraction = float(final_fraction)
        # Created in the caller's distribution scope (the model's), so every replica reads it.
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="learning_rate_scale")

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.minimum(1.0, (step + 1.0) / float(max(1, self.warmup_steps)))
        if self.decay == "plateau":
            return self.peak * warmup * self.scale
        progress = tf.clip_by_value(
            (step - self.warmup_steps) / float(self.total_steps - self.warmup_steps), 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        return self.peak * warmup * (self.final_fraction + (1.0 - self.final_fraction) * cosine)

    def get_config(self):
        return {
            "peak": self.peak, "warmup_steps": self.warmup_steps, "decay": self.decay,
            "total_steps": self.total_steps, "final_fraction": self.final_fraction,
        }
