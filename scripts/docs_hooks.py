"""mkdocs hooks: pages that are generated at build time, never written by hand.

- `cli.md`, the CLI reference, is walked out of the typer app (`mobilevit_deploy.cli.app`)
  on every build, so a flag added, renamed or removed shows up without anyone editing a
  page, and a page cannot describe a flag that no longer exists.
- `benchmarks/*.md` (and the plots) are the dated measurement records that the
  benchmark scripts write at the repository's root; the site shows them as they are,
  so a page links one as `benchmarks/NAME.md` (those not in the nav are still built).
"""

from __future__ import annotations

import re
from pathlib import Path

import typer
import typer.core

ROOT = Path(__file__).resolve().parents[1]
TYPE_NAMES = {str: "text", int: "integer", float: "number", Path: "path"}


def click_command():
    """The command group typer builds from the app: the one `mvd` runs (typer's own click)."""
    from mobilevit_deploy.cli import app

    return typer.main.get_command(app)


def is_argument(param) -> bool:
    return isinstance(param, typer.core.TyperArgument)


def _cell(text: object) -> str:
    """One Markdown table cell: no newlines, no bare pipes, rich markup removed."""
    text = re.sub(r"\[/?[a-z ]+\]", "", str(text))
    text = " ".join(text.split()).replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _type_name(param) -> str:
    kind = param.type_descriptor.annotation
    if kind is bool:
        return "flag"
    return TYPE_NAMES.get(kind, getattr(kind, "__name__", str(kind)))


def _default(param) -> str:
    value = param.default
    if param.type_descriptor.annotation is bool or value in (None, (), "") or callable(value):
        return ""
    return f"`{value}`"


def _metavar(argument) -> str:
    return argument.name.upper() + ("..." if argument.nargs == -1 else "")


def _names(param) -> str:
    if is_argument(param):
        return f"`{_metavar(param)}`"
    return ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])


def _argument_row(param) -> tuple[str, ...]:
    return _names(param), _type_name(param), "yes" if param.required else "no"


def _option_row(param) -> tuple[str, ...]:
    return _names(param), _type_name(param), _default(param), _cell(param.help or "")


def command_markdown(name: str, command) -> str:
    """One command's section: its help, usage, arguments and options."""
    arguments = [p for p in command.params if is_argument(p)]
    options = [p for p in command.params if not is_argument(p) and not p.hidden]
    usage = " ".join(["mvd", name, *map(_metavar, arguments), "[OPTIONS]"])
    help_text = " ".join((command.help or "").split())
    lines = [f"## mvd {name}", "", help_text, "", "```", usage, "```", ""]
    tables = (
        (("argument", "type", "required"), arguments, _argument_row),
        (("option", "type", "default", "meaning"), options, _option_row),
    )
    for header, params, row in (t for t in tables if t[1]):
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row(p)) + " |" for p in params]
        lines.append("")
    return "\n".join(lines)


def cli_reference() -> str:
    """The whole reference page, one section per command in the app's order."""
    group = click_command()
    parts = [
        "# CLI reference",
        "",
        "Generated from the typer app (`mobilevit_deploy.cli.app`) when the site is built:",
        "what is here is what `mvd` accepts. `mvd COMMAND --help` prints the same.",
        "Exit codes: 0 ok, 1 verification failed, 2 bad input, 3 backend unavailable.",
        "",
    ]
    for name, command in group.commands.items():
        parts.append(command_markdown(name, command))
    return "\n".join(parts)


def on_files(files, config):
    """Add the generated pages to the build (mkdocs >= 1.6: File.generated)."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, "cli.md", content=cli_reference()))
    records = ROOT / "benchmarks"
    for path in sorted([*records.glob("*.md"), *records.glob("*.png")]):
        files.append(File.generated(config, f"benchmarks/{path.name}", abs_src_path=str(path)))
    return files
