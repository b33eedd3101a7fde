"""The model zoo's command line: ``list``, ``profile``, ``train``, ``experiment`` and ``evaluate``.

python -m models list
python -m models profile [--model NAME ...] [--input 3x84x84] [--json PATH]
python -m models train --model NAME [--data ROOT | --data synthetic] [--out DIR] [--epochs 10] [--resume] ...
python -m models experiment --model A --model B [--data ROOT] [--out DIR] [training options as for train]
python -m models evaluate --checkpoint DIR/best.pt [--data ROOT] [--fill mean] [--json PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from chanflex_kernels.files import atomic_write

from .profile import parse_input, profile_models, to_markdown
from .registry import list_models, model_info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    profile = commands.add_parser("profile", help="params and per-image FLOPs of the models, as a markdown table")
    profile.add_argument("--model", action="append", choices=list_models(), metavar="NAME",
                         help="a model to profile (repeatable; default: all)")
    profile.add_argument("--input", default="3x84x84", help="C x H x W of one image (default 3x84x84); "
                         "fixed-size models use their own size")
    profile.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    commands.add_parser("list", help="the registered models with their seeds")
    _add_train_parser(commands)
    _add_experiment_parser(commands)
    _add_evaluate_parser(commands)
    args = parser.parse_args(argv)

    if args.command == "train":
        return _train(parser, args)
    if args.command == "experiment":
        return _experiment(parser, args)
    if args.command == "evaluate":
        return _evaluate(parser, args)

    if args.command == "list":
        for name in list_models():
            info = model_info(name)
            print(f"{name:34s} task {info.task}  seed {info.seed:10s} {info.summary}")
        return 0
    try:
        shape = parse_input(args.input)
    except ValueError as err:
        parser.error(str(err))
    rows = profile_models(args.model, shape)
    print(to_markdown(rows))
    if args.json:
        atomic_write(args.json, lambda f: json.dump([dataclasses.asdict(r) for r in rows], f, indent=2))
    return 0


def _option(text: str):
    """``key=value`` of a model option; the value as a Python literal where it parses as one."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. num_kernels=6), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _add_training_options(parser, d) -> None:
    """The options ``train`` and ``experiment`` share (everything but the model and the output directory)."""
    from .train import OPTIMIZERS, PRECISIONS
    from chanflex_kernels.channels import FILL_STRATEGIES

    parser.add_argument("--data", default=d.data, help="dataset root, or 'synthetic' (default)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    parser.add_argument("--patience", type=int, help="early stopping: epochs without a better validation accuracy")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (cosine to 0; default {d.lr})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help=f"default {d.optimizer}")
    parser.add_argument("--image-size", type=int, help="square input side (default 84, the seeds'; 32 for "
                        "synthetic; fixed-size models their own)")
    parser.add_argument("--num-classes", type=int, help="head width (default: largest label + 1)")
    parser.add_argument("--temperature-epochs", type=float, default=d.temperature_epochs,
                        help="DynamicConv2d temperature 30 -> 1 over this many epochs (default 10)")
    parser.add_argument("--max-batches", type=int, help="at most this many training batches per epoch")
    parser.add_argument("--workers", type=int, default=d.workers,
                        help=f"data-loading processes (default {d.workers})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    parser.add_argument("--fill", choices=FILL_STRATEGIES, default=d.fill,
                        help="how a static model sees fewer channels at test (default mean: seed 000's protocol)")
    parser.add_argument("--synthetic-classes", type=int, default=d.synthetic_classes,
                        help="synthetic data: classes")
    parser.add_argument("--synthetic-per-class", type=int, default=d.synthetic_per_class,
                        help="synthetic data: training images per class (val and test a quarter)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default cuda when available)")
    parser.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                        help="fp32 (default) or bf16 (autocast; weights and optimizer stay float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_train_parser(commands) -> None:
    from .train import TrainConfig

    train = commands.add_parser(
        "train", help="train a model, keep its best checkpoint, test it on every channel combination",
        description="Train a registered model on ImageNet-mini (a root with train.txt, val.txt, test.txt: "
                    "'<image path> <label>' per line) or on built-in synthetic images; writes last.pt, best.pt, "
                    "history.json, curves.png, test_channels.md/json and summary.json into --out.")
    train.add_argument("--model", required=True, choices=list_models(), metavar="NAME", help="a registry name")
    train.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                       help="a model option, e.g. num_kernels=6 (repeatable)")
    train.add_argument("--out", help="run directory (default runs/MODEL-DATA)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    _add_training_options(train, TrainConfig(model=""))


def _add_experiment_parser(commands) -> None:
    from .train import TrainConfig

    experiment = commands.add_parser(
        "experiment", help="train several models alike, then compare them on every channel combination",
        description="Train each --model with the same settings into OUT/MODEL (resuming runs found there), "
                    "then write comparison.md, comparison.json and comparison.png into --out.")
    experiment.add_argument("--model", action="append", required=True, choices=list_models(), metavar="NAME",
                            help="a registry name (repeat for each model)")
    experiment.add_argument("--out", help="experiment directory (default runs/experiment-DATA)")
    experiment.add_argument("--baseline", metavar="NAME", help="one of the models: the table adds each model's "
                            "RGB accuracy as a fraction of its (task 2: against resnet34)")
    _add_training_options(experiment, TrainConfig(model=""))


def _add_evaluate_parser(commands) -> None:
    from chanflex_kernels.channels import FILL_STRATEGIES

    evaluate = commands.add_parser("evaluate", help="test a checkpoint of `train` on every channel combination")
    evaluate.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a run")
    evaluate.add_argument("--data", help="dataset root or 'synthetic' (default: the run's)")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test", help="default test")
    evaluate.add_argument("--combos", help="comma-separated channel combinations (default RGB,RG,RB,GB,R,G,B)")
    evaluate.add_argument("--fill", choices=FILL_STRATEGIES, help="for static models (default: the run's)")
    evaluate.add_argument("--device", help="cpu, cuda or cuda:N (default: the run's, else cuda when available)")
    evaluate.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args, model: str, out: str, options=()):
    from .train import TrainConfig

    info = model_info(model)
    image_size = args.image_size or (info.input_size[0] if info.input_size else 32 if args.data == "synthetic"
                                     else 84)
    return TrainConfig(model=model, data=args.data, out=out, model_options=dict(options), epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       optimizer=args.optimizer, image_size=image_size, num_classes=args.num_classes,
                       patience=args.patience, temperature_epochs=args.temperature_epochs,
                       max_batches=args.max_batches, workers=args.workers, seed=args.seed, fill=args.fill,
                       synthetic_classes=args.synthetic_classes, synthetic_per_class=args.synthetic_per_class,
                       device=args.device, precision=args.precision)


def _data_name(data: str) -> str:
    return os.path.basename(os.path.normpath(data))


def _interrupted(command: str, out: str) -> int:
    print(f"\ninterrupted: {out} keeps every complete epoch; to continue, run {command}", file=sys.stderr)
    return 130


def _train(parser, args) -> int:
    from .train import train

    out = args.out or os.path.join("runs", f"{args.model}-{_data_name(args.data)}")
    try:
        train(_config(args, args.model, out, args.option), resume=args.resume, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        return _interrupted("the same command" + ("" if args.resume else " with --resume"), out)
    print(f"run directory: {out}")
    return 0


def _experiment(parser, args) -> int:
    from .train import run_experiment

    out = args.out or os.path.join("runs", f"experiment-{_data_name(args.data)}")
    try:
        run_experiment([_config(args, m, out) for m in args.model], out, args.baseline,
                       progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        return _interrupted("the same command", out)
    print(f"experiment directory: {out}")
    return 0


def _evaluate(parser, args) -> int:
    from .train import evaluate_checkpoint

    try:
        report = evaluate_checkpoint(args.checkpoint, combos=args.combos.split(",") if args.combos else None,
                                     fill=args.fill, device=args.device, split=args.split, data=args.data,
                                     progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(report.to_markdown())
    if args.json:
        report.to_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
