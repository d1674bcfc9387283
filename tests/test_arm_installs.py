"""Which extras install on ARM: pip's resolver asked for aarch64 Linux and macOS arm64
wheels of the pinned stack (constraints.txt), not a guess. `--platform` picks the wheel
tags but pip still evaluates environment markers for this machine (torch's CUDA wheels
for Linux would be asked of macOS), so pip runs with the target's marker environment.
Slow: it reads PyPI's index (about 20 s a resolution)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tomllib

from mobilevit_deploy.platforms import ARM_INSTALLS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# A wheel built for an older glibc or macOS runs on a newer one; pip's --platform does not
# widen the tags itself. glibc 2.17 (manylinux2014) to 2.36 (Debian 12, Raspberry Pi OS);
# macOS 11, the first on Apple silicon, to 14.
PLATFORMS = {
    "linux-aarch64": [f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)]
    + ["manylinux2014_aarch64", "linux_aarch64"],
    "macos-arm64": [
        f"macosx_{major}_0_{arch}" for major in range(11, 15) for arch in ("arm64", "universal2")
    ],
}


def _requirements(extra: str | None) -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + (
        project["optional-dependencies"][extra] if extra else []
    )


# The project's own tooling (tests, docs site) and the umbrella extra: not what a user
# installs on a phone's build machine or a board; some of it is sdist-only, which
# --only-binary refuses.
DEVELOPERS_EXTRAS = ("dev", "docs", "all")
# pip, with the environment markers of the platform named in argv[1].
_PIP_FOR = """
import runpy, sys
from pip._vendor.packaging import markers
env = dict(markers.default_environment(), **MARKERS[sys.argv.pop(1)])
markers.default_environment = lambda: dict(env)
sys.argv[0] = "pip"
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""
MARKERS = {
    "linux-aarch64": {
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "aarch64",
    },
    "macos-arm64": {
        "sys_platform": "darwin",
        "platform_system": "Darwin",
        "platform_machine": "arm64",
    },
}


# Pure-Python dependencies published only as source, which --only-binary refuses (pip
# takes no source with --platform): built into wheels here, as any platform would.
SOURCE_ONLY = ("antlr4-python3-runtime",)


@functools.cache
def _source_only_wheels() -> str:
    folder = tempfile.mkdtemp(prefix="mvd-source-only-")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", folder]
    constraints = ["-c", str(REPO / "constraints.txt")]
    subprocess.run([*pip_wheel, *constraints, *SOURCE_ONLY], check=True, timeout=600)
    return folder


def resolves(platform: str, requirements: list[str]) -> tuple[bool, str]:
    tags = [arg for tag in PLATFORMS[platform] for arg in ("--platform", tag)]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"MARKERS = {MARKERS!r}" + _PIP_FOR,
            platform,
            "install",
            "--find-links",
            _source_only_wheels(),
            "--dry-run",
            "--ignore-installed",
            "-q",
            "--only-binary=:all:",
            *tags,
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "-c",
            str(REPO / "constraints.txt"),
            "--report",
            "-",
            *requirements,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode == 0:
        return True, f"{len(json.loads(done.stdout)['install'])} wheels"
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    return False, errors[0] if errors else done.stderr.strip()[-200:]


@pytest.mark.parametrize("platform", sorted(ARM_INSTALLS))
def test_every_extra_doctor_does_not_name_installs(platform):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [
        e
        for e in project["optional-dependencies"]
        if e not in ARM_INSTALLS[platform] and e not in DEVELOPERS_EXTRAS
    ]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    ok, detail = resolves(platform, requirements)
    assert ok, f"{platform}, base + {', '.join(extras)}: {detail}"


@pytest.mark.parametrize(
    "platform, extra", [(p, e) for p, missing in ARM_INSTALLS.items() for e in missing]
)
def test_every_extra_doctor_names_does_not_install(platform, extra):
    ok, detail = resolves(platform, _requirements(extra))
    assert not ok, f"{platform} [{extra}] resolves ({detail}): doctor should not name it"
