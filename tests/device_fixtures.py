"""The devices the slow tests run files on: the emulated ARM root and an sshd on 127.0.0.1.

Each is built or started here when the machine allows it (root, Debian's tools), and a
test skips, saying why, only where it cannot be: CI runs as root and builds both.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mobilevit_deploy.device import arm64

REPO = Path(__file__).resolve().parents[1]
# From nothing: apt-get, debootstrap and pip's wheels under emulation take about 5 minutes.
BUILD_TIMEOUT_S = 1200


@pytest.fixture(scope="session")
def arm64_device() -> str:
    """`arm64`, built by `make arm-device` if it is not yet."""
    if os.geteuid() != 0:
        pytest.skip("the emulated ARM device needs root (debootstrap, binfmt_misc, chroot)")
    try:
        arm64.command("arm64")
    except Exception:
        done = subprocess.run(
            [str(REPO / "scripts" / "arm_device.sh")],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            pytest.skip(f"the emulated ARM device could not be built: {tail}")
    return "arm64"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ssh_device(tmp_path_factory) -> str:
    """A device reached by ssh: Debian's sshd on 127.0.0.1 at a free port, with a key
    made here, serving this machine's Python (which has numpy and the runtimes)."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists() or os.geteuid() != 0:
        pytest.skip("no sshd to start (apt-get install openssh-server, as root)")
    home = tmp_path_factory.mktemp("sshd")
    for key in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / key)], check=True
        )
    (home / "authorized_keys").write_text((home / "client.pub").read_text())
    port = _free_port()
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home / 'host'}\n"
        f"AuthorizedKeysFile {home / 'authorized_keys'}\nPidFile {home / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n"
        "StrictModes no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation directory
    server = subprocess.Popen(
        [sshd, "-D", "-e", "-f", str(home / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    yield (
        f"ssh -p {port} -i {home / 'client'} -o StrictHostKeyChecking=no "
        f"-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR "
        f"root@127.0.0.1 {sys.executable}"
    )
    server.terminate()
    server.wait(timeout=10)
