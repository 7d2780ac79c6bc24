"""Stage 2 training: the tf.data pipeline, the artifacts, resume, overfitting, bad input."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import train
from pipeline.core import config as config_module
from pipeline.core import errors
from pipeline.data import run_folder, text
from pipeline.training import distribution, objective
from pipeline.training import inputs as training_inputs
from tests.conftest import TRAIN_OVERRIDES
from tests.helpers import decoder_weights, largest_difference


def _split(rows, token_lists):
    token_ids = [np.asarray(tokens, dtype=np.int32) for tokens in token_lists]
    return training_inputs.CaptionSplit(np.asarray(rows, dtype=np.int32), token_ids, images=len(set(rows)))


def test_encode_caption_wraps_truncates_and_maps_unknown_words():
    vocabulary = text.Vocabulary.build([["a", "dog", "runs"]], min_count=1)
    a, dog, runs = vocabulary.encode(["a", "dog", "runs"])
    encoded = training_inputs.encode_caption("A dog, runs FAST!", vocabulary, max_caption_length=30)
    assert encoded.dtype == np.int32
    assert encoded.tolist() == [text.START_ID, a, dog, runs, text.UNK_ID, text.END_ID]
    # Truncation keeps the first words and still ends the caption.
    assert training_inputs.encode_caption("a dog runs", vocabulary, max_caption_length=2).tolist() == [
        text.START_ID, a, dog, text.END_ID,
    ]
    assert training_inputs.encode_caption("42 !!", vocabulary, max_caption_length=30) is None


def test_dataset_pads_per_batch_shifts_targets_and_gathers_rows():
    feature_dim = 3
    image_features = np.arange(4 * feature_dim, dtype=np.float32).reshape(4, feature_dim)
    split = _split(
        rows=[2, 0, 3, 1, 1],
        token_lists=[[1, 5, 6, 2], [1, 7, 2], [1, 4, 5, 6, 7, 8, 2], [1, 9, 2], [1, 5, 2]],
    )
    rows = training_inputs.InMemoryFeatures(image_features)
    dataset = training_inputs.make_caption_dataset(split, rows, batch_size=2)
    assert dataset.options().autotune.enabled is False  # see pipeline/core/tf_data.py
    batches = list(dataset.as_numpy_iterator())
    assert len(batches) == 3
    (inputs, targets), (inputs_2, targets_2), (inputs_3, targets_3) = batches

    np.testing.assert_array_equal(inputs["image_features"], image_features[[2, 0]])
    assert inputs["image_features"].dtype == np.float32
    # Batch 1: longest row has 4 ids -> T = 3; the shorter row is padded with 0.
    np.testing.assert_array_equal(inputs["caption_tokens"], [[1, 5, 6], [1, 7, 2]])
    np.testing.assert_array_equal(targets, [[5, 6, 2], [7, 2, 0]])
    assert inputs["caption_tokens"].dtype == np.int32 and targets.dtype == np.int32
    # Batch 2 is padded to its own longest caption (7 ids -> T = 6), not a global maximum.
    np.testing.assert_array_equal(inputs_2["caption_tokens"], [[1, 4, 5, 6, 7, 8], [1, 9, 2, 0, 0, 0]])
    np.testing.assert_array_equal(targets_2, [[4, 5, 6, 7, 8, 2], [9, 2, 0, 0, 0, 0]])
    np.testing.assert_array_equal(inputs_2["image_features"], image_features[[3, 1]])
    # The last, smaller batch keeps its single caption.
    assert inputs_3["caption_tokens"].shape == (1, 2)
    np.testing.assert_array_equal(targets_3, [[5, 2]])


def test_dataset_shuffle_is_seeded_and_keeps_every_caption():
    feature_dim = 2
    image_features = np.arange(10 * feature_dim, dtype=np.float32).reshape(10, feature_dim)
    split = _split(rows=list(range(10)), token_lists=[[1, 4 + index, 2] for index in range(10)])

    def first_words(seed):
        dataset = training_inputs.make_caption_dataset(
            split, training_inputs.InMemoryFeatures(image_features), batch_size=4, shuffle_seed=seed
        )
        words, pairs_match = [], True
        for inputs, targets in dataset.as_numpy_iterator():
            words.extend(targets[:, 0].tolist())
            # Each caption still travels with its own image's vector after shuffling.
            rows = targets[:, 0] - 4
            pairs_match &= bool(np.array_equal(inputs["image_features"], image_features[rows]))
        return words, pairs_match

    words, pairs_match = first_words(seed=3)
    assert pairs_match
    assert sorted(words) == list(range(4, 14))
    assert words != list(range(4, 14))
    assert first_words(seed=3)[0] == words


def test_training_writes_decoder_history_checkpoints_and_logs(trained_out):
    import keras

    from models import decoder  # noqa: F401  (registers the loss for load_model)

    config = config_module.PipelineConfig.load(trained_out)
    vocabulary = text.Vocabulary.load(trained_out / text.VOCAB_FILE)
    assert config.decoder.vocab_size == len(vocabulary)
    assert config.train.epochs == TRAIN_OVERRIDES["train.epochs"]
    assert config.decoder.units == TRAIN_OVERRIDES["decoder.units"]

    model = keras.saving.load_model(trained_out / "decoder.keras")
    assert model.output_shape == (None, None, len(vocabulary))

    history = run_folder.read_training_history(trained_out)
    assert [entry["period"] for entry in history] == [1, 2, 3]
    assert [entry["step"] for entry in history] == [6, 12, 18]
    for entry in history:
        assert {"loss", "val_loss", "masked_accuracy", "val_masked_accuracy", "learning_rate", "val_cider",
                "val_bleu_4", "val_seconds", "train_seconds"} <= set(entry)
        assert np.isfinite(entry["loss"]) and entry["loss"] > 0
        assert 0.0 <= entry["val_cider"] <= 10.0 and 0.0 <= entry["val_bleu_4"] <= 1.0
    assert history[-1]["loss"] < history[0]["loss"]
    # "best" marks each new best val CIDEr-D (the first period always is one); the
    # warm-up raises the rate over the first 100 steps.
    assert history[0]["best"]
    ciders = [entry["val_cider"] for entry in history]
    assert [entry["best"] for entry in history] == [index == 0 or value > max(ciders[:index])
                                                      for index, value in enumerate(ciders)]
    assert history[0]["learning_rate"] < history[-1]["learning_rate"] <= config.train.learning_rate

    checkpoints = trained_out / "checkpoints"
    assert (checkpoints / "latest.weights.h5").is_file()
    assert json.loads((checkpoints / "training_metadata.json").read_text())["epoch"] == 3
    stopping = json.loads((checkpoints / "stopping.json").read_text())
    assert stopping["period_steps"] == 6 and sorted(stopping["periods"], key=int) == ["1", "2", "3"]
    assert stopping["periods"]["3"]["stopper"]["best"] == max(ciders)
    event_files = list((trained_out / "logs").rglob("events.out.tfevents.*"))
    assert {path.parent.name for path in event_files} >= {"train", "validation"}
    assert "epoch_cider" in _event_tags([path for path in event_files if path.parent.name == "validation"])
    assert not list(trained_out.glob(".decoder.keras*"))  # no temporary left behind


def _event_tags(paths):
    import tensorflow as tf

    tags = set()
    for record in tf.data.TFRecordDataset([str(path) for path in paths]):
        event = tf.compat.v1.Event.FromString(record.numpy())
        tags.update(value.tag for value in event.summary.value)
    return tags


def _optimizer_iterations(out):
    with h5py.File(out / "checkpoints" / "latest.weights.h5", "r") as handle:
        return int(handle["optimizer"]["vars"]["0"][()])


class _ScriptedScorer:
    """A validation metric that follows a script and keeps the weights of every model it scored."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.weights = []

    def __call__(self, model):
        score = self.scores[len(self.weights)]
        self.weights.append([weight.copy() for weight in model.get_weights()])
        return {"val_cider": score, "val_bleu_4": score / 10, "val_seconds": 0.0}


def _assert_same_weights(actual, expected, tolerance=0.0):
    assert len(actual) == len(expected)
    for actual_weight, expected_weight in zip(actual, expected):
        np.testing.assert_allclose(actual_weight, expected_weight, rtol=tolerance, atol=tolerance)


def test_stopping_selection_and_learning_rate_cuts_follow_the_score_and_resume_with_their_counters(
        extracted_out, tmp_path):
    import shutil

    # 6 steps an epoch, validation every 5 steps: patience 10 steps, a rate cut after 5.
    settings = dict(TRAIN_OVERRIDES, **{"train.epochs": 10, "train.validate_every_steps": 5, "train.patience_steps": 10,
                                        "train.reduce_lr_patience_steps": 5, "train.warmup_steps": 0})
    scores = [0.1, 0.5, 0.3, 0.4, 0.9]
    out = Path(shutil.copytree(extracted_out, tmp_path / "uninterrupted"))
    scorer = _ScriptedScorer(scores)
    summary = train.run_train(out, settings, validation_scorer=scorer)
    # Best at step 10; no better score by step 20 = 10 steps later: stop there, before the 0.9.
    assert (summary["stopped_by"], summary["steps"], summary["best_step"], summary["best_score"]) == (
        "early_stopping", 20, 10, 0.5)
    history = run_folder.read_training_history(out)
    assert [entry["step"] for entry in history] == [5, 10, 15, 20]
    assert [entry["best"] for entry in history] == [True, True, False, False]
    assert [entry["lr_reduced"] for entry in history] == [False, False, True, True]
    rates = [entry["learning_rate"] for entry in history]
    assert rates[:3] == pytest.approx([1e-3] * 3) and rates[3] == pytest.approx(rates[2] / 2)
    assert _optimizer_iterations(out) == 20
    # decoder.keras holds the weights validated at step 10, not the last ones.
    _assert_same_weights(decoder_weights(out), scorer.weights[1])
    assert any(not np.array_equal(last, best) for last, best in zip(scorer.weights[3], scorer.weights[1]))

    # Stopped by the cap after 3 periods (15 steps: 2.5 epochs), then resumed with a larger
    # cap: the stopper's best, its counter and the rate cut carry over, so the run stops
    # where the uninterrupted one did, with the same weights.
    resumed_out = Path(shutil.copytree(extracted_out, tmp_path / "resumed"))
    first = train.run_train(resumed_out, dict(settings, **{"train.epochs": 2}), validation_scorer=_ScriptedScorer(scores))
    assert (first["stopped_by"], first["steps"], first["periods_total"]) == ("cap", 15, 3)
    history_before = run_folder.read_training_history(resumed_out)
    resumed = train.run_train(resumed_out, {"train.epochs": 10}, resume=True,
                              validation_scorer=_ScriptedScorer(scores[3:]))
    assert (resumed["initial_period"], resumed["periods_run"], resumed["steps"]) == (3, 1, 20)
    assert (resumed["stopped_by"], resumed["best_step"]) == ("early_stopping", 10)
    resumed_history = run_folder.read_training_history(resumed_out)
    assert resumed_history[:3] == history_before  # earlier periods are kept as they were
    for name in ("step", "best", "lr_reduced", "learning_rate", "val_cider"):
        assert [entry[name] for entry in resumed_history] == [entry[name] for entry in history], name
    # Step 16 trained on batch 4 of epoch 3 with period 4's dropout masks, as in the
    # uninterrupted run: the same losses and weights, up to float reordering (a resume from
    # the wrong batch, rate or dropout stream differs by 1e-4 to percents).
    assert [entry["loss"] for entry in resumed_history] == pytest.approx([entry["loss"] for entry in history], rel=1e-6)
    assert _optimizer_iterations(resumed_out) == 20
    _assert_same_weights(decoder_weights(resumed_out), decoder_weights(out), tolerance=1e-6)

    # A fresh run (no --resume) replaces the old checkpoints and history; --select-on loss
    # keeps the weights of the lowest validation loss.
    loss_scorer = _ScriptedScorer([0.0] * 3)
    fresh = train.run_train(resumed_out, {"train.epochs": 2, "train.select_on": "loss", "train.patience_steps": 100},
                            validation_scorer=loss_scorer)
    assert (fresh["initial_period"], fresh["steps"], fresh["select_on"]) == (0, 15, "loss")
    fresh_history = run_folder.read_training_history(resumed_out)
    assert [entry["period"] for entry in fresh_history] == [1, 2, 3] and _optimizer_iterations(resumed_out) == 15
    lowest = min(range(3), key=lambda index: fresh_history[index]["val_loss"])
    assert fresh["best_val_loss"] == fresh_history[lowest]["val_loss"] and fresh_history[lowest]["best"]
    _assert_same_weights(decoder_weights(resumed_out), loss_scorer.weights[lowest])


def test_resume_without_checkpoint_is_a_clear_error(extracted_out, copy_run):
    out = copy_run(extracted_out)
    with pytest.raises(errors.ArtifactError, match=r"checkpoints: no checkpoint to resume from"):
        train.run_train(out, dict(TRAIN_OVERRIDES), resume=True)


def test_cache_from_another_encoder_is_rejected_and_nothing_is_written(extracted_out, copy_run):
    out = copy_run(extracted_out)
    config = config_module.PipelineConfig.load(out)
    config.encoder.image_size = 160
    config.save(out)
    config_bytes = (out / "config.json").read_bytes()
    features_bytes = (out / "features.h5").read_bytes()
    with pytest.raises(errors.ArtifactError, match=r"features\.h5: .*image_size=224 but this run asks for image_size=160"):
        train.run_train(out, dict(TRAIN_OVERRIDES))
    assert (out / "config.json").read_bytes() == config_bytes
    assert (out / "features.h5").read_bytes() == features_bytes
    for name in ("decoder.keras", "history.json", "checkpoints", "logs"):
        assert not (out / name).exists()


def test_missing_feature_rows_are_named(extracted_out, copy_run):
    out = copy_run(extracted_out)
    captions = json.loads((out / "captions.json").read_text())
    captions["images"].append({"image_id": "never_extracted.jpg", "path": "never_extracted.jpg",
                               "split": "train", "captions": ["a red square"]})
    (out / "captions.json").write_text(json.dumps(captions))
    with pytest.raises(errors.ArtifactError, match=r"1 train image\(s\) .* no feature row .*'never_extracted\.jpg'"):
        train.run_train(out, dict(TRAIN_OVERRIDES))

    # Listed in extract_errors.json, the same image is skipped instead.
    (out / "extract_errors.json").write_text(json.dumps(
        [{"image_id": "never_extracted.jpg", "path": "x", "reason": "unreadable"}]
    ))
    data = training_inputs.load_training_data(out, config_module.PipelineConfig.load(out))
    assert data.skipped_images == 1


def test_train_before_extract_is_a_clear_error(tmp_path):
    with pytest.raises(errors.ArtifactError, match=r"config\.json: no run configuration; run `extract`"):
        train.run_train(tmp_path, {})


def test_config_of_an_older_run_loads_without_its_epoch_counted_patiences():
    data = config_module.PipelineConfig().to_dict()
    data["train"].update({"early_stopping_patience": 3, "reduce_lr_patience": 1})
    config = config_module.PipelineConfig.from_dict(data)
    assert config.train == config_module.TrainConfig()
    data["train"]["patience"] = 3
    with pytest.raises(errors.PipelineError, match="unknown setting.*patience"):
        config_module.PipelineConfig.from_dict(data)


def test_bad_hyperparameter_is_rejected(extracted_out, copy_run):
    out = copy_run(extracted_out)
    with pytest.raises(errors.PipelineError, match=r"train\.batch_size \(--batch-size\) must be at least 1, got 0"):
        train.run_train(out, {"train.batch_size": 0})
    with pytest.raises(errors.PipelineError, match=r"train\.select_on \(--select-on\) must be one of cider, loss"):
        train.run_train(out, {"train.select_on": "bleu"})


def test_decoder_overfits_four_captions_and_greedy_decoding_reproduces_them():
    import keras

    from models import captioner, decoder

    keras.utils.set_random_seed(0)
    captions = ["a red square", "two blue circles", "a green triangle on grass", "one small yellow star"]
    token_lists = [text.normalize_caption(caption) for caption in captions]
    vocabulary = text.Vocabulary.build(token_lists, min_count=1)
    feature_dim = 64
    image_features = np.random.default_rng(0).normal(size=(4, feature_dim)).astype(np.float32)
    split = training_inputs.CaptionSplit(
        np.arange(4, dtype=np.int32),
        [training_inputs.encode_caption(caption, vocabulary, max_caption_length=10) for caption in captions],
        images=4,
    )
    rows = training_inputs.InMemoryFeatures(image_features)
    dataset = training_inputs.make_caption_dataset(split, rows, batch_size=4)

    decoder_config = config_module.DecoderConfig(embedding_dim=32, units=64, dropout=0.0)
    model = decoder.build_decoder(decoder_config, len(vocabulary), feature_dim)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=decoder.masked_loss, metrics=[decoder.MaskedAccuracy()])
    model.fit(dataset.repeat(), steps_per_epoch=300, epochs=1, verbose=0, shuffle=False)
    loss, accuracy = model.evaluate(dataset, verbose=0)
    assert loss < 0.05
    assert accuracy == 1.0

    feature_captioner = captioner.FeatureCaptioner(
        model, vocabulary.words, config_module.DecodeConfig(beam_size=1, max_length=10),
        start_id=text.START_ID, end_id=text.END_ID, unk_id=text.UNK_ID, pad_id=text.PAD_ID,
    )
    generated = feature_captioner.caption_features(image_features)["captions"].numpy()
    assert [value.decode() for value in generated] == captions


MIRRORED_SCRIPT = r"""
import json
import numpy as np
import tensorflow as tf

# Two logical CPU devices: must happen before anything initializes TF's devices.
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
from models import decoder
from pipeline.core import config as config_module
from pipeline.training import distribution, objective
from pipeline.training import inputs as training_inputs

rng = np.random.default_rng(0)
features = rng.normal(size=(32, 16)).astype(np.float32)
# Captions of 1 to 12 words, batches not sorted by length: the two replicas' halves of a
# global batch hold different numbers of tokens.
token_ids = [np.asarray([1, *rng.integers(4, 30, size=rng.integers(1, 13)), 2], np.int32) for _ in range(64)]
split = training_inputs.CaptionSplit(np.arange(64, dtype=np.int32) % 32, token_ids, images=32)
config = config_module.PipelineConfig().replace({"train.precision": "fp32"})  # float rounding compared below
config.decoder = config_module.DecoderConfig(embedding_dim=8, units=16, dropout=0.0)
batch_size, epochs, steps = 16, 3, 4

def dataset():
    return training_inputs.make_training_dataset(split, training_inputs.InMemoryFeatures(features), batch_size,
                                                 shuffle_seed=0,
                                       sort_window_batches=1)

half_tokens = [[int(np.count_nonzero(targets[:8])), int(np.count_nonzero(targets[8:]))]
               for _, targets in dataset().take(epochs * steps).as_numpy_iterator()]
report = {"half_tokens": half_tokens}
# One strategy object per kind: two MirroredStrategy objects in a process reuse collective keys.
strategies = {name: distribution.make_strategy(name) for name in ("default", "mirrored")}
for optimizer, strategy_name, loss in (("sgd", "default", "global"), ("sgd", "mirrored", "global"),
                                       ("sgd", "mirrored", "replica_mean"),
                                       ("adam", "default", "global"), ("adam", "mirrored", "global")):
    keras.utils.set_random_seed(0)
    strategy = strategies[strategy_name]
    with strategy.scope():
        model = objective.build_model(config, 30, 16)  # Adam, clipnorm, the global-token loss
        if optimizer == "sgd" or loss != "global":
            model.compile(optimizer=keras.optimizers.SGD(0.5) if optimizer == "sgd" else model.optimizer,
                          loss=objective.global_token_mean_loss if loss == "global" else decoder.masked_loss,
                          steps_per_execution=1)
    history = model.fit(dataset(), steps_per_epoch=steps, epochs=epochs, verbose=0, shuffle=False)
    report[f"{optimizer}/{strategy_name}/{loss}"] = {
        "replicas": strategy.num_replicas_in_sync, "losses": history.history["loss"],
        "weights": [np.asarray(weight).tolist() for weight in model.get_weights()]}
print(json.dumps(report))
"""


def test_mirrored_strategy_on_two_cpu_devices_matches_single_device_training():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(train.__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], cwd=repo, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The replicas' halves of most global batches hold different numbers of tokens, where
    # a mean of per-replica token means differs from the global token mean.
    assert sum(first != second for first, second in report["half_tokens"]) >= 8
    for optimizer in ("sgd", "adam"):
        single, mirrored = report[f"{optimizer}/default/global"], report[f"{optimizer}/mirrored/global"]
        assert (single["replicas"], mirrored["replicas"]) == (1, 2)
        assert single["losses"][-1] < single["losses"][0]  # it trained
        np.testing.assert_allclose(mirrored["losses"], single["losses"], rtol=1e-5)
        # Same batches in the same order, gradients of the same global token mean: the
        # 12 updates agree to float rounding (measured: ~6e-8 SGD, ~3e-8 Adam). Adam's
        # bound is looser: it turns rounding noise in a near-zero gradient into a step.
        tolerance = 1e-5 if optimizer == "sgd" else 1e-4
        assert largest_difference(mirrored["weights"], single["weights"]) < tolerance, optimizer
    # The control: per-replica token means (plain masked_loss) move the same weights
    # measurably elsewhere (measured ~7e-3), so the bounds above would catch that bug.
    replica_mean = report["sgd/mirrored/replica_mean"]
    assert largest_difference(replica_mean["weights"], report["sgd/default/global"]["weights"]) > 1e-3


def test_training_stream_is_the_epochs_back_to_back_whatever_the_first_epoch():
    image_features = np.arange(40, dtype=np.float32).reshape(20, 2)
    split = _split(rows=list(range(20)), token_lists=[[1, *range(4, 5 + index % 7), 2] for index in range(20)])
    rows = training_inputs.InMemoryFeatures(image_features)

    def batches(dataset, count=None):
        """[(feature rows of the batch, targets)] as lists; feature row r is the vector [2r, 2r + 1]."""
        items = (dataset.take(count) if count else dataset).as_numpy_iterator()
        return [((inputs["image_features"][:, 0] // 2).astype(int).tolist(), targets.tolist())
                for inputs, targets in items]

    epochs = [batches(training_inputs.make_caption_dataset(split, rows, 3, shuffle_seed=7, epoch=epoch,
                                                           sort_window_batches=2))
              for epoch in range(3)]
    for epoch in epochs:
        assert len(epoch) == 7
        assert sorted(row for batch_rows, _ in epoch for row in batch_rows) == list(range(20))
    assert epochs[0] != epochs[1] != epochs[2]
    # A stream starting at epoch 1 (a run resumed after one epoch) gives epochs 1 and 2 as
    # they are: the order depends on the epoch number only, not on iterators opened before.
    stream = training_inputs.make_training_dataset(split, rows, 3, shuffle_seed=7, initial_epoch=1,
                                                   sort_window_batches=2)
    assert batches(stream, 14) == epochs[1] + epochs[2]
    assert batches(stream, 7) == epochs[1]  # a new iterator starts over


@pytest.mark.parametrize(("steps_per_epoch", "expected"), [(12, 4), (9, 3), (10, 2), (7, 1), (2, 2), (1, 1)])
def test_steps_per_execution_divides_the_epoch(steps_per_epoch, expected):
    assert objective.steps_per_execution_for(steps_per_epoch) == expected


@pytest.mark.parametrize(("tf_config", "message"), [
    (None, r"--strategy multiworker needs the TF_CONFIG environment variable"),
    ("{not json", r"TF_CONFIG is not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', r"TF_CONFIG has no cluster with a 'worker'"),
    ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}',
     r"cluster\['worker'\] must be a list of 'host:port' strings"),
    ('{"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 2}}',
     r"task index 2 does not name one of the 2 'worker' address"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "ps", "index": 0}}', r"TF_CONFIG task must be"),
])
def test_multiworker_without_a_usable_tf_config_is_a_clear_error(extracted_out, copy_run, monkeypatch,
                                                                 tf_config, message):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(errors.PipelineError, match=message):
        distribution.check_tf_config(tf_config)
    if tf_config is None:
        out = copy_run(extracted_out)
        with pytest.raises(errors.PipelineError, match=message):
            train.run_train(out, dict(TRAIN_OVERRIDES, **{"train.strategy": "multiworker"}))
        assert not (out / "decoder.keras").exists()
    distribution.check_tf_config('{"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 1}}')


def test_cache_above_the_memory_limit_streams_from_hdf5_with_the_same_batches_and_losses(
        trained_out, extracted_out, copy_run):
    config = config_module.PipelineConfig.load(extracted_out).replace(TRAIN_OVERRIDES)
    in_memory = training_inputs.load_training_data(extracted_out, config)
    streamed = training_inputs.load_training_data(extracted_out, config.replace({"train.max_cache_memory_gb": 1e-6}))
    assert in_memory.in_memory and isinstance(in_memory.feature_rows, training_inputs.InMemoryFeatures)
    assert not streamed.in_memory and isinstance(streamed.feature_rows, training_inputs.StreamedFeatures)

    def batches(data):
        dataset = training_inputs.make_caption_dataset(data.train, data.feature_rows, 8, shuffle_seed=5,
                                                       sort_window_batches=2)
        return list(dataset.as_numpy_iterator())

    expected, actual = batches(in_memory), batches(streamed)
    streamed.feature_rows.close()
    assert len(actual) == len(expected) == -(-len(in_memory.train) // 8)
    for (inputs, targets), (expected_inputs, expected_targets) in zip(actual, expected):
        np.testing.assert_array_equal(targets, expected_targets)
        np.testing.assert_array_equal(inputs["caption_tokens"], expected_inputs["caption_tokens"])
        np.testing.assert_array_equal(inputs["image_features"], expected_inputs["image_features"])

    # A whole streamed training run follows the in-memory run of the session fixture.
    out = copy_run(extracted_out)
    summary = train.run_train(out, dict(TRAIN_OVERRIDES, **{"train.max_cache_memory_gb": 1e-6}))
    assert summary["features_in_memory"] is False
    history = run_folder.read_training_history(out)
    reference = run_folder.read_training_history(trained_out)
    for name in ("loss", "val_loss"):
        np.testing.assert_allclose([entry[name] for entry in history], [entry[name] for entry in reference],
                                   rtol=1e-4)


def test_validation_loss_is_computed_on_the_captions_of_the_first_val_images_and_recorded(extracted_out, copy_run):
    out = copy_run(extracted_out)
    summary = train.run_train(out, dict(TRAIN_OVERRIDES, **{"train.epochs": 1, "train.validation_loss_images": 2}),
                              validation_scorer=_ScriptedScorer([0.5]))
    config = config_module.PipelineConfig.load(out)
    with run_folder.open_feature_cache(out) as reader:
        val_images = run_folder.usable_images(out, "val", reader.image_ids)
        features = reader.read_all()
    assert len(val_images) > 2 and summary["periods_run"] == 1
    first_two = sum(len(references) for references in val_images.references[:2])
    (entry,) = run_folder.read_training_history(out)
    assert (entry["val_loss_images"], entry["val_loss_captions"]) == (2, first_two)

    # The recorded loss is the decoder's (the period's weights, decoder.keras) on exactly those captions.
    model = objective.build_model(config, config.decoder.vocab_size, features.shape[1])
    model.set_weights(decoder_weights(out))
    data = training_inputs.load_training_data(out, config)

    def val_loss(split):
        dataset = training_inputs.make_caption_dataset(split, data.feature_rows, config.train.batch_size,
                                                       sort_by_length=True)
        return model.evaluate(dataset, verbose=0, return_dict=True)["loss"]

    assert val_loss(data.val.first_images(2)) == pytest.approx(entry["val_loss"], rel=1e-6)
    assert val_loss(data.val) != pytest.approx(entry["val_loss"], rel=1e-6)


def test_command_line_maps_validation_loss_images_and_rejects_a_negative_count():
    import run_pipeline

    args = run_pipeline.build_parser().parse_args(["train", "--out", "OUT", "--validation-loss-images", "0",
                                                   "--validation-images", "200"])
    overrides = {key: value for key, value in run_pipeline._overrides(args, run_pipeline.TRAIN_FLAGS).items()
                 if value is not None}  # flags not given map to None: the saved setting stays
    assert overrides == {"train.validation_loss_images": 0, "train.validation_images": 200}
    config = config_module.PipelineConfig().replace(overrides)
    assert config.train.validation_loss_images == 0
    with pytest.raises(errors.PipelineError, match=r"--validation-loss-images\) must be >= 0"):
        config_module.PipelineConfig().replace({"train.validation_loss_images": -1}).train.check()
