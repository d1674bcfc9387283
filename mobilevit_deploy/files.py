"""Writing outputs so that a failure leaves nothing behind.

Every artifact is written under a temporary name in its final directory and renamed
into place only once complete and checked: a crash, an exception or a failed check
never leaves a partial file where a user (or a CI cache) would pick it up.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import BadInput


def ensure_writable_dir(directory: Path) -> Path:
    """Create `directory` if needed; a clear BadInput if it cannot be written."""
    blocking = next((p for p in (directory, *directory.parents) if p.is_file()), None)
    if blocking is not None:
        raise BadInput(f"cannot write into {directory}: {blocking} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create output directory {directory}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise BadInput(f"output directory {directory} is not writable")
    return directory


def check_output_file(path: Path | None) -> None:
    """Fail before minutes of work, not after, when `path` cannot be written.

    None and "-" (stdout) pass. Creates the missing parent directories.
    """
    if path is None or str(path) == "-":
        return
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path} is a directory; give a file name")
    ensure_writable_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` on success only."""
    ensure_writable_dir(final.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise BadInput(f"no space left on the device writing {final}") from None
            raise
        if tmp.is_file():  # mkstemp makes 0600 files; artifacts get the usual umask mode
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, data: object) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path
