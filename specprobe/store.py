"""Where specprobe keeps what it measures and learns on disk, and how it writes it.

`cache_root()` is `$SPECPROBE_CACHE` (default `~/.cache/specprobe`): converted models, kernel
timings, cost curves, downloaded question files. Every file specprobe writes goes through
`atomic_write`: the bytes go to a temporary file in the same folder, are flushed to disk, and
replace the old file in one `os.replace`, under a file lock, so a reader (or a process killed
mid-write) sees the old file or the new one, never a mixture, and two writers never interleave.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


def file_name(key: str) -> str:
    """`key` as a file name: letters, digits and `-._` kept, anything else `_`.

    >>> file_name("c3-llama-30x576-torch.float32-cpu/t2")
    'c3-llama-30x576-torch.float32-cpu_t2'
    """
    return "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in key)


def cache_root() -> Path:
    return Path(os.environ.get("SPECPROBE_CACHE", Path.home() / ".cache" / "specprobe"))


@contextmanager
def locked(path: str | Path, timeout: float = 600.0):
    """Hold `<path>.lock` (an advisory lock shared by every specprobe process) inside the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=timeout):
        yield


def atomic_write(path: str | Path, data: bytes | str, lock: bool = True) -> None:
    """Write `data` to `path` atomically (temporary file in the same folder, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data

    def write() -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp's 0600 is not what a user expects
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    if lock:
        with locked(path):
            write()
    else:
        write()


def save_torch(obj, path: str | Path) -> None:
    """`torch.save` through `atomic_write`."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def save_figure(fig, path: str | Path, **options) -> None:
    """A matplotlib figure saved as PNG through `atomic_write`."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **options)
    atomic_write(path, buffer.getvalue())
