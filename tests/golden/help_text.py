"""The ``--help`` text of every ``modalforge`` command, as the click tree gives it.

    python -m tests.golden.help_text > tests/golden/help.json    # (re)write the golden file

The golden file was written before the CLI became a package (issue 16); ``test_golden`` checks
every command still prints the same help (or says why it changed).
"""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

#: a fixed terminal: rich wraps help to the terminal width
ENV = {"COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"}


def command_paths() -> list[list[str]]:
    """Every command and group of the CLI, as argument lists (``[]`` is the root)."""
    from modalforge.cli import app

    root = typer.main.get_command(app)
    out: list[list[str]] = []

    def walk(cmd, path: list[str]) -> None:
        out.append(path)
        if getattr(cmd, "commands", None):  # a group (typer vendors its own click)
            for name in sorted(cmd.commands):
                walk(cmd.commands[name], [*path, name])

    walk(root, [])
    return out


def help_texts() -> dict[str, str]:
    from modalforge.cli import app

    runner = CliRunner()
    texts = {}
    for path in command_paths():
        result = runner.invoke(app, [*path, "--help"], env=ENV, terminal_width=100)
        assert result.exit_code == 0, (path, result.output)
        texts[" ".join(path) or "(root)"] = result.output
    return texts


if __name__ == "__main__":
    print(json.dumps(help_texts(), indent=1, sort_keys=True))
