#!/usr/bin/env python3
"""Captioner's command line: a thin layer that parses arguments and calls one stage.

    python run_pipeline.py                      # the whole pipeline on the demo data
    python run_pipeline.py all --data DIR --out OUT
    python run_pipeline.py extract|train|finetune|evaluate|export|caption|serve ...

Exit code 0 on success, 2 on bad usage or unusable input (one line on stderr).
"""

import argparse
import os
import sys

DEMO_OUT = os.path.join("artifacts", "demo")

# flag -> config field; flags default to None so that an absent flag keeps the saved value
TRAIN_FLAGS = {
    "epochs": ("train.epochs", int),
    "batch_size": ("train.batch_size", int),
    "learning_rate": ("train.learning_rate", float),
    "lr_schedule": ("train.lr_schedule", str),
    "warmup_steps": ("train.warmup_steps", int),
    "validate_every_steps": ("train.validate_every_steps", int),
    "patience_steps": ("train.patience_steps", int),
    "reduce_lr_patience_steps": ("train.reduce_lr_patience_steps", int),
    "select_on": ("train.select_on", str),
    "validation_images": ("train.validation_images", int),
    "validation_loss_images": ("train.validation_loss_images", int),
    "validation_beam_size": ("train.validation_beam_size", int),
    "embedding_dim": ("decoder.embedding_dim", int),
    "units": ("decoder.units", int),
    "dropout": ("decoder.dropout", float),
    "image_input": ("decoder.image_input", str),
    "max_caption_length": ("text.max_caption_length", int),
    "seed": ("seed", int),
    "strategy": ("train.strategy", str),
    "max_cache_memory_gb": ("train.max_cache_memory_gb", float),
    # `all --precision P` sets encoder.precision too (EXTRACT_FLAGS' flag of the same name).
    "precision": ("train.precision", str),
}
EXTRACT_FLAGS = {
    "weights": ("encoder.weights", str),
    "extract_batch_size": ("encoder.batch_size", int),
    "precision": ("encoder.precision", str),
    "feature_dtype": ("encoder.feature_dtype", str),
    "min_word_count": ("text.min_word_count", int),
}
FINETUNE_FLAGS = {
    "epochs": ("finetune.epochs", int),
    "learning_rate": ("finetune.learning_rate", float),
    "samples": ("finetune.samples", int),
    "baseline": ("finetune.baseline", str),
    "batch_size": ("finetune.batch_size", int),
    "strategy": ("finetune.strategy", str),
    "precision": ("finetune.precision", str),
}
DECODE_FLAGS = {
    "beam_size": ("decode.beam_size", int),
    "max_length": ("decode.max_length", int),
    "length_penalty": ("decode.length_penalty", float),
    "no_repeat_ngram_size": ("decode.no_repeat_ngram_size", int),
}


def _add_flags(parser, flags):
    for name, (field, kind) in flags.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                            help=f"sets {field}")


def _overrides(args, flags):
    return {field: getattr(args, name) for name, (field, _) in flags.items() if hasattr(args, name)}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="run_pipeline.py",
        description="Image captioning: ResNet50 features cached in HDF5, an LSTM decoder, one SavedModel.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def stage(name, help_text, data=False, out=True):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if data:
            sub.add_argument("--data", required=True, help="dataset folder (Flickr8k, Kaggle or Karpathy layout)")
        if out:
            sub.add_argument("--out", required=True, help="artifact folder")
        return sub

    sub = stage("all", "extract, train, evaluate and export", data=True)
    _add_flags(sub, {**EXTRACT_FLAGS, **TRAIN_FLAGS, **DECODE_FLAGS})
    sub.add_argument("--overwrite", action="store_true", help="replace a cache made with other encoder settings")
    sub.add_argument("--finetune-epochs", type=int, default=None,
                     help="after training, this many epochs (at most) of self-critical fine-tuning on CIDEr-D")

    sub = stage("extract", "stage 1: ResNet50 features of every image into OUT/features.h5", data=True)
    _add_flags(sub, EXTRACT_FLAGS)
    sub.add_argument("--overwrite", action="store_true", help="replace a cache made with other encoder settings")
    sub.add_argument("--num-shards", type=int, default=1, help="split the images into this many shards")
    sub.add_argument("--shard-index", type=int, default=0, help="which shard this process extracts")

    sub = stage("merge-features", "join shard files into one OUT/features.h5")

    sub = stage("train", "stage 2: train the decoder from OUT/features.h5 and OUT/captions.json")
    _add_flags(sub, TRAIN_FLAGS)
    sub.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    sub = stage("finetune", "self-critical fine-tuning of OUT/decoder.keras on CIDEr-D (keeps decoder_xe.keras)")
    _add_flags(sub, FINETUNE_FLAGS)
    sub.add_argument("--resume", action="store_true", help="continue from the last fine-tuning checkpoint")

    sub = stage("evaluate", "BLEU, CIDEr and the report on the test split")
    _add_flags(sub, DECODE_FLAGS)

    sub = stage("export", "write OUT/saved_model/ (image bytes -> captions)")
    _add_flags(sub, DECODE_FLAGS)

    sub = stage("verify", "check the artifacts in OUT/ against each other")

    sub = commands.add_parser("caption", help="print IMAGE<TAB>caption for each image")
    sub.add_argument("images", nargs="+", metavar="IMAGE")
    sub.add_argument("--model", default=os.path.join(DEMO_OUT, "saved_model"), help="exported SavedModel folder")
    sub.add_argument("--batch-size", type=int, default=16)

    sub = commands.add_parser("serve", help="server in TF Serving's REST and gRPC shapes, with an upload page")
    sub.add_argument("--model", default=os.path.join(DEMO_OUT, "saved_model"),
                     help="exported SavedModel folder (not used with --model-config-file)")
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=8501, help="REST port (0: a free one)")
    sub.add_argument("--grpc-port", type=int, default=8500, help="gRPC port (0: a free one)")
    sub.add_argument("--model-config-file", default=None,
                     help="TF Serving's models.config (OUT/serving/models.config): the model, version and labels")
    sub.add_argument("--batching-parameters-file", default=None,
                     help="TF Serving's batching parameters (OUT/serving/batching_parameters.txt): over the flags")
    sub.add_argument("--max-body-mb", type=float, default=16.0)
    sub.add_argument("--max-images", type=int, default=32, help="images per request at most")
    sub.add_argument("--max-batch-size", type=int, default=16,
                     help="instances of concurrent requests captioned in one model call at most (1: no batching)")
    sub.add_argument("--batch-timeout-ms", type=float, default=None,
                     help="longest a batch waits to fill after its first request arrived (default 2)")
    sub.add_argument("--num-batch-threads", type=int, default=None,
                     help="model calls that may run at once (default: the CPU cores this process may use)")
    sub.add_argument("--read-timeout-s", type=float, default=60.0,
                     help="a request body (or an idle connection) that takes longer is dropped")

    sub = commands.add_parser("demo", help="the whole pipeline on the generated demo data (the default)")
    sub.add_argument("--out", default=DEMO_OUT)
    return parser


def run(args):
    command = args.command or "demo"
    if command == "demo":
        from pipeline import demo

        demo.run_demo(getattr(args, "out", DEMO_OUT))
    elif command in ("extract", "all"):
        from pipeline import extract

        overrides = _overrides(args, EXTRACT_FLAGS)
        if command == "extract":
            extract.run_extract(args.data, args.out, overrides, overwrite=args.overwrite,
                                num_shards=args.num_shards, shard_index=args.shard_index)
        else:
            from pipeline import evaluate, export, train

            extract.run_extract(args.data, args.out, overrides, overwrite=args.overwrite)
            train.run_train(args.out, _overrides(args, TRAIN_FLAGS))
            if args.finetune_epochs:
                from pipeline import finetune

                finetune.run_finetune(args.out, {"finetune.epochs": args.finetune_epochs,
                                                 "finetune.strategy": args.strategy,
                                                 "finetune.precision": args.precision})
            evaluate.run_evaluate(args.out, _overrides(args, DECODE_FLAGS))
            export.run_export(args.out, _overrides(args, DECODE_FLAGS))
    elif command == "merge-features":
        from pipeline.data import feature_writer

        feature_writer.merge_shards(args.out)
    elif command == "train":
        from pipeline import train

        train.run_train(args.out, _overrides(args, TRAIN_FLAGS), resume=args.resume)
    elif command == "finetune":
        from pipeline import finetune

        finetune.run_finetune(args.out, _overrides(args, FINETUNE_FLAGS), resume=args.resume)
    elif command == "evaluate":
        from pipeline import evaluate

        evaluate.run_evaluate(args.out, _overrides(args, DECODE_FLAGS))
    elif command == "export":
        from pipeline import export

        export.run_export(args.out, _overrides(args, DECODE_FLAGS))
    elif command == "verify":
        from pipeline import verify

        return verify.run_verify(args.out)
    elif command == "caption":
        from pipeline import caption

        return caption.run_caption(args.images, args.model, batch_size=args.batch_size)
    elif command == "serve":
        from pipeline import serve

        serve.run_serve(args.model, host=args.host, port=args.port, max_body_mb=args.max_body_mb,
                        max_images=args.max_images, max_batch_size=args.max_batch_size,
                        batch_timeout_ms=args.batch_timeout_ms, num_batch_threads=args.num_batch_threads,
                        read_timeout_s=args.read_timeout_s, grpc_port=args.grpc_port,
                        model_config_file=args.model_config_file,
                        batching_parameters_file=args.batching_parameters_file)
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    from pipeline.core.errors import PipelineError

    try:
        return run(args) or 0
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        # A full disk or an unwritable OUT surfaces deep inside h5py, Keras or TensorFlow.
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{' '.join(str(error.strerror or error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    from pipeline.core import console

    # Before any stage imports TensorFlow: its C++ start-up lines read like failures. Here,
    # not in main(), which tests and other programs call in their own process.
    console.quiet_tensorflow_logs()
    sys.exit(main())
