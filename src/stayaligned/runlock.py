"""One writer per run directory: an advisory lock file held by train, align, eval and study.

The lock is `fcntl.flock` on ``<dir>/.stayaligned.lock``, which holds the writer's PID. The
kernel drops the lock when its process dies (even by SIGKILL), so a lock file left behind by a
dead process is simply taken over; a live holder makes the second process stop at once with
an error naming the holder's PID. On systems without fcntl (Windows) no lock is taken.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from stayaligned.config import ConfigError

LOCK_NAME = ".stayaligned.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class LockedError(ConfigError):
    """Another live process is writing to the same run directory."""


def writable_dir(path: Path, key: str = "output_dir") -> Path:
    """Create `path` if needed; a one-line `ConfigError` if it is a file or not writable."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{key}={path}: {parent} is a file, not a directory; choose "
                                  "another output_dir")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{key}={path}: cannot create it ({err.strerror}); choose a "
                          "writable output_dir") from None
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{key}={path} is not writable ({err.strerror}); fix its permissions "
                          "or choose another output_dir") from None
    return path


@contextmanager
def run_lock(directory: Path, key: str = "output_dir"):
    """Hold the lock of `directory` (created if missing) for the `with` block."""
    directory = writable_dir(Path(directory), key)
    if fcntl is None:
        yield directory
        return
    path = directory / LOCK_NAME
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise LockedError(
                f"{directory} is in use by another stayaligned process (PID {holder}); wait for "
                "it to finish, stop it, or choose another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield directory
    finally:
        handle.close()  # closing the descriptor releases the lock


def holder(directory: Path) -> int | None:
    """The PID a live process holding the lock of `directory` wrote, None when it is free (or
    without fcntl)."""
    path = Path(directory) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read().strip()
            return int(text) if text.isdigit() else None
    return None  # taken and released at once: nobody holds it


def clear_dir(directory: Path) -> None:
    """Delete everything in `directory` except its lock file (used by --overwrite)."""
    import shutil

    for child in Path(directory).iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


@contextmanager
def file_mutex(path: Path):
    """Wait for an exclusive lock on the file `path` for the `with` block: serialises a
    read-modify-write of a small shared file (a study's progress.json) between processes."""
    if fcntl is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        yield

