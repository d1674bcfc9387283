"""Helpers for the tests that run `mvd` in process through typer's CliRunner.

typer's CliRunner keeps stdout and stderr apart (`result.stdout`, `result.stderr`;
`result.output` is both interleaved), so `--json` output must parse from stdout
alone while errors and progress go to stderr.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
from typer.testing import CliRunner

from mobilevit_deploy.cli import app

SMALL = ["--image-size", "64"]  # a valid FastViT size (multiple of 32) that exports fast
VERIFY_SMALL = ["verify", "fastvit_t8", *SMALL, "--num-images", "2"]

runner = CliRunner()


def mvd(*args: object):
    """Run `mvd ARGS`; exceptions other than SystemExit surface as test errors."""
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def ok(*args: object):
    result = mvd(*args)
    assert result.exit_code == 0, f"mvd {args} -> {result.exit_code}\n{result.output}"
    return result


def json_out(*args: object):
    """Parse stdout as JSON: nothing else (progress, warnings) may go there."""
    return json.loads(ok(*args).stdout)


def assert_user_error(result, *fragments: str, code: int = 2) -> str:
    """Exit `code`, one `error:` line on stderr naming `fragments`, no traceback."""
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}"
    assert isinstance(result.exception, SystemExit)  # handled, not a crash
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("error: "), result.output
    assert "\n" not in message, f"not one line:\n{message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from {message!r}"
    assert result.stdout == ""
    return message


def onnx_ops(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text())


def no_partial_files(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if p.name.endswith(".partial")]
