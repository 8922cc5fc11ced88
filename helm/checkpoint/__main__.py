"""``python -m helm.checkpoint verify PATH`` (a checkpoint, or an exported folder) and ``convert
OLD NEW`` (see helm.checkpoint)."""

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
    zip_problem,
)
from helm.errors import USER_ERRORS


def convert(old: str | os.PathLike, new: str | os.PathLike, *, unsafe: bool = False) -> None:
    """Rewrite a version-1 checkpoint as version 2. ``unsafe`` reads it with full unpickling,
    which runs any code the file holds: only for a file from a source you trust."""
    from helm.checkpoint.dcp import is_sharded

    if is_sharded(old):  # its optimizer state is sharded: a single file would not resume
        raise CheckpointError(
            f"{old} is a sharded checkpoint folder, in the current format: resume it as it is "
            "(--resume, with or without --fsdp); eval.py and export read it directly"
        )
    if unsafe:
        state = torch.load(old, map_location="cpu", weights_only=False)
    else:
        state = load_checkpoint(old)
    if state.get("format_version", 1) == 1:
        state = upgrade(state)
    save_checkpoint(state, new)


def verify(path: str | os.PathLike) -> str:
    """A line saying what was checked: a checkpoint's structure, every entry's CRC and the digest
    of its contents; an exported folder's digests (SHA256SUMS), weight files and a full load."""
    from helm.checkpoint.dcp import is_sharded

    if os.path.isdir(path) and not is_sharded(path):
        from helm.hf.load import verify_folder

        return verify_folder(path)
    ckpt = load_checkpoint(path)
    if is_sharded(path):  # every file's digest checked, the weights read whole
        return f"{path}: ok (sharded, epoch {ckpt['epoch']}, step {ckpt['step']})"
    problem = zip_problem(path, crc=True)
    if problem:
        raise CheckpointError(f"checkpoint {path} is corrupted: {problem}")
    return (
        f"{path}: ok (format {ckpt['format_version']}, epoch {ckpt['epoch']}, step {ckpt['step']})"
    )


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
    p = commands.add_parser(
        "verify", help="check a checkpoint, or an exported folder, against its digests"
    )
    p.add_argument("path", help="a checkpoint file, or a folder written by eval.py export")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "verify":
            print(verify(args.path))
            return 0
        if args.unsafe:
            print(
                f"WARNING: reading {args.old} with full unpickling. A checkpoint can carry code "
                "that this runs with your rights. Continue only if you trust where it came from.",
                file=sys.stderr,
            )
        convert(args.old, args.new, unsafe=args.unsafe)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.new} (format {FORMAT_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
