"""``python -m models profile [--model NAME ...] [--input 3x84x84] [--json PATH]`` and ``python -m models list``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .profile import parse_input, profile_models, to_markdown
from .registry import list_models, model_info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    profile = commands.add_parser("profile", help="params and per-image FLOPs of the models, as a markdown table")
    profile.add_argument("--model", action="append", choices=list_models(), metavar="NAME",
                         help="a model to profile (repeatable; default: all)")
    profile.add_argument("--input", default="3x84x84", help="C x H x W of one image (default 3x84x84); "
                         "fixed-size models use their own size")
    profile.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    commands.add_parser("list", help="the registered models with their seeds")
    args = parser.parse_args(argv)

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
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
