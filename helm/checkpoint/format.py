"""The checkpoint file: what it holds (``FIELDS``, the one list), its digest, atomic writes and
safe reads (``torch.load(weights_only=True)``), and the upgrade of version-1 files. See
``helm.checkpoint`` for the whole format."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import shutil
import struct
import zipfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helm.errors import CheckpointError
from helm.fileio import atomic_path, atomic_write

log = logging.getLogger("helm")
FORMAT_VERSION = 2
_PLAIN = (str, int, float, bool, type(None))


@dataclass
class RunInfo:
    """What a run is: fixed for its whole life, stored in every checkpoint."""

    config: dict[str, Any]  # the resolved configuration (config.yaml)
    model_name: str
    model_config: dict[str, Any]  # the model config's fields
    tokenizer: dict[str, Any]  # tokenizer_state(...)
    hierarchy: dict[str, Any]  # CodonHierarchy.state_dict()

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RUN_FIELDS}


# What a checkpoint holds: the one list. TrainState writes and restores these fields,
# load_checkpoint requires them, and helm.checkpoint's docstring says what each is.
STATE_DICTS = ("model", "optimizer", "scheduler", "scaler", "saver")  # each module's state_dict()
COUNTERS = ("epoch", "step", "batches_done", "bad_epochs", "epoch_metrics")  # where the run is
RUN_FIELDS = tuple(f.name for f in fields(RunInfo))  # what the run is
FIELDS = (*STATE_DICTS, "ema", *COUNTERS, "world_size", "rng", *RUN_FIELDS)
REQUIRED_KEYS = (*STATE_DICTS, "epoch", "step", "batches_done", "rng", *RUN_FIELDS)


# Integrity -----------------------------------------------------------------------------------------


def payload_digest(state: Any) -> str:
    """sha256 of a checkpoint's contents: every tensor's dtype, shape and bytes, every plain value,
    in the dict order the file keeps. Raises TypeError for anything that is not plain data."""
    h = hashlib.sha256()
    _feed(h, state, "checkpoint")
    return h.hexdigest()


def _feed(h, obj: Any, where: str) -> None:
    kind = type(obj)
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif kind in (dict, OrderedDict):
        h.update(f"D{len(obj)};".encode())
        for key, value in obj.items():
            _feed(h, key, where)
            _feed(h, value, f"{where}[{key!r}]")
    elif kind in (list, tuple):
        h.update(f"{kind.__name__}{len(obj)};".encode())
        for i, value in enumerate(obj):
            _feed(h, value, f"{where}[{i}]")
    elif kind in _PLAIN:  # exact types: a numpy float is a float subclass that pickles as code
        h.update(f"{kind.__name__}:{obj!r};".encode())
    else:
        raise TypeError(
            f"{where} is a {kind.__module__}.{kind.__qualname__}: a checkpoint holds only tensors, "
            "dicts, lists, tuples, str, int, float, bool and None"
        )


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """The dict as written: ``format_version`` and the ``digest`` of everything else added."""
    sealed = {k: v for k, v in state.items() if k != "digest"}
    sealed["format_version"] = FORMAT_VERSION
    sealed["digest"] = payload_digest(sealed)
    return sealed


# Writing -------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save into a temp file beside ``path``, fsync, then rename over it. A failed write
    (a full disk) raises `CheckpointError` naming the cause; the previous file stays as it was."""
    with atomic_write(path, "wb", what="checkpoint", error=CheckpointError) as f:
        torch.save(obj, f)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a checkpoint dict (sealed with its version and digest) atomically."""
    atomic_save(seal(state), path)


def atomic_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes atomically (a hard link when possible: no extra I/O)."""
    with atomic_path(dst, what="checkpoint", error=CheckpointError) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


# Reading -------------------------------------------------------------------------------------------


def _version1_globals() -> list:
    """The types a version-1 file's numpy RNG state needs (an uint32 array), under the names numpy
    1 and 2 pickle them with. They build arrays and dtypes only, never call anything else."""
    core = np._core if hasattr(np, "_core") else np.core
    reconstruct = core.multiarray._reconstruct
    return [
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def _refusal(exc: Exception) -> str:
    """What torch's weights-only unpickler refused, in a few words."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"a reference to {found.group(1)}"
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith(boilerplate):
            return line.strip().removeprefix("WeightsUnpickler error:").strip()
    return type(exc).__name__


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def read_weights_only(
    path: Path, *, what: str, map_location: Any = "cpu", mmap: bool = False
) -> Any:
    """``torch.load(weights_only=True)`` of a torch zip file, its structure checked first
    (`zip_problem`): a file that needs more than tensors and plain data, or cannot be read, raises
    `CheckpointError` in one line (``what`` names the file: "checkpoint", "weights file")."""
    problem = zip_problem(path)
    if problem:
        raise CheckpointError(f"{what} {path} is corrupted: {problem}")
    try:
        with torch.serialization.safe_globals(_version1_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{what} {path} is refused: it holds {_refusal(exc)}, not only tensors and plain "
            "data (a damaged or a crafted file); loading such a file can run code, so nothing in "
            "it was loaded"
        ) from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{what} {path} is corrupted or not a {what}: it cannot be read ({_first_line(exc)})"
        ) from None


def _read(path: Path, map_location: Any) -> Any:
    try:
        return read_weights_only(path, what="checkpoint", map_location=map_location)
    except CheckpointError as exc:
        if " is refused: " not in str(exc):
            raise
        raise CheckpointError(
            f"{exc}. Use checkpoints only from people you trust; a checkpoint of an older HELM "
            f"that you trust can be rewritten with "
            f"'python -m helm.checkpoint convert --unsafe {path} NEW.pt'"
        ) from None


# A torch file is a zip archive: entries (local header, data, data descriptor), the central
# directory, its end record. torch's reader trusts the central directory and checks no CRC, so
# corruptions outside the tensors' bytes (which the digest covers) would pass unseen: a second
# entry of the same name (torch reads one, zipfile the other), bytes appended or inserted, a
# local header or data descriptor that disagrees with the directory.
_LOCAL, _DESCRIPTOR = b"PK\x03\x04", b"PK\x07\x08"
_END, _END64_LOCATOR = b"PK\x05\x06", b"PK\x06\x07"


def zip_problem(path: str | os.PathLike, *, crc: bool = False) -> str | None:
    """What is wrong with the structure of the zip archive at ``path``, or None. With ``crc``
    every entry is also read and checked against its CRC-32 (``helm.checkpoint verify``)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
            counts = Counter(info.filename for info in infos)
            twice = [name for name, n in counts.items() if n > 1]
            if twice:
                n, name = counts[twice[0]], twice[0]
                return f"it holds {n} entries named {name} (readers differ on which one counts)"
            end = 0
            for info in sorted(infos, key=lambda i: i.header_offset):
                if info.header_offset != end:
                    return f"unexpected bytes before entry {info.filename}"
                problem, end = _entry(f, info)
                if problem:
                    return problem
            problem = _directory(f, size, end, len(infos))
            if problem is None and crc:
                bad = archive.testzip()
                problem = f"entry {bad} fails its CRC-32 check" if bad else None
            return problem
    except (
        OSError,
        EOFError,
        zipfile.BadZipFile,
        struct.error,
        ValueError,
        NotImplementedError,
    ) as exc:
        return f"not a complete zip archive ({_first_line(exc)})"


def _entry(f, info: zipfile.ZipInfo) -> tuple[str | None, int]:
    """(what is wrong with an entry's local header and data descriptor, where the entry ends)."""
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) < 30 or head[:4] != _LOCAL:
        return f"entry {info.filename} has no local header", 0
    _, version, flags, method, time, date, crc, csize, usize, name_len, extra_len = struct.unpack(
        "<4sHHHHHIIIHH", head
    )
    name = f.read(name_len).decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
    extra = f.read(extra_len)
    y, mo, d, h, mi, sec = info.date_time
    needs = info.extract_version | info.reserved << 8  # zipfile splits the field in two bytes
    central = (info.orig_filename, needs, info.flag_bits, info.compress_type,
               (h << 11) | (mi << 5) | (sec // 2), ((y - 1980) << 9) | (mo << 5) | d)  # fmt: skip
    disagrees = f"the %s of entry {info.filename} disagrees with the central directory"
    if (name, version, flags, method, time, date) != central:
        return disagrees % "local header", 0
    end = info.header_offset + 30 + name_len + extra_len + info.compress_size
    sizes = (info.CRC, info.compress_size, info.file_size)
    if not flags & 0x08:  # CRC and sizes in the local header (sizes 0xFFFFFFFF: in zip64 extra)
        if crc != info.CRC or (0xFFFFFFFF not in (csize, usize) and (crc, csize, usize) != sizes):
            return disagrees % "local header", 0
        return None, end
    if (crc, csize, usize) not in ((0, 0, 0), sizes):  # zeros, by the standard
        return disagrees % "local header", 0
    # A data descriptor follows the data: [signature] CRC, sizes (8 bytes each in zip64).
    f.seek(end)
    signed = f.read(4) == _DESCRIPTOR
    f.seek(end + 4 * signed)
    zip64 = _has_zip64_field(extra)
    fields = f.read(20 if zip64 else 12)
    if struct.unpack("<IQQ" if zip64 else "<III", fields) != sizes:
        return disagrees % "data descriptor", 0
    return None, end + 4 * signed + len(fields)


def _has_zip64_field(extra: bytes) -> bool:
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack("<HH", extra[at : at + 4])
        if kind == 1:
            return True
        at += 4 + length
    return False


def _directory(f, size: int, entries_end: int, count: int) -> str | None:
    """What is wrong with the central directory and the end records, given where the ``count``
    entries end."""
    tail_start = max(0, size - 22 - 0xFFFF)
    f.seek(tail_start)
    tail = f.read()
    at = tail.rfind(_END)
    if at < 0 or at + 22 > len(tail):
        return "no end-of-archive record"
    end = struct.unpack(
        "<4sHHHHIIH", tail[at : at + 22]
    )  # sig, disks, counts, size, offset, comment
    end_record = tail_start + at
    if end_record + 22 + end[7] != size:
        extra = size - (end_record + 22 + end[7])
        return f"{extra} bytes follow the end of the archive" if extra > 0 else "it is cut short"
    counts, (cd_size, cd_offset), directory_end = end[3:5], end[5:7], end_record
    locator = tail[at - 20 : at] if at >= 20 else b""
    if locator[:4] == _END64_LOCATOR:  # zip64: the end record's fields hold at most its values
        (directory_end,) = struct.unpack("<Q", locator[8:16])
        f.seek(directory_end + 24)
        *counts64, size64, offset64 = struct.unpack("<QQQQ", f.read(32))
        for small, value in zip((*counts, cd_size, cd_offset), (*counts64, size64, offset64)):
            if small not in (value, 0xFFFF, 0xFFFFFFFF):
                return "its end records disagree"
        counts, cd_size, cd_offset = counts64, size64, offset64
    if any(n != count for n in counts):
        return f"its end record counts {counts[-1]} entries, its directory {count}"
    if cd_offset != entries_end:
        return "unexpected bytes between the last entry and the central directory"
    if cd_offset + cd_size != directory_end:
        return "unexpected bytes after the central directory"
    return None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain data only) and verify its digest; a missing,
    refused, corrupted or incomplete file raises `CheckpointError` naming it."""
    path = Path(path)
    if (path / ".metadata").is_file():  # a sharded run's folder (helm.checkpoint.dcp), whole
        from helm.checkpoint.dcp import read_consolidated

        return read_consolidated(path, map_location)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}")
    with open(path, "rb") as f:
        head = f.read(4)
        if not b"PK\x03\x04".startswith(
            head
        ):  # torch.save writes a zip archive (a cut one: corrupted)
            raise CheckpointError(
                f"{path} is not a checkpoint (train.py writes .pt zip archives; a HELM export or "
                "Hugging Face model is a folder)"
            )
    state = _read(path, map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a HELM checkpoint (no 'model' entry)")
    version = state.get("format_version", 1)
    if version == 1:
        log.warning(
            "checkpoint %s has the old format (no digest to verify); rewrite it with "
            "'python -m helm.checkpoint convert %s NEW.pt'",
            path,
            path,
        )
        try:
            state = upgrade(state)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a HELM checkpoint ({exc!r})") from None
    elif version == FORMAT_VERSION:
        stored = state.pop("digest", None)
        try:
            actual = payload_digest(state)
        except TypeError as exc:  # only a damaged file holds what save_checkpoint refuses
            raise CheckpointError(f"checkpoint {path} is corrupted: {exc}") from None
        if stored != actual:
            raise CheckpointError(
                f"checkpoint {path} is corrupted: digest mismatch (stored {str(stored)[:16]}, "
                f"contents {actual[:16]})"
            )
        state["digest"] = stored
    else:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this HELM reads 1 and "
            f"{FORMAT_VERSION} (a newer HELM wrote it?)"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete HELM checkpoint: no {missing}")
    return state


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A version-1 checkpoint dict in the version-2 layout (RNG states and tokenizer as tensors)."""
    state = dict(state)
    state["rng"] = [_rng_v2(rng) for rng in state["rng"]]
    tar = state["tokenizer"]["tar"]
    if isinstance(tar, bytes):
        state["tokenizer"] = {**state["tokenizer"], "tar": _bytes_tensor(tar)}
    state["format_version"] = FORMAT_VERSION
    state.pop("digest", None)
    return state


def _rng_v2(rng: dict[str, Any]) -> dict[str, Any]:
    rng = dict(rng)
    if isinstance(rng["python"], tuple):
        rng["python"] = _python_rng(rng["python"])
    if isinstance(rng["numpy"], tuple):
        rng["numpy"] = _numpy_rng(rng["numpy"])
    return rng


def _python_rng(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state  # (3, 625 ints < 2**32, the cached gauss or None)
    return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _numpy_rng(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state  # np.random.get_state(legacy=True)
    keys = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    return {
        "name": name,
        "keys": keys,
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
