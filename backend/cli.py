"""Shared command line of `python -m backend.prepare` and `python -m backend.train`.

    python -m backend.prepare PREPARE.yaml [key=value ...] [--validate] [--print-config] [--force]
    python -m backend.train   TRAIN.yaml   [key=value ...] [--validate] [--print-config]

A module's `__main__` part is one line:

    if __name__ == "__main__":
        run_cli(sys.argv[1:], "train", train, __doc__)

Exit codes: 0 = done (or valid), 2 = invalid config or arguments (every problem on stderr, no traceback),
anything else = what run_fn returned.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Literal, NoReturn

from backend.config import (
    ConfigError,
    PrepareConfig,
    TrainConfig,
    dump_yaml,
    iter_fields,
    load_prepare_config,
    load_train_config,
)


def _keys_help(cls) -> str:
    lines = ["config keys (override any of them as key=value):"]
    for path, f in iter_fields(cls):
        lines.append(f"  {path:48s} {f.description}")
    return "\n".join(lines)


def build_parser(kind: Literal["prepare", "train"], description: str | None = None) -> argparse.ArgumentParser:
    cls = PrepareConfig if kind == "prepare" else TrainConfig
    parser = argparse.ArgumentParser(
        prog=f"python -m backend.{kind}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_keys_help(cls),
    )
    parser.add_argument("config", metavar="CONFIG", help=f"the {kind} YAML file")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override a key, e.g. training.train_iters=100 (value read as YAML)",
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="only check the config: print 'OK' and the resolved YAML, or every problem",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved YAML and exit")
    if kind == "prepare":
        parser.add_argument("--force", action="store_true", help="overwrite an existing output_path")
    return parser


def _report(e: ConfigError, config: str) -> None:
    n = len(e.problems)
    print(f"error: {config} is not valid ({n} problem{'s' if n != 1 else ''}):", file=sys.stderr)
    for p in e.problems:
        print(f"  {p}", file=sys.stderr)


def run_cli(
    argv: list[str] | None, kind: Literal["prepare", "train"], run_fn: Callable, description: str | None = None
) -> NoReturn:
    """Parse argv, load and validate the config, then call `run_fn(cfg)` (prepare: `run_fn(cfg, force=...)`).

    Always ends with SystemExit: 0 on success, 2 on an invalid config (problems on stderr), or run_fn's int
    return value. A ConfigError raised inside run_fn (e.g. check_world_size) is reported the same way.
    """
    if kind not in ("prepare", "train"):
        raise ValueError(f"kind must be 'prepare' or 'train', got {kind!r}")
    # intermixed: options may come after the key=value overrides
    args = build_parser(kind, description).parse_intermixed_args(argv)
    load = load_prepare_config if kind == "prepare" else load_train_config
    try:
        cfg = load(args.config, args.overrides)
        if kind == "train":  # this machine must be able to run it (QLoRA's CUDA, the trackers' packages)
            from backend.compat import check_machine

            check_machine(cfg)
    except ConfigError as e:
        _report(e, args.config)
        raise SystemExit(2) from None
    if args.validate:
        print(f"OK: {args.config} is valid")
        print(dump_yaml(cfg), end="")
        raise SystemExit(0)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        raise SystemExit(0)
    try:
        result = run_fn(cfg, force=args.force) if kind == "prepare" else run_fn(cfg)
    except ConfigError as e:
        _report(e, args.config)
        raise SystemExit(2) from None
    raise SystemExit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
