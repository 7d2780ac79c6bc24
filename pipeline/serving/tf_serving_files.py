"""TF Serving's two configuration files, written by `export` into OUT/serving/ and read by `serve`.

    OUT/serving/models.config             --model_config_file: a text-format ModelServerConfig
    OUT/serving/batching_parameters.txt   --batching_parameters_file: text-format BatchingParameters
    OUT/serving/captioner/1/              the SavedModel (written by `export`)

so one configuration runs in both servers:

    tensorflow_model_server --port=8500 --rest_api_port=8501 --model_config_file=/models/models.config \
        --enable_batching --batching_parameters_file=/models/batching_parameters.txt
    python run_pipeline.py serve --model-config-file OUT/serving/models.config \
        --batching-parameters-file OUT/serving/batching_parameters.txt

`base_path` is "/models/captioner": TF Serving refuses a relative base path (ServerCore's
config check: "Expected model ... to have an absolute path or URI"), and /models is where the
tensorflow/serving image keeps its models, so the serving folder is mounted there
(`-v OUT/serving:/models`). `serve` reads a base path under /models that does not exist as the
same path under the config file's own folder, and a relative one as relative to that folder.

ModelServerConfig comes from `tensorflow-serving-api`. BatchingParameters (TF Serving's
session_bundle_config.proto) is not in that package: its fields are declared here with their
numbers and wrapper types from that proto, and google.protobuf's text_format reads and writes
the file, so a field or value TF Serving would refuse is refused here too.
"""

import dataclasses
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2
from tensorflow_serving.config import model_server_config_pb2

from pipeline.core import errors, io_utils

MODELS_CONFIG_FILE = "models.config"
BATCHING_PARAMETERS_FILE = "batching_parameters.txt"
DOCKER_MODELS_ROOT = "/models"  # the tensorflow/serving image's model folder
MODEL_PLATFORM = "tensorflow"
STABLE_LABEL = "stable"
# session_bundle_config.proto's BatchingParameters: name -> (field number, wrapper type). The
# first four are the ones TF Serving's batching guide documents and `serve` applies.
_INT64 = ".google.protobuf.Int64Value"
BATCHING_FIELDS = {
    "max_batch_size": (1, _INT64),
    "batch_timeout_micros": (2, _INT64),
    "max_enqueued_batches": (3, _INT64),
    "num_batch_threads": (4, _INT64),
}
_OTHER_BATCHING_FIELDS = {  # accepted, as TF Serving accepts them, but not applied by `serve`
    "thread_pool_name": (5, ".google.protobuf.StringValue", descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL),
    "allowed_batch_sizes": (6, None, descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED),
    "pad_variable_length_inputs": (7, None, descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL),
}


def _batching_parameters_class():
    """The BatchingParameters message class, built from a descriptor (its proto is not pip-installable)."""
    field_type = descriptor_pb2.FieldDescriptorProto
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="captioner/batching_parameters.proto", package="tensorflow.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"])
    message = file_proto.message_type.add(name="BatchingParameters")
    for name, (number, type_name) in BATCHING_FIELDS.items():
        message.field.add(name=name, number=number, type=field_type.TYPE_MESSAGE, type_name=type_name,
                          label=field_type.LABEL_OPTIONAL)
    for name, (number, type_name, label) in _OTHER_BATCHING_FIELDS.items():
        if type_name:
            message.field.add(name=name, number=number, type=field_type.TYPE_MESSAGE, type_name=type_name, label=label)
        else:
            scalar = field_type.TYPE_INT64 if label == field_type.LABEL_REPEATED else field_type.TYPE_BOOL
            message.field.add(name=name, number=number, type=scalar, label=label)
    pool = descriptor_pool.DescriptorPool()  # its own pool: no clash with a real TF Serving proto
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(file_proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


BatchingParameters = _batching_parameters_class()


class ModelSpecError(Exception):
    """A request names a model, version or label that is not served.

    `code`: TF Serving's canonical code name, "NOT_FOUND" or "INVALID_ARGUMENT" (its answer to an
    unknown label); `message`: TF Serving's message for the case.
    """

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """The one model `serve` serves: `name` (str), `model_dir` (Path of the SavedModel),
    `version` (int) and `labels` (tuple of (label, version) pairs)."""

    name: str
    model_dir: Path
    version: int = 1
    labels: tuple = ()

    def resolve(self, name, version=None, label=None):
        """The served version (int) a predict or metadata request's model spec names.

        `version` None and `label` None (or "") mean the latest, as in TF Serving. Raises
        ModelSpecError with TF Serving's code and message otherwise.
        """
        if label:
            if name != self.name or label not in dict(self.labels):
                raise ModelSpecError("INVALID_ARGUMENT", f"Unrecognized servable version label: {label}")
            return dict(self.labels)[label]
        if name != self.name or (version is not None and version != self.version):
            request = f"Latest({name})" if version is None else f"Specific({name}, {version})"
            raise ModelSpecError("NOT_FOUND", f"Servable not found for request: {request}")
        return self.version

    def resolve_status(self, name, version=None, label=None):
        """Like `resolve`, with GetModelStatus's messages for an unknown model or version."""
        if label:
            return self.resolve(name, label=label)
        if name != self.name:
            raise ModelSpecError("NOT_FOUND", f"Could not find any versions of model {name}")
        if version is not None and version != self.version:
            raise ModelSpecError("NOT_FOUND", f"Could not find version {version} of model {name}")
        return self.version


# --- models.config ------------------------------------------------------------------------------


def model_server_config(name, version, labels=None):
    """The ModelServerConfig of one TensorFlow model served at one version, labelled `stable` by default."""
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = name
    model.base_path = f"{DOCKER_MODELS_ROOT}/{name}"
    model.model_platform = MODEL_PLATFORM
    # Only this version: a later export into the same folder is not served before it is tested.
    model.model_version_policy.specific.versions.append(version)
    for label, labelled_version in (labels if labels is not None else {STABLE_LABEL: version}).items():
        model.version_labels[label] = labelled_version
    return config


def write_models_config(serving_dir, name, version):
    """Writes `serving_dir`/models.config for the model `name` at `version` (atomically); returns its Path."""
    path = Path(serving_dir) / MODELS_CONFIG_FILE
    header = (f"# TF Serving model config (tensorflow_model_server --model_config_file=...), written by export.\n"
              f"# base_path: the tensorflow/serving image's {DOCKER_MODELS_ROOT}, where this folder is mounted\n"
              f"# (-v OUT/serving:{DOCKER_MODELS_ROOT}); `serve --model-config-file` reads it as this file's folder.\n")
    io_utils.write_text(path, header + text_format.MessageToString(model_server_config(name, version)))
    return path


def read_models_config(path):
    """The ServedModel a models.config describes; PipelineError saying what `serve` cannot serve.

    `serve` serves one TensorFlow model at one version: the config's only model, at the one
    version its `specific` policy names, or at the highest numbered version folder for the
    `latest` policy (TF Serving's default).
    """
    path = Path(path)
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), config)
    except OSError as error:
        raise errors.PipelineError(f"{path}: cannot read the model config ({error.strerror or error})") from None
    except (text_format.ParseError, UnicodeDecodeError) as error:
        raise errors.PipelineError(f"{path}: not a text-format ModelServerConfig ({error})") from None
    models = config.model_config_list.config
    if len(models) != 1:
        raise errors.PipelineError(f"{path}: serve serves exactly one model; the config lists {len(models)}")
    model = models[0]
    if model.model_platform not in ("", MODEL_PLATFORM):
        raise errors.PipelineError(f"{path}: model_platform {model.model_platform!r} is not {MODEL_PLATFORM!r}")
    base_path = _resolve_base_path(model.base_path, path.parent)
    version = _served_version(model, base_path, path)
    labels = dict(model.version_labels)
    for label, labelled_version in labels.items():
        if labelled_version != version:
            # TF Serving's rule too: a label may only point at a version it serves.
            raise errors.PipelineError(f"{path}: label {label!r} points at version {labelled_version}, "
                                       f"which is not served (version {version} is)")
    return ServedModel(model.name, base_path / str(version), version, tuple(sorted(labels.items())))


def _resolve_base_path(base_path, config_dir):
    if not base_path:
        raise errors.PipelineError(f"{config_dir / MODELS_CONFIG_FILE}: the model has no base_path")
    path = Path(base_path)
    if not path.is_absolute():
        return config_dir / path
    root = Path(DOCKER_MODELS_ROOT)
    if not path.exists() and path.is_relative_to(root):
        return config_dir / path.relative_to(root)
    return path


def _served_version(model, base_path, config_path):
    policy = model.model_version_policy.WhichOneof("policy_choice")
    if policy == "specific":
        versions = sorted(set(model.model_version_policy.specific.versions))
        if len(versions) != 1:
            raise errors.PipelineError(f"{config_path}: serve serves one version; the policy names {versions}")
        return versions[0]
    if policy not in (None, "latest"):
        raise errors.PipelineError(f"{config_path}: serve serves one version; use the `specific` or `latest` policy, "
                                   f"not {policy!r}")
    versions = sorted(int(entry.name) for entry in base_path.glob("*") if entry.name.isdigit() and entry.is_dir())
    if not versions:
        raise errors.PipelineError(f"{base_path}: no numbered version folder (e.g. {base_path / '1'}) to serve")
    return versions[-1]


# --- batching_parameters.txt -------------------------------------------------------------------


def batching_parameters_text(max_batch_size, batch_timeout_micros, max_enqueued_batches, num_batch_threads):
    """The batching file's text: the four documented fields, one per line as the guide prints them (str)."""
    message = BatchingParameters()
    values = {"max_batch_size": max_batch_size, "batch_timeout_micros": batch_timeout_micros,
              "max_enqueued_batches": max_enqueued_batches, "num_batch_threads": num_batch_threads}
    for name, value in values.items():
        getattr(message, name).value = int(value)
    return "".join(f"{name} {{ {text_format.MessageToString(getattr(message, name), as_one_line=True)} }}\n"
                   for name in BATCHING_FIELDS)


def write_batching_parameters(path, settings):
    """Writes the batching parameters file (TF Serving's text format) of `settings` (a
    `server.ServeSettings`) at `path`; returns the Path."""
    path = Path(path)
    header = ("# TF Serving batching parameters (--enable_batching --batching_parameters_file=...): serve's defaults.\n"
              "# num_batch_threads is the CPU count of the machine that exported: set it to the serving machine's.\n")
    text = batching_parameters_text(settings.max_batch_size, round(settings.batch_timeout_ms * 1000),
                                    settings.requests_in_flight, settings.num_batch_threads)
    io_utils.write_text(path, header + text)
    return path


def read_batching_parameters(path):
    """({field: int} of the documented fields the file sets, [names of other fields it sets]).

    PipelineError naming the file, line and column for a field or value TF Serving would refuse.
    """
    path = Path(path)
    message = BatchingParameters()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), message)
    except OSError as error:
        raise errors.PipelineError(f"{path}: cannot read the batching parameters ({error.strerror or error})") from None
    except (text_format.ParseError, UnicodeDecodeError) as error:
        raise errors.PipelineError(f"{path}: not TF Serving's batching parameters format ({error}); it holds "
                                   f"lines like `max_batch_size {{ value: 16 }}`") from None
    values = {name: getattr(message, name).value for name in BATCHING_FIELDS if message.HasField(name)}
    others = [field.name for field, _ in message.ListFields() if field.name not in BATCHING_FIELDS]
    return values, others


def batching_settings(path):
    """The `serve` settings ({ServeSettings field: value}) a batching parameters file sets.

    Fields TF Serving has and `serve` does not apply (allowed_batch_sizes, ...) get a note on stderr.
    """
    values, others = read_batching_parameters(path)
    if others:
        print(f"note: {path}: {', '.join(others)} not applied by serve (TF Serving's only)", file=sys.stderr,
              flush=True)
    settings = {name: values[name] for name in ("max_batch_size", "num_batch_threads", "max_enqueued_batches")
                if name in values}
    if "batch_timeout_micros" in values:
        settings["batch_timeout_ms"] = values["batch_timeout_micros"] / 1000.0
    return settings
