"""Files that survive a crash or a power cut: atomic replacement, fsync, directory swaps, consistent reads,
content hashes.

The rules every on-disk format of edge-asd follows: a file or directory is written beside its final
name, fsynced, and renamed over it, then the parent directory is fsynced, so a reader (or a reboot)
sees the old version or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from edge_agent.errors import BankError

T = TypeVar("T")
_READ_ATTEMPTS = 5


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to a new file `path` (parents created) and fsync it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], mode: int | None = None, sync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block ends normally it replaces `path`.

    mode: the new file's permissions (default: those of the file it replaces, else 0o644). sync: fsync
    the file before and the directory after the rename (off only for files that are cheap to redo).
    If the block raises, the temporary file is removed and `path` is untouched.
    """
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is None:
            mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
        os.chmod(tmp, mode)
        if sync:
            fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_path(target.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int | None = None, sync: bool = True) -> None:
    """Replace the file `path` by `data` in one step (see `replacing`)."""
    with replacing(path, mode=mode, sync=sync) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def replacing_directory(dest: Path) -> Iterator[Path]:
    """Yield an empty hidden directory beside `dest` to build its replacement in; when the block ends
    normally it is fsynced and swapped in for `dest` in one step, else it is removed and `dest` untouched.
    Files and subdirectories written inside must be fsynced by the writer (`write_synced`)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        fsync_path(tmp)
        swap_directory_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_directory_into_place(new: Path, dest: Path) -> None:
    """Replace directory `dest` by the fully written and fsynced directory `new` (same parent) in one step
    where the kernel offers RENAME_EXCHANGE (two renames elsewhere). `new` is gone afterwards."""
    if not dest.exists():
        os.rename(new, dest)
    elif _exchange(new, dest):
        shutil.rmtree(new)  # `new` now holds the old directory
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rename(dest, old / "previous")
        try:
            os.rename(new, dest)
        except OSError:
            os.rename(old / "previous", dest)
            raise
        shutil.rmtree(old)
    fsync_path(dest.parent)


def read_directory_consistently(path: Path, read: Callable[[int], T], what: str) -> T:
    """Call read(fd) on the directory `path` opened as fd; if a swap replaced the directory while it was
    read (read raised BankError and `path` now names another directory), read the new one again."""
    for attempt in range(_READ_ATTEMPTS):
        last = attempt + 1 == _READ_ATTEMPTS
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            if not last and _swap_in_progress(path):
                time.sleep(0.05)
                continue
            raise BankError(f"{path}: no {what} there (directory missing)") from None
        except NotADirectoryError:
            raise BankError(f"{path}: not a directory") from None
        except OSError as exc:
            raise BankError(f"{path}: cannot open the {what}: {exc.strerror}") from None
        try:
            return read(fd)
        except BankError:
            if not last and _replaced(path, fd):
                continue
            raise
        finally:
            os.close(fd)
    raise BankError(f"{path}: changed on every read attempt")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replaced(path: Path, fd: int) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return True
    then = os.fstat(fd)
    return (now.st_ino, now.st_dev) != (then.st_ino, then.st_dev)


def _swap_in_progress(path: Path) -> bool:
    """A swap without atomic exchange has moved the old directory aside and not yet renamed the new one in."""
    return any(path.parent.glob(f".{glob.escape(path.name)}.old-*"))
