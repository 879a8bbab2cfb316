"""The ``modalforge`` command. Only this package knows about files and flags.

The root app lives here; each command group is a module of its own. Typer lists commands in the
order they are registered, so the registration below keeps the order of ``modalforge --help``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from modalforge import __version__
from modalforge.cli import chat, data, experiments, export, generate, index, models, serve, train
from modalforge.cli._common import console

app = typer.Typer(
    help="modalforge: from a manifest of images, text and audio to a deployed multimodal model.\n\n"
    "Start with `modalforge data build emoji --out data/emoji`, then "
    "`modalforge data inspect data/emoji/manifest.csv`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data.data_app, name="data")
app.add_typer(models.models_app, name="models")
app.add_typer(index.index_app, name="index")


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(f"modalforge {__version__}")
        raise typer.Exit()


@app.command()
def version() -> None:
    """Print modalforge's version and the versions of its main dependencies."""
    import importlib.metadata as md

    console.print(f"modalforge {__version__}")
    for name in ("torch", "transformers", "lightning", "onnxruntime", "fastapi"):
        try:
            console.print(f"  {name} {md.version(name)}")
        except md.PackageNotFoundError:
            console.print(f"  {name} (not installed)")


app.command()(train.train)
app.command()(train.evaluate)
app.command()(train.predict)
app.command()(experiments.sweep)
app.command()(experiments.cv)
app.command()(experiments.ensemble)
app.command()(export.export)
app.command()(export.bench)
app.command()(serve.serve)
app.command()(generate.caption)
app.command()(generate.transcribe)
app.command()(chat.chat)
app.command()(index.search)


def main() -> None:
    try:  # transformers' per-load progress bars are noise on a command line
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    app()


__all__ = ["app", "main"]
