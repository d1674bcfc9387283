"""Fetching checkpoints once, safely, into a cache shared by every run.

Checkpoints are tens of megabytes from hosts we do not control, so a download must
survive slow or flaky networks (timeouts, retries) and must never leave something
half-written or tampered with where a later run would trust it: bytes land in a
temporary file beside the final one and are renamed into place only once the length
and checksum check out. A lock file stops parallel runs (CI matrix jobs, xdist
workers) from fetching the same file twice or renaming over each other.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import os
import secrets
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from . import __version__
from .errors import BadInput
from .files import ensure_writable_dir

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent runs there may fetch twice.
    fcntl = None

_CHUNK = 1 << 16
_USER_AGENT = f"mobilevit_deploy/{__version__}"


class _Transient(Exception):
    """A failure another attempt may cure: timeout, refused connection, truncated body."""


_TIMED_OUT = "timed out"


def cache_dir() -> Path:
    """Where downloads live; overridable so CI and tests never touch a user's home."""
    if os.environ.get("MVD_CACHE_DIR"):
        return Path(os.environ["MVD_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mobilevit_deploy"


def download(
    url: str,
    *,
    sha256: str | None = None,
    dest_dir: Path | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    retries: int = 1,
) -> Path:
    """The local copy of `url`, fetched only if no valid copy is cached yet.

    `timeout` bounds each socket operation (a stalled server), not the whole transfer,
    so a large file on a slow but live link still completes. Connection errors,
    timeouts and truncated bodies are retried `retries` more times; HTTP errors and
    checksum mismatches are not, since repeating them gives the same answer.
    """
    if timeout <= 0 or retries < 0:
        raise ValueError("timeout must be > 0 and retries >= 0")
    name = _file_name(url)
    expected = _normalise_sha256(url, sha256)
    final = ensure_writable_dir(Path(dest_dir) if dest_dir is not None else cache_dir()) / name
    if _is_valid(final, expected):
        return final
    with _locked(final):
        if _is_valid(final, expected):  # another process fetched it while we waited
            return final
        attempt = 0
        while True:
            attempt += 1
            try:
                _fetch_once(url, final, expected, progress, timeout)
                return final
            except _Transient as exc:
                if attempt > retries:
                    tries = f"{attempt} attempt{'s' if attempt > 1 else ''}"
                    why = f"{exc} ({tries})"
                    if str(exc) == _TIMED_OUT:
                        why = f"timeout after {timeout:g} s and {tries}"
                    raise BadInput(f"cannot download {url}: {why}") from None


def _file_name(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadInput(f"cannot download {url}: only http:// and https:// URLs are supported")
    name = unquote(parts.path.rsplit("/", 1)[-1])
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise BadInput(f"cannot download {url}: the URL does not end in a file name")
    return name


def _normalise_sha256(url: str, sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    digest = sha256.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise BadInput(f"cannot download {url}: {sha256!r} is not a sha256 hex digest")
    return digest


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_valid(final: Path, sha256: str | None) -> bool:
    return final.is_file() and (sha256 is None or _sha256_of(final) == sha256)


@contextlib.contextmanager
def _locked(final: Path) -> Iterator[None]:
    """Hold `<final>.lock`; the lock file stays, as deleting it would race other holders."""
    if fcntl is None:
        yield
        return
    with open(final.with_name(final.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            # Every writer of this name holds the lock, so leftover partials are from crashes.
            for stale in final.parent.glob(f"{glob.escape(final.name)}.partial-*"):
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_once(url: str, final: Path, sha256: str | None, progress: bool, timeout: float) -> None:
    tmp = final.with_name(f"{final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as out:
            digest = _stream(url, out, final.name, progress, timeout)
        if sha256 is not None and digest != sha256:
            raise BadInput(
                f"cannot download {url}: checksum mismatch, expected sha256 {sha256[:12]}… "
                f"but got {digest[:12]}…"
            )
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _stream(url: str, out: BinaryIO, label: str, progress: bool, timeout: float) -> str:
    """Copy the body into `out`, return its sha256; trouble worth retrying is _Transient."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    digest, got, total = hashlib.sha256(), 0, None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with _progress_bar(progress, label, total) as advance:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    advance(len(chunk))
    except urllib.error.HTTPError as exc:
        exc.close()
        raise BadInput(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise _Transient(_TIMED_OUT) from None
        if isinstance(exc.reason, ssl.SSLError):  # a bad certificate stays bad: no retry
            raise BadInput(f"cannot download {url}: TLS error: {exc.reason}") from None
        reason = getattr(exc.reason, "strerror", None) or exc.reason
        raise _Transient(f"host {urlsplit(url).hostname} unreachable: {reason}") from None
    except http.client.IncompleteRead as exc:
        of = f" of {total}" if total is not None else ""
        raise _Transient(f"truncated download: got {got + len(exc.partial)}{of} bytes") from None
    except TimeoutError:
        raise _Transient(_TIMED_OUT) from None
    except (ConnectionError, ssl.SSLError, http.client.HTTPException) as exc:
        raise _Transient(f"connection lost after {got} bytes: {exc!r}") from None
    except OSError as exc:  # the local side: disk full, permissions
        raise BadInput(f"cannot download {url}: {exc}") from None
    if total is not None and got != total:
        raise _Transient(f"truncated download: got {got} of {total} bytes")
    return digest.hexdigest()


@contextlib.contextmanager
def _progress_bar(enabled: bool, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A bar on stderr, so progress never mixes into output a script may parse."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
