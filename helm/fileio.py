"""Files written whole or not at all, and folders that carry the digests of their files.

Every file HELM writes (checkpoints, exports, token caches, the demo corpus, results, embeddings)
goes to a temporary file beside its destination, is flushed to disk, and is renamed over the
destination only once complete: `atomic_write` (a file object), `atomic_path` (for writers that
take a path), `write_text` / `write_bytes`, and `staged_folder` for a folder of files. A write that
fails (a full disk, a file-size limit, no permission) removes the temporary file, leaves the
previous file as it was, and raises `WriteError` (or the caller's error class) whose one line names
the path and the cause.

A folder written by `staged_folder` carries ``SHA256SUMS`` (``sha256sum``'s format, so
``sha256sum -c SHA256SUMS`` checks it too), written last: `check_manifest` names the first file
whose digest differs. This module imports only the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from helm.errors import DISK_FULL, UserError, WriteError

MANIFEST = "SHA256SUMS"
# torch's zip writer reports a short write as a RuntimeError: "[enforce fail at
# inline_container.cc:672] . unexpected pos 704 vs 598" (torch 2.13), "PytorchStreamWriter failed
# writing file ..." or "file write failed" (older); the OSError, when torch wrote to a Python file
# object, is its __context__. numpy's tofile says "N requested and M written", without an errno;
# Rust writers (safetensors, tokenizers) put the errno in the text.
_SHORT_WRITE = re.compile(
    r"unexpected pos \d+|PytorchStreamWriter failed writing|file write failed|"
    r"\d+ requested and \d+ written"
)
_RUST_ERRNO = re.compile(r"\bcode: (\d+)|os error (\d+)")
_MANIFEST_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _errno(exc: BaseException) -> int | None:
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno:
            return link.errno
    found = _RUST_ERRNO.search(str(exc))
    return int(found.group(1) or found.group(2)) if found else None


def out_of_room(exc: BaseException) -> str | None:
    """The cause, in a few words ("no space left on device"), when ``exc`` is a write that ran out
    of room (a full disk, a file-size limit, a quota); else None."""
    code = _errno(exc)
    if code in DISK_FULL:
        return DISK_FULL[code]
    if code is None and any(_SHORT_WRITE.search(str(link)) for link in _chain(exc)):
        return "the write came up short (no space left on device, or a file-size limit)"
    return None


def write_cause(exc: BaseException) -> str | None:
    """What a failed write ran into, in a few words, or None when ``exc`` is not a failed write
    (a bug, an interrupt: those propagate as they are)."""
    code = _errno(exc)
    return out_of_room(exc) or (os.strerror(code).lower() if code else None)


def blocking_file(path: str | os.PathLike) -> Path | None:
    """The file that stands where ``path`` or one of its parent folders belongs, if any: a folder
    cannot be made there."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _failure(what: str, path: Path, cause: str, existed: bool) -> str:
    kept = f"; the previous {path.name} is unchanged" if existed else ""
    return f"cannot write {what} {path}: {cause}{kept}"


def _cause(exc: BaseException) -> str | None:
    """`write_cause` of a failure to report as a write error: not of an interrupt, nor of a user
    error other than a nested `WriteError` (whose cause is its context)."""
    if not isinstance(exc, Exception):
        return None
    if isinstance(exc, UserError) and not isinstance(exc, WriteError):
        return None
    return write_cause(exc)


def _umask() -> int:
    try:  # Linux: read it; setting it to read it back would change it for every thread meanwhile
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, what: str = "file", error: Callable[[str], Exception] = WriteError
) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer to fill; when the block ends it is synced and
    renamed over ``path``. A failed write raises ``error`` naming ``what`` and ``path``."""
    path = Path(path)
    block = blocking_file(path.parent)
    if path.is_dir() or block is not None:
        where = "it is a folder" if path.is_dir() else f"{block} is a file, not a folder"
        raise error(f"cannot write {what} {path}: {where}")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise error(_failure(what, path, write_cause(exc) or str(exc), existed)) from None
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the group
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        cause = _cause(exc)
        if cause is None:
            raise
        raise error(_failure(what, path, cause, existed)) from None


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: str = "w",
    *,
    what: str = "file",
    error: Callable[[str], Exception] = WriteError,
) -> Iterator[IO]:
    """``open(path, mode)`` for writing, atomically (`atomic_path`); text is UTF-8."""
    with atomic_path(path, what=what, error=error) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f


def write_text(path: str | os.PathLike, text: str, *, what: str = "file", error=WriteError) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "w", what=what, error=error) as f:
        f.write(text)
    return Path(path)


def write_bytes(
    path: str | os.PathLike, data: bytes, *, what: str = "file", error=WriteError
) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb", what=what, error=error) as f:
        f.write(data)
    return Path(path)


# Folders and their digests ------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` but the manifest, as sorted POSIX paths relative to it."""
    found = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(name for name in found if name != MANIFEST)


@contextlib.contextmanager
def staged_folder(
    out: str | os.PathLike, *, what: str = "folder", error: Callable[[str], Exception] = WriteError
) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write a folder of files into. When the block ends,
    ``SHA256SUMS`` is added, each file is synced and moved into ``out`` (made if need be), the
    manifest last; files that an earlier export there listed and this one does not write are
    removed, any other file is left alone. A failure raises ``error`` naming ``out`` and leaves
    ``out`` as it was; the temporary folder is always removed."""
    out = Path(out)
    block = blocking_file(out)
    if block is not None:
        where = "is a file" if block == out else f"is inside {block}, a file"
        raise error(f"cannot write {what} {out}: it {where}; give a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.resolve().name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise error(_failure(what, out, write_cause(exc) or str(exc), False)) from None
    try:
        yield stage
        names = _files(stage)
        lines = "".join(f"{sha256_file(stage / name)}  {name}\n" for name in names)
        (stage / MANIFEST).write_text(lines, encoding="utf-8")
        mode = 0o666 & ~_umask()  # as the user's other files (safetensors writes 0600)
        for name in [*names, MANIFEST]:
            _fsync(stage / name)
            os.chmod(stage / name, mode)
        try:
            earlier = set(read_manifest(out) or ()) - set(names)
        except ValueError:  # a damaged manifest: its list of files is not to be trusted
            earlier = set()
        for name in names:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, out / name)
        for name in sorted(earlier):  # an earlier export's files that this one does not write
            (out / name).unlink(missing_ok=True)
            if (out / name).parent != out:
                with contextlib.suppress(OSError):  # not empty: other files are there
                    (out / name).parent.rmdir()
        os.replace(stage / MANIFEST, out / MANIFEST)  # last: a folder with it is complete
    except BaseException as exc:
        cause = _cause(exc)
        if cause is None:
            raise
        raise error(f"cannot write {what} {out}: {cause}; {out} is as it was") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def read_manifest(folder: str | os.PathLike) -> dict[str, str] | None:
    """File name -> sha256 from ``folder/SHA256SUMS``; None when there is none. A malformed line,
    or a name outside the folder, raises ValueError naming it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    digests = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file of digests") from None
    for number, line in enumerate(lines, 1):
        found = _MANIFEST_LINE.fullmatch(line)
        name = found.group(2) if found else ""
        if not found or name.startswith("/") or ".." in Path(name).parts:
            raise ValueError(f"{path}:{number}: not a line '<sha256>  <file in the folder>'")
        digests[name] = found.group(1)
    return digests


def check_manifest(folder: str | os.PathLike, *, skip: Iterable[str] = ()) -> int | None:
    """Check every file ``SHA256SUMS`` lists (but ``skip``); the number checked, None without a
    manifest. A missing file or a digest that differs raises ValueError naming the file."""
    folder = Path(folder)
    digests = read_manifest(folder)
    if digests is None:
        return None
    skipped = set(skip)
    checked = 0
    for name, digest in digests.items():
        if name in skipped:
            continue
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path} is missing: {MANIFEST} lists it")
        if sha256_file(path) != digest:
            raise ValueError(
                f"{path} is damaged or was changed: its sha256 differs from the one in {MANIFEST}"
            )
        checked += 1
    return checked
