"""`modalforge caption` and `transcribe`: bundles that write text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from modalforge.cli._common import console, fail


def caption(
    bundle: Annotated[Path, typer.Argument(help="A captioning bundle (train --task caption).")],
    images: Annotated[list[Path], typer.Argument(help="Image files to caption.")],
    method: Annotated[str, typer.Option(help="beam, greedy or sample.")] = "beam",
    beam_width: Annotated[int, typer.Option(help="Beam search: sequences kept.")] = 3,
    length_penalty: Annotated[
        float, typer.Option(help="Beam search: GNMT alpha (0: raw log-probability).")
    ] = 0.6,
    temperature: Annotated[float, typer.Option(help="Sampling: softmax temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Sampling: nucleus mass kept.")] = 0.9,
    seed: Annotated[int, typer.Option(help="Sampling: random seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Write a caption for each image with a captioning bundle."""
    from modalforge.bundle import BundleError, load_bundle
    from modalforge.data.errors import DecodeError
    from modalforge.models.decoding import DecodeOptions
    from modalforge.tasks import for_bundle, load
    from modalforge.tasks.registry import CAPTION

    missing = [str(i) for i in images if not i.is_file()]
    if missing:
        fail(f"no such file: {', '.join(missing)}")
    try:
        found = load_bundle(bundle, verify=False)
        if not for_bundle(found).can(CAPTION):
            fail(f"{bundle} is a {found.task} bundle, not a captioning one")
        predictor = load(bundle)
        options = DecodeOptions(method, beam_width, length_penalty, temperature, top_p,
                                predictor.config.max_length, seed)  # fmt: skip
        texts = predictor.caption([str(i.resolve()) for i in images], options, root="/")
    except (BundleError, DecodeError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    for path, text in zip(images, texts, strict=True):
        if as_json:
            print(json.dumps({"image": str(path), "caption": text}))
        else:
            console.print(f"{path}: [bold]{text}[/]", highlight=False)


def transcribe(
    audio: Annotated[
        list[Path] | None, typer.Argument(help="Audio files (WAV, FLAC, OGG, MP3).")
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(help="A speech-to-text bundle (default: the packaged Whisper tiny.en)."),
    ] = None,
    save_bundle: Annotated[
        Path | None,
        typer.Option(help="Write the transcriber as a bundle (to serve it)."),
    ] = None,
    finetune: Annotated[
        Path | None,
        typer.Option(
            help="First teach the decoder this manifest's transcripts (audio + reference text "
            "columns; then --save-bundle to keep it)."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="--finetune: passes over the rows.")] = 8,
    lr: Annotated[float, typer.Option(help="--finetune: AdamW learning rate.")] = 3e-5,
    manifest: Annotated[
        Path | None, typer.Option(help="Score a manifest of audio + reference text (WER).")
    ] = None,
    audio_column: Annotated[str, typer.Option(help="--manifest: the audio column.")] = "audio",
    text_column: Annotated[str, typer.Option(help="--manifest: the reference column.")] = "text",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="--manifest: report folder.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Speech to text with Whisper: transcribe files, score a manifest (word error rate),
    fine-tune the decoder on a manifest, or save the transcriber as a bundle for `modalforge
    serve` (/v1/audio/transcriptions)."""
    from modalforge.bundle import BundleError
    from modalforge.data.errors import DecodeError
    from modalforge.tasks.transcription import Transcriber

    if not (audio or save_bundle or manifest):
        fail("give audio files, --manifest or --save-bundle")
    try:
        with console.status("loading Whisper ..."):
            model = Transcriber.load(bundle) if bundle else Transcriber.packaged()
        if finetune is not None:
            history = model.finetune(finetune, audio_column, text_column, epochs=epochs, lr=lr)
            losses = ", ".join(f"{v:.4f}" for v in history["loss"])
            console.print(f"fine-tuned on {history['rows']} rows ({history['skipped']} skipped): "
                          f"loss per epoch {losses}")  # fmt: skip
        if save_bundle is not None:
            saved = model.save(save_bundle)
            console.print(f"bundle: {saved.path}")
        if manifest is not None:
            result = model.evaluate(manifest, audio_column, text_column, out_dir=out)
            if result["wer"] is None:
                fail(f"{manifest}: no row could be scored ({result['n_failed']} failed)")
            console.print(f"{result['n']} rows ({result['n_failed']} failed): WER "
                          f"{result['wer']:.4f} (corpus), {result['mean_row_wer']:.4f} (mean per "
                          "row)" + (f"; report in {out}" if out else ""))  # fmt: skip
        for path, text in zip(audio or [], model.transcribe_sources(audio or []), strict=True):
            if as_json:
                print(json.dumps({"audio": str(path), "text": text}))
            else:
                console.print(f"{path}: [bold]{text}[/]", highlight=False)
    except (BundleError, DecodeError, ValueError, FileNotFoundError, FileExistsError) as err:
        fail(str(err))
