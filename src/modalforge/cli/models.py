"""`modalforge models`: the encoders and fusions on offer."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from modalforge.cli._common import console

models_app = typer.Typer(
    help="The encoders (per modality, pretrained or from scratch) and fusions modalforge offers.",
    no_args_is_help=True,
)


# the output sizes of the packaged encoders: what fusion parameter counts are quoted at
REFERENCE_FUSION_DIMS = {"audio": 384, "image": 1280, "text": 384}


@models_app.command("list")
def models_list(
    count: Annotated[
        bool,
        typer.Option(
            "--count/--no-count",
            help="Count parameters (builds each model; pretrained ones load their weights).",
        ),
    ] = True,
) -> None:
    """Every encoder and fusion, with its parameter count and a line on what it is for.

    From-scratch encoders are counted at their reference size (e.g. a 10,000-word vocabulary);
    fusions at the packaged encoders' output sizes (audio 384, image 1280, text 384) -> 256.
    """
    from rich.markup import escape

    from modalforge.encoders import create_encoder, list_encoders
    from modalforge.fusion import create_fusion, list_fusions

    def params(build) -> str:
        if not count:
            return "-"
        try:
            module = build()
        except (ImportError, RuntimeError, FileNotFoundError) as err:
            return f"n/a ({str(err).splitlines()[0][:40]})"
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"

    table = Table(title="encoders", title_justify="left")
    for name in ("name", "modality", "kind", "params", "what it is for"):
        table.add_column(name)
    for info in list_encoders():
        if info.name.startswith("hf_"):  # needs a folder: nothing to count
            n = "-"
        else:
            n = params(lambda info=info: create_encoder(info.name, **info.reference))
        kind = "pretrained" if info.pretrained else "from scratch"
        table.add_row(info.name, info.modality.value, kind, n, escape(info.description))
    console.print(table)
    table = Table(title="fusions (audio 384, image 1280, text 384 -> 256)", title_justify="left")
    for name in ("name", "params", "what it is for"):
        table.add_column(name)
    for info in list_fusions():
        n = params(lambda info=info: create_fusion(info.name, REFERENCE_FUSION_DIMS, 256))
        table.add_row(info.name, n, escape(info.description))
    console.print(table)
