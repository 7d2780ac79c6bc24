"""Self-critical fine-tuning cost on Flickr8k-sized data, and CIDEr-D reward throughput.

    python -m benchmarks.bench_finetune [--json FILE] [--steps N]   (or in the suite: python -m benchmarks)

On the synthetic cache `bench_train` trains on (`workloads.flickr8k_sized_cache`: 6,000
random 2048-d vectors, five Zipf-like captions of ~12 words per image over a ~3,000-word
vocabulary) with the default decoder (embedding 256, LSTM 512) and the default fine-tuning
settings (32 images x 5 samples per step, mean baseline), times `--steps` steps of the stage's own step
(`pipeline.training.scst.Stepper.train_step`: sampling, CIDEr-D, update) after a warm-up, and
extrapolates to one epoch (6,000 images = 188 steps); the output says it is extrapolated.
Validation (greedy captions of the validation split once per epoch) is not included.
The decoder is untrained, so its samples run to the length limit more often than a trained
decoder's: the figure is an upper bound of the sampling cost.
"""

import argparse
import sys
import time
import types

from pipeline.core import io_utils

WARMUP_STEPS = 3
STEPS = 200
QUICK_STEPS = 40


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--steps", type=int, default=STEPS, help="timed steps")
    args = parser.parse_args(argv)
    result = measure(args.steps)
    if args.json:
        io_utils.write_json(args.json, result)
    return 0


def run(quick):
    """The suite's entry (`python -m benchmarks`): QUICK_STEPS or STEPS timed steps."""
    return measure(QUICK_STEPS if quick else STEPS)


def flickr8k_stepper(precision="fp32"):
    """The fine-tuning step on the Flickr8k-sized synthetic cache, computing in `precision` as `finetune` does.

    Returns a namespace: run(step) -> the step's outcome (`scst.Stepper.train_step` on the
    step's batch), num_images, vocabulary_size, settings (FinetuneConfig), config
    (PipelineConfig), reward_setup (seconds), steps_per_epoch.
    """
    import keras
    import tensorflow as tf

    from benchmarks import workloads
    from models import decoder, encoder
    from pipeline.core import config as config_module
    from pipeline.training import objective, scst
    from pipeline.training.cider_reward import CiderD

    features, rows, token_rows = workloads.flickr8k_sized_cache()
    num_images, vocabulary_size = len(features), workloads.VOCABULARY_WORDS
    references = [[] for _ in range(num_images)]
    for row, tokens in zip(rows, token_rows):
        references[row].append(tokens[1:])
    started = time.perf_counter()
    reward = CiderD(references, vocabulary_size)
    reward_setup = time.perf_counter() - started

    config = config_module.PipelineConfig().replace({"finetune.precision": precision})
    settings = config.finetune
    keras.utils.set_random_seed(0)
    model = decoder.build_decoder(config.decoder, vocabulary_size, workloads.FEATURE_DIM)
    model = decoder.with_dtype_policy(model, encoder.PRECISION_POLICIES[precision])
    optimizer = objective.make_optimizer(precision, settings.learning_rate, settings.clipnorm)
    optimizer.build(model.trainable_variables)
    stepper = scst.Stepper(model, optimizer, tf.distribute.get_strategy(), settings,
                           config.decode.max_length, reward)
    steps_per_epoch = -(-num_images // settings.batch_size)
    order = scst.epoch_image_order(num_images, 0, 0)
    all_features = tf.constant(features)

    def run(step):
        index = step % steps_per_epoch
        members = order[index * settings.batch_size:(index + 1) * settings.batch_size]
        return stepper.train_step(tf.gather(all_features, members), members, (0, step))

    return types.SimpleNamespace(run=run, num_images=num_images, vocabulary_size=vocabulary_size, settings=settings,
                                 config=config, reward_setup=reward_setup, steps_per_epoch=steps_per_epoch)


def measure(timed_steps):
    """Times `timed_steps` fine-tuning steps; returns the figures (see the module docstring)."""
    stepper = flickr8k_stepper()
    run, settings, steps_per_epoch = stepper.run, stepper.settings, stepper.steps_per_epoch
    for step in range(WARMUP_STEPS):
        run(step)
    captions, sample_seconds, reward_seconds, tokens = 0, 0.0, 0.0, 0.0
    started = time.perf_counter()
    for step in range(WARMUP_STEPS, WARMUP_STEPS + timed_steps):
        outcome = run(step)
        captions += len(outcome["rewards"])
        sample_seconds += outcome["sample_seconds"]
        reward_seconds += outcome["reward_seconds"]
        tokens += float(outcome["mask"].sum())
    seconds = time.perf_counter() - started
    result = {
        "timed_steps": timed_steps,
        "seconds_per_step": seconds / timed_steps,
        "finetune_captions_per_s": captions / seconds,
        "finetune_reward_captions_per_s": captions / reward_seconds,
        "reward_share_of_step": reward_seconds / seconds,
        # What a multi-worker run does not divide: every worker draws the whole batch's samples.
        "sampling_share_of_step": sample_seconds / seconds,
        "mean_sample_tokens": tokens / captions,
        "steps_per_epoch": steps_per_epoch,
        "finetune_epoch_minutes_flickr8k": seconds / timed_steps * steps_per_epoch / 60,
        "reward_setup_seconds": stepper.reward_setup,
    }
    print(
        f"finetune on a Flickr8k-sized cache ({stepper.num_images} images x 5 captions, vocabulary "
        f"{stepper.vocabulary_size}, decoder {stepper.config.decoder.embedding_dim}/{stepper.config.decoder.units}): "
        f"{result['seconds_per_step']:.3f} s/step of {settings.batch_size} images x {settings.samples} samples, "
        f"{result['finetune_captions_per_s']:.0f} captions/s; one epoch ({steps_per_epoch} steps) extrapolated from "
        f"{timed_steps} steps: {result['finetune_epoch_minutes_flickr8k']:.1f} min; CIDEr-D reward "
        f"{result['finetune_reward_captions_per_s']:.0f} captions/s ({100 * result['reward_share_of_step']:.1f}% of a step; "
        f"set-up of the 30,000 references {stepper.reward_setup:.1f} s); "
        f"sampling {100 * result['sampling_share_of_step']:.1f}% of a step",
        file=sys.stderr,
    )
    return result


if __name__ == "__main__":
    sys.exit(main())
