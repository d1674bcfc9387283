"""One Python on a device, started by the device's command and spoken to over its pipes.

The command is what a user types to get a Python there (`python3`, `ssh pi@host
python3`); mvd adds `-u -i`, which every shell passes through untouched. Interactive
mode runs stdin a statement at a time, so a one-line bootstrap can print a handshake and
then read the runner's source, while a plain `python3` would wait for the end of stdin
before running anything. After the handshake the runner (remote_runner.py) owns the
pipes: JSON lines, each followed by the bytes it announces.
"""

from __future__ import annotations

import collections
import io
import json
import select
import subprocess
import threading
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable

READY = b"MVD-DEVICE-READY"
# `_=` keeps the REPL from echoing os.write's return value onto the protocol's stdout.
BOOTSTRAP = (
    "import sys,os;_=os.write(1,b'" + READY.decode() + "\\n');"
    "exec(compile(sys.stdin.buffer.read(int(sys.stdin.buffer.readline())),"
    "'mvd_remote_runner','exec'))\n"
)
REPL_BANNER = ("Python 3.", 'Type "help", "copyright"')
RUNNER_SOURCE = Path(__file__).with_name("remote_runner.py")
# A Python under qemu-user or behind ssh can take this long to start and print the
# handshake; beyond it the command is taken to be wrong rather than slow.
START_TIMEOUT_S = 180


class DeviceLost(BackendUnavailable):
    """The device's Python exited or broke the protocol mid-run (exit code 3)."""


class Session:
    """The device's Python, kept running so a file is sent once and many runs follow."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        try:
            self.process = subprocess.Popen(
                [*argv, "-u", "-i"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise BackendUnavailable(f"device {name!r}: cannot start {argv[0]}: {exc}") from exc
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self._write(BOOTSTRAP.encode())
        self._await_handshake()
        source = RUNNER_SOURCE.read_bytes()
        self._write(b"%d\n" % len(source) + source)
        self.facts = self.request({"op": "facts"})[0]["facts"]
        if not self.facts["versions"].get("numpy"):
            self.close()
            raise BackendUnavailable(f"device {name!r} has no numpy: pip install numpy there")

    def _drain_stderr(self) -> None:
        for line in self.process.stderr:
            text = line.decode(errors="replace").strip().removeprefix(">>> ").strip()
            if text and text != ">>>" and not text.startswith(REPL_BANNER):
                self._stderr.append(text)

    def _await_handshake(self) -> None:
        """Skips whatever the command prints first (a login banner) up to the handshake."""
        stdout = self.process.stdout
        while True:
            ready, _, _ = select.select([stdout], [], [], START_TIMEOUT_S)
            if not ready:
                self.close()
                raise DeviceLost(
                    f"device {self.name!r}: no Python answered within {START_TIMEOUT_S} s"
                )
            line = stdout.readline()
            if not line:
                raise self._lost("exited before it started")
            if line.strip() == READY:
                return

    def _lost(self, what: str) -> DeviceLost:
        code = self.process.poll()
        if code is None:
            self.process.kill()
            code = self.process.wait()
        status = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        detail = f": {self._stderr[-1]}" if self._stderr else ""
        return DeviceLost(f"device {self.name!r} {what} ({status}){detail}")

    def _write(self, data: bytes) -> None:
        try:
            self.process.stdin.write(data)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise self._lost("stopped taking input") from exc

    def request(
        self, header: dict, payload: bytes = b"", arrays: tuple[np.ndarray, ...] = ()
    ) -> tuple[dict, list[np.ndarray]]:
        """Sends one message and reads its answer: the header and the arrays it carries."""
        blobs = []
        for a in arrays:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(a), allow_pickle=False)
            blobs.append(buffer.getvalue())
        header = {**header, "arrays": [len(b) for b in blobs]}
        header["nbytes"] = len(payload) + sum(header["arrays"])
        self._write(json.dumps(header).encode() + b"\n" + payload + b"".join(blobs))
        line = self.process.stdout.readline()
        if not line:
            raise self._lost("died mid-run")
        try:
            answer = json.loads(line)
        except ValueError as exc:
            raise self._lost(f"broke the protocol ({line[:80]!r})") from exc
        outs = []
        for n in answer.get("arrays", []):
            data = self.process.stdout.read(n)
            if len(data) != n:
                raise self._lost("died mid-answer")
            outs.append(np.load(io.BytesIO(data), allow_pickle=False))
        return answer, outs

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(b'{"op": "bye"}\n')
                self.process.stdin.close()
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
