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
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput

# Held while an artifact and its sidecar move into place (atomic_artifact).
_HELD = (signal.SIGINT, signal.SIGTERM)


def ensure_writable_dir(directory: Path, target: Path | None = None) -> Path:
    """Create `directory` if needed; a clear BadInput naming `target` (the file to be
    written there, else the directory) if it cannot be written.

    os.access only reads permission bits, and root passes them everywhere: /proc and
    /sys say yes, then refuse the file. So a probe file is created and removed too.
    """
    blocking = next((p for p in (directory, *directory.parents) if p.is_file()), None)
    if blocking is not None:
        raise BadInput(f"cannot write into {directory}: {blocking} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create output directory {directory}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise BadInput(f"output directory {directory} is not writable")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mvd-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BadInput(f"cannot write {target or directory}: {_reason(exc)}") from None
    return directory


def _reason(exc: OSError) -> str:
    """The system's words for an OSError, without the path it repeats."""
    return exc.strerror or str(exc)


def check_output_file(path: Path | None, package: bool = False) -> None:
    """Fail before minutes of work, not after, when `path` cannot be written.

    None and "-" (stdout) pass. Creates the missing parent directories. A `package`
    (an .mlpackage is a directory) may replace an existing package, nothing else.
    """
    if path is None or str(path) == "-":
        return
    path = Path(path)
    if path.is_dir() and not (package and (path / "Manifest.json").is_file()):
        raise BadInput(f"{path} is a directory; give a file name")
    if package and path.is_file():
        raise BadInput(f"{path} exists and is a file; a package is a directory")
    ensure_writable_dir(path.parent, path)


def resolve_artifact_path(
    output: str | Path | None, stem: str, suffix: str, other_suffixes: dict[str, str]
) -> tuple[Path, str | None]:
    """Where an export writes, and a note when that is not literally what was given.

    None: `<stem><suffix>` here. An existing directory (not a package), or a path
    written with a trailing `/`: `DIR/<stem><suffix>` inside it. A name without the
    format's suffix gets it appended, and the note says so (an app or a runtime that
    picks the loader by suffix would otherwise refuse the file); a name carrying another
    format's suffix (`m.tflite` for ONNX) is a mistake and refused. `other_suffixes`
    maps suffix -> format name.
    """
    if output is None:
        return Path(f"{stem}{suffix}"), None
    text = str(output)
    if not text.strip():
        raise BadInput(
            f"-o/--output is empty; give a file name or a folder (default: {stem}{suffix})"
        )
    path = Path(text)
    # A name with the artifact's suffix (x.mlpackage, x.mlpackage/ as a shell completes
    # it) is the artifact's place, not a folder to write into: check_output_file
    # replaces a package there, or refuses anything else.
    if path.suffix == suffix:
        return path, None
    if text.endswith(("/", os.sep)) or path.is_dir():
        return path / f"{stem}{suffix}", None
    if path.suffix in other_suffixes:
        raise BadInput(
            f"{path} has the suffix of {other_suffixes[path.suffix]} files; this export "
            f"writes {suffix} (give -o {path.with_suffix(suffix)}, or the matching --format)"
        )
    final = path.with_name(path.name + suffix)
    return final, f"writing {final}: added the {suffix} suffix to {path}"


def artifact_size(path: Path) -> int:
    """Bytes of a file, or of every file in a package directory (.mlpackage)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _disk_full_is_bad_input(final: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BadInput(f"no space left on the device writing {final}") from None
        raise


@contextlib.contextmanager
def _temp_is_bad_input(final: Path) -> Iterator[None]:
    """A directory that refuses the temporary name (changed since it was checked, or a
    caller that did not check) refuses `final`: one line, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise BadInput(f"cannot write {final}: {_reason(exc)}") from None


def _temp_beside(final: Path) -> Path:
    """An empty hidden file in `final`'s directory (a rename there is atomic)."""
    with _temp_is_bad_input(final):
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` on success only."""
    ensure_writable_dir(final.parent, final)
    tmp = _temp_beside(final)
    try:
        with _disk_full_is_bad_input(final):
            yield tmp
        if tmp.is_file():  # mkstemp makes 0600 files; artifacts get the usual umask mode
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """atomic_path for a directory artifact (.mlpackage): build it under a temporary
    name beside `final`; on success swap it in, so readers never see half a package."""
    ensure_writable_dir(final.parent, final)
    with _temp_is_bad_input(final):
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    tmp, old = work / final.name, work / f"old{final.suffix}"
    try:
        with _disk_full_is_bad_input(final):
            yield tmp
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_json_atomic(path: Path, data: object) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(_json_text(data))
    return path


def _json_text(data: object) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def sidecar_path(artifact: Path) -> Path:
    """The metadata JSON beside an artifact: `model.onnx` -> `model.onnx.json`."""
    return artifact.with_name(artifact.name + ".json")


@dataclass
class Staged:
    """An artifact being written: the body writes `path` and sets `record`."""

    path: Path
    record: dict | None = None


@contextlib.contextmanager
def atomic_artifact(final: Path, package: bool = False) -> Iterator[Staged]:
    """atomic_path (atomic_dir for a `package`) for an artifact and its sidecar together.

    The runtimes read the sidecar first (the input layout, the output names), so a new
    file beside the previous export's sidecar would be fed and read wrongly. Both are
    complete on disk before either is renamed; the old sidecar goes, then the artifact
    and the new sidecar move into place with SIGINT and SIGTERM held, so an interrupt
    leaves the old pair or the new one. A crash between the renames leaves the
    artifact without its sidecar (its record is embedded too), never beside another's.
    """
    sidecar = sidecar_path(final)
    side_tmp: Path | None = None
    with contextlib.ExitStack() as held:
        try:
            with (atomic_dir if package else atomic_path)(final) as tmp:
                staged = Staged(tmp)
                yield staged
                if staged.record is None:
                    raise ValueError(f"{final.name}: the exporter set no record for its sidecar")
                side_tmp = _temp_beside(sidecar)
                side_tmp.write_text(_json_text(staged.record))
                os.chmod(side_tmp, 0o666 & ~_umask())
                held.enter_context(_signals_held())
                sidecar.unlink(missing_ok=True)
            os.replace(side_tmp, sidecar)
            side_tmp = None
        finally:
            if side_tmp is not None:
                side_tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside are delivered on the way out. A handler,
    not a blocked mask: a process-directed signal goes to any thread that does not
    block it (torch's pool has several), and Python runs its handler in the main
    thread regardless. Off the main thread, where handlers cannot be set, nothing is
    held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda n, _f: caught.append(n)) for s in _HELD}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        for number in caught:
            signal.raise_signal(number)
