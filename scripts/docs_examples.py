"""Run the commands the docs show and write their real output into the pages.

A page marks a command (or several, one per line) like this:

    <!-- run
    mvd export fastvit_t8 --weights my_fastvit_t8.pth -o build/
    -->
    <!-- /run -->

and this script replaces whatever stands between `-->` and `<!-- /run -->` with a console
block of each command and what it printed (stdout and stderr, in order). The commands run
in build/docs-examples, where the script first makes the files the pages name: the
fine-tuned checkpoints, the labels, a hub folder and a small labelled set, all under
stress weights so that nothing is downloaded. A command that appears on several pages
runs once, so the README and the quickstart show the same run. What each command
printed is kept in build/docs-examples/outputs.json; `--reuse` fills pages from it and
runs only the commands it lacks (after editing a page's prose, or a new page).

    python scripts/docs_examples.py                 # every page (README.md, docs/**/*.md)
    python scripts/docs_examples.py docs/eval.md    # some pages
    python scripts/docs_examples.py --reuse         # run only what outputs.json lacks
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "docs-examples"
BLOCK = re.compile(r"(<!-- run\n(?P<commands>.*?)\n-->\n)(?P<body>.*?)(<!-- /run -->)", re.S)
LABELS = ("mug", "bottle", "plate", "bowl", "fork", "knife", "spoon", "cup", "pan", "lid")
HUB_LABELS = ("ok", "scratch", "dent", "stain")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def make_fixtures(work: Path) -> None:
    """The files the pages' commands name. Made once; delete build/docs-examples to redo."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from safetensors.torch import save_file
    from test_eval import CLASSES, shapes_checkpoint, write_folder
    from test_user_models import fine_tuned

    def checkpoint(path: Path, name: str, classes: int, size: int) -> dict:
        if not path.exists():
            _, model = fine_tuned(name, classes, (size, size))
            torch.save(model.state_dict(), path)
        return torch.load(path, weights_only=True)

    work.mkdir(parents=True, exist_ok=True)
    (work / "build").mkdir(exist_ok=True)
    (work / "labels.txt").write_text("\n".join(LABELS) + "\n")
    checkpoint(work / "my_fastvit_t8.pth", "fastvit_t8", len(LABELS), 256)
    checkpoint(work / "levit_128s_ft256.pth", "levit_128s", len(LABELS), 256)
    hub = work / "my-fastvit"
    if not hub.exists():
        hub.mkdir()
        state = checkpoint(work / "hub_fastvit_t8.pth", "fastvit_t8", len(HUB_LABELS), 192)
        save_file(state, str(hub / "model.safetensors"))
        config = {
            "architecture": "fastvit_t8",
            "num_classes": len(HUB_LABELS),
            "label_names": list(HUB_LABELS),
            "pretrained_cfg": {"input_size": [3, 192, 192]},
        }
        (hub / "config.json").write_text(json.dumps(config, indent=2))
    if not (work / "shapes").exists():
        write_folder(work / "shapes", per_class=20)
        write_folder(work / "two_of_three", per_class=2, kinds=CLASSES[:2])
    if not (work / "shapes_fastvit_t8.pth").exists():
        shapes_checkpoint(work / "shapes_fastvit_t8.pth")


def run(command: str, work: Path) -> str:
    """What `command` prints, as a reader's terminal would show it (120 columns)."""
    if not (work / "labels.txt").exists():
        make_fixtures(work)
    # `mvd` from the environment running this script (make docs-examples: .venv's).
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "COLUMNS": "120", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    started = time.monotonic()
    done = subprocess.run(
        command,
        shell=True,
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    print(f"  exit {done.returncode} in {time.monotonic() - started:.0f} s: {command}")
    # A spinner on a pipe leaves blank lines, not text: the first line is the first word.
    return done.stdout.strip("\n")


def fill(text: str, outputs: dict[str, str], work: Path) -> str:
    """The page with every run block's body replaced by its commands' real output."""

    def body(match: re.Match) -> str:
        shown = []
        for command in filter(None, map(str.strip, match["commands"].splitlines())):
            if command not in outputs:
                outputs[command] = run(command, work)
            shown.append(f"$ {command}\n{outputs[command]}".rstrip("\n"))
        console = "```console\n" + "\n".join(shown) + "\n```\n"
        return match.group(1) + console + match.group(4)

    return BLOCK.sub(body, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", type=Path, help="Pages to fill (default: all).")
    parser.add_argument("--reuse", action="store_true", help="Keep outputs.json's outputs.")
    args = parser.parse_args()
    saved = WORK / "outputs.json"
    outputs: dict[str, str] = json.loads(saved.read_text()) if args.reuse else {}
    for page in [p.resolve() for p in args.pages] or pages():
        text = page.read_text()
        if not BLOCK.search(text):
            continue
        print(page.relative_to(ROOT))
        fill(text, outputs, WORK)
        # Others may have edited the page during the minutes its commands ran.
        page.write_text(fill(page.read_text(), outputs, WORK))
    WORK.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(outputs, indent=1) + "\n")


if __name__ == "__main__":
    main()
