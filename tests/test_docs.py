"""The docs name only commands and flags that exist: every `mvd ...` line in README.md and
docs/ (console blocks, run markers and inline code) is parsed and checked against the
typer app's own parameters, so a renamed or removed flag fails here, not in a reader's
terminal. Also the generated CLI reference (scripts/docs_hooks.py) and the example
markers (scripts/docs_examples.py). Fast: nothing is exported or run."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import typer

from mobilevit_deploy.cli import app

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A command line: `mvd ...` in inline code, or a line of a code block or a run marker
# ("$ mvd ..." or a bare "mvd ...").
INLINE = re.compile(r"`(mvd [^`]*)`")
LINE = re.compile(r"^\s*(?:\$ )?(mvd(?: .*)?)$")
# What ends the mvd part of a shell line.
SHELL_BREAKS = {"|", "||", "&&", ";", ">", "2>&1", "#"}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def command_lines(text: str) -> list[str]:
    found, in_block = INLINE.findall(text), False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "<!-- run", "-->")):
            in_block = line.lstrip().startswith(("```", "<!-- run")) and not in_block
        elif in_block and (match := LINE.match(line)):
            found.append(match[1])
    return found


def flags_of(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(getattr(param, "opts", ()))
        names.update(getattr(param, "secondary_opts", ()))
    return {n for n in names if n.startswith("-")}


def problems(line: str, commands: dict) -> list[str]:
    """What in `line` the app does not have: an unknown command or flag."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return [f"cannot be parsed as a shell line: {line}"]
    for i, token in enumerate(tokens):
        if token in SHELL_BREAKS:
            tokens = tokens[:i]
            break
    if len(tokens) < 2 or tokens[1].startswith("-"):
        return [] if set(tokens[1:]) <= {"--help"} else [f"options without a command: {line}"]
    name = tokens[1]
    if name.isupper():  # a placeholder: `mvd COMMAND --help`
        return []
    if name not in commands:
        return [f"no command {name!r}: {line}"]
    known = flags_of(commands[name])
    flags = [t.split("=", 1)[0] for t in tokens[2:] if re.match(r"^--?[A-Za-z]", t)]
    return [f"{name} has no {flag}: {line}" for flag in flags if flag not in known]


def test_every_documented_command_line_uses_flags_that_exist():
    commands = typer.main.get_command(app).commands
    found, wrong = 0, []
    for page in PAGES:
        for line in command_lines(page.read_text()):
            found += 1
            wrong += [f"{page.relative_to(ROOT)}: {p}" for p in problems(line, commands)]
    assert found > 50, "the docs should show the commands"
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("mvd export fastvit_t8 --format onnx -o build/", []),
        ("mvd export fastvit_t8 --fromat onnx", ["export has no --fromat"]),
        ("mvd exprot fastvit_t8", ["no command 'exprot'"]),
        ("mvd verify fastvit_t8 --formats=onnx,tflite | head -n 3", []),
        ("mvd COMMAND --help", []),
        ("mvd --help", []),
    ],
)
def test_the_checker_finds_unknown_commands_and_flags(line, expected):
    found = problems(line, typer.main.get_command(app).commands)
    assert [p.split(":")[0] for p in found] == expected


def test_the_cli_reference_has_every_command_and_flag():
    page = _script("docs_hooks").cli_reference()
    for name, command in typer.main.get_command(app).commands.items():
        assert f"## mvd {name}\n" in page
        for flag in flags_of(command) - {"--help"}:
            assert f"`{flag}`" in page, (name, flag)


def test_example_blocks_are_filled_between_their_markers(tmp_path):
    examples = _script("docs_examples")
    page = "intro\n<!-- run\nmvd list\nmvd doctor\n-->\nstale output\n<!-- /run -->\nafter\n"
    outputs = {"mvd list": "the zoo", "mvd doctor": "the machine"}
    filled = examples.fill(page, outputs, tmp_path)
    assert filled == (
        "intro\n<!-- run\nmvd list\nmvd doctor\n-->\n```console\n$ mvd list\nthe zoo\n"
        "$ mvd doctor\nthe machine\n```\n<!-- /run -->\nafter\n"
    )
    assert examples.fill(filled, outputs, tmp_path) == filled


def _section(page: str, heading: str) -> str:
    return page.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_report_schemas_document_every_field_the_reports_have():
    """docs/reports.md names every field of the verify and eval reports (their
    dataclasses' fields are the JSON's keys), so a new field cannot go undocumented."""
    from dataclasses import fields

    from mobilevit_deploy.evaluate import CandidateResult, EvalReport
    from mobilevit_deploy.verify import PairResult, VerifyReport

    page = (ROOT / "docs" / "reports.md").read_text()
    for heading, classes in (
        ("verify", (VerifyReport, PairResult)),
        ("eval", (EvalReport, CandidateResult)),
    ):
        section = _section(page, heading)
        missing = [
            f"{cls.__name__}.{f.name}"
            for cls in classes
            for f in fields(cls)
            if f"`{f.name}`" not in section
        ]
        assert not missing, f"docs/reports.md ## {heading} lacks {missing}"
