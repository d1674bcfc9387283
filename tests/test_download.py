"""download(): against a local HTTP server whose misbehaviour each test chooses.

The server decides what to do from the first path segment, so one fixture covers
normal, missing, truncated, stalled and slow responses, and counts every request
so tests can prove when the network was (not) touched.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from mobilevit_deploy.download import cache_dir, download
from mobilevit_deploy.errors import BadInput

PAYLOAD = bytes(range(256)) * 1024  # 256 KiB: several read chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()
WRONG_SHA = "0" * 64


class Server:
    def __init__(self) -> None:
        self.hits: collections.Counter[str] = collections.Counter()
        self.release = threading.Event()  # set at teardown to end every stall at once
        self.lock = threading.Lock()
        self.port = 0

    def url(self, mode: str, name: str = "weights.bin") -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/{name}"

    def count(self, mode: str) -> int:
        return sum(n for path, n in self.hits.items() if path.startswith(f"/{mode}/"))


def make_handler(server: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with server.lock:
                server.hits[self.path] += 1
                hit = server.hits[self.path]
            mode = self.path.split("/")[1]
            with contextlib.suppress(OSError):  # the client gave up (timeout tests)
                self.respond(mode, hit)

        def respond(self, mode: str, hit: int) -> None:
            if mode == "missing":
                self.send_error(404)
                return
            if mode == "stall" or (mode == "stall-once" and hit == 1):
                server.release.wait(10)
                return
            if mode == "slow":
                time.sleep(0.3)
            body = PAYLOAD
            self.send_response(200)
            declared = len(body) + 1000 if mode in ("truncated", "stall-body") else len(body)
            self.send_header("Content-Length", str(declared))
            self.end_headers()
            if mode == "truncated":
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            if mode == "stall-body":
                self.wfile.write(body[:1000])
                self.wfile.flush()
                server.release.wait(10)
                return
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def server():
    state = Server()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    state.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial" in p.name)


def test_downloads_and_checks_sha256(server, tmp_path):
    path = download(server.url("ok"), sha256=SHA, dest_dir=tmp_path, progress=False)
    assert path == tmp_path / "weights.bin"
    assert path.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == []


def test_second_call_does_not_touch_the_network(server, tmp_path):
    first = download(server.url("ok"), sha256=SHA, dest_dir=tmp_path, progress=False)
    second = download(server.url("ok"), sha256=SHA, dest_dir=tmp_path, progress=False)
    third = download(
        server.url("ok"), dest_dir=tmp_path, progress=False
    )  # no sha: exists is enough
    assert first == second == third
    assert server.count("ok") == 1


def test_cached_file_with_wrong_bytes_is_replaced(server, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"tampered")
    path = download(server.url("ok"), sha256=SHA, dest_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.count("ok") == 1


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    with pytest.raises(BadInput) as info:
        download(server.url("ok"), sha256=WRONG_SHA, dest_dir=tmp_path, progress=False)
    message = str(info.value)
    assert "checksum mismatch" in message
    assert server.url("ok") in message
    assert WRONG_SHA[:12] in message and SHA[:12] in message
    assert not (tmp_path / "weights.bin").exists()
    assert leftovers(tmp_path) == []
    assert server.count("ok") == 1  # a wrong checksum is not retried


def test_http_404_names_status_and_url(server, tmp_path):
    with pytest.raises(BadInput, match="HTTP 404") as info:
        download(server.url("missing"), dest_dir=tmp_path, progress=False, retries=3)
    assert server.url("missing") in str(info.value)
    assert not (tmp_path / "weights.bin").exists()
    assert server.count("missing") == 1  # HTTP errors are final


def test_truncated_body_is_retried_then_rejected(server, tmp_path):
    with pytest.raises(BadInput, match="truncated") as info:
        download(server.url("truncated"), dest_dir=tmp_path, progress=False, retries=1)
    assert f"of {len(PAYLOAD) + 1000} bytes" in str(info.value)
    assert "2 attempts" in str(info.value)
    assert server.count("truncated") == 2
    assert not (tmp_path / "weights.bin").exists()
    assert leftovers(tmp_path) == []


def test_stall_then_ok_succeeds_on_retry(server, tmp_path):
    url = server.url("stall-once")
    path = download(url, sha256=SHA, dest_dir=tmp_path, progress=False, timeout=0.5, retries=1)
    assert path.read_bytes() == PAYLOAD
    assert server.count("stall-once") == 2
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", ["stall", "stall-body"])
def test_always_stalling_server_times_out_in_bounded_time(server, tmp_path, mode):
    start = time.monotonic()
    with pytest.raises(BadInput, match=r"timeout after 0\.5 s and 2 attempts") as info:
        download(server.url(mode), dest_dir=tmp_path, progress=False, timeout=0.5, retries=1)
    assert time.monotonic() - start < 3.0
    assert server.url(mode) in str(info.value)
    assert server.count(mode) == 2
    assert not (tmp_path / "weights.bin").exists()
    assert leftovers(tmp_path) == []


def test_unreachable_host_is_reported(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x/weights.bin"
    with pytest.raises(BadInput, match="unreachable") as info:
        download(url, dest_dir=tmp_path, progress=False, timeout=2, retries=0)
    assert url in str(info.value) and "1 attempt)" in str(info.value)


@pytest.mark.parametrize(
    "url", ["ftp://example.com/w.bin", "file:///etc/passwd", "https://example.com/dir/"]
)
def test_unusable_urls_are_bad_input(tmp_path, url):
    with pytest.raises(BadInput) as info:
        download(url, dest_dir=tmp_path, progress=False)
    assert url in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_malformed_sha256_is_rejected_before_any_request(server, tmp_path):
    with pytest.raises(BadInput, match="not a sha256 hex digest"):
        download(server.url("ok"), sha256="abc123", dest_dir=tmp_path, progress=False)
    assert server.count("ok") == 0


def test_partials_left_by_a_crashed_run_are_cleaned_up(server, tmp_path):
    (tmp_path / "weights.bin.partial-99999-deadbeef").write_bytes(b"half")
    path = download(server.url("ok"), sha256=SHA.upper(), dest_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == []


def test_concurrent_downloads_fetch_once(server, tmp_path):
    barrier = threading.Barrier(4)
    results: list[Path] = []

    def fetch() -> None:
        barrier.wait()
        results.append(download(server.url("slow"), sha256=SHA, dest_dir=tmp_path, progress=False))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [tmp_path / "weights.bin"] * 4
    assert (tmp_path / "weights.bin").read_bytes() == PAYLOAD
    assert server.count("slow") == 1  # the others waited on the lock, then found the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin", "weights.bin.lock"]


def test_progress_bar_goes_to_stderr(server, tmp_path, capsys):
    path = download(server.url("ok", "bar.bin"), dest_dir=tmp_path, progress=True)
    assert path.read_bytes() == PAYLOAD
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "bar.bin" in captured.err


def test_default_destination_is_the_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MVD_CACHE_DIR", str(tmp_path / "cache"))
    path = download(server.url("ok"), progress=False)
    assert path == tmp_path / "cache" / "weights.bin"
    assert path.read_bytes() == PAYLOAD


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("MVD_CACHE_DIR", str(tmp_path / "mvd"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mvd"
    monkeypatch.delenv("MVD_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "mobilevit_deploy"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "mobilevit_deploy"
