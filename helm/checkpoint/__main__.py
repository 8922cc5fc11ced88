"""``python -m helm.checkpoint verify PATH`` and ``convert OLD NEW`` (see helm.checkpoint)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from helm.checkpoint.format import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    upgrade,
)


def convert(old: str | os.PathLike, new: str | os.PathLike, *, unsafe: bool = False) -> None:
    """Rewrite a version-1 checkpoint as version 2. ``unsafe`` reads it with full unpickling,
    which runs any code the file holds: only for a file from a source you trust."""
    if unsafe:
        state = torch.load(old, map_location="cpu", weights_only=False)
    else:
        state = load_checkpoint(old)
    if state.get("format_version", 1) == 1:
        state = upgrade(state)
    save_checkpoint(state, new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helm.checkpoint", description="verify or convert HELM checkpoints"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "convert", help="rewrite an old-format checkpoint in the current format"
    )
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument(
        "--unsafe",
        action="store_true",
        help="read OLD with full unpickling, which RUNS ANY CODE IN IT: only for a file you trust",
    )
    p = commands.add_parser("verify", help="load a checkpoint and check its digest")
    p.add_argument("path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "verify":
            ckpt = load_checkpoint(args.path)
            print(
                f"{args.path}: ok (format {ckpt['format_version']}, epoch {ckpt['epoch']}, step {ckpt['step']})"
            )
            return 0
        if args.unsafe:
            print(
                f"WARNING: reading {args.old} with full unpickling. A checkpoint can carry code "
                "that this runs with your rights. Continue only if you trust where it came from.",
                file=sys.stderr,
            )
        convert(args.old, args.new, unsafe=args.unsafe)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.new} (format {FORMAT_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
