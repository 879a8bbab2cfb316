"""`modalforge chat`: talk to a chat LLM bundle in the terminal (one question, or a REPL)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from modalforge.cli._common import console, err_console, fail

REPL_HELP = ("/image PATH  the conversation's image (a new one starts a new conversation)\n"
             "/audio PATH  the conversation's audio clip (likewise)\n"
             "/reset       forget the conversation\n"
             "/exit        quit (Ctrl-D too)")  # fmt: skip


class Session:
    """One conversation: its turns, its image / clip (encoded once), and the engine."""

    def __init__(self, predictor, engine, params, system: str | None) -> None:
        self.predictor, self.engine, self.params = predictor, engine, params
        self.system = system
        self.reset()

    def reset(self) -> None:
        from modalforge.tasks.chat.data import Turn

        self.turns = [Turn("system", self.system)] if self.system else []
        self.media: dict = {}

    def attach(self, kind: str, path: Path) -> None:
        """Encode ``path`` as the conversation's ``kind`` (DecodeError / OSError if it is not
        one); a conversation with one already starts over (one of each per conversation)."""
        tower = self.predictor.tower(kind)
        tokens = tower.encode([tower.load(str(path.resolve()))])[0]
        if kind in self.media:
            self.reset()
        self.media[kind] = tokens

    def ask(self, question: str, out=None) -> str:
        """Stream the answer to ``out`` (stdout) as it is decoded; it joins the conversation."""
        out = out or sys.stdout
        from modalforge.tasks.chat.data import Turn

        turns = [*self.turns, Turn("user", question)]
        prompt = self.predictor.prompt(turns, media_tokens=self.media)
        room = self.engine.max_len - len(prompt.token_ids)
        if room < 1:
            raise ValueError(f"the conversation is over the model's {self.engine.max_len} "
                             "tokens: /reset")  # fmt: skip
        from dataclasses import replace

        params = replace(self.params, max_tokens=min(self.params.max_tokens, room))
        text = []
        for delta in self.engine.submit(prompt, params):
            text.append(delta.text)
            out.write(delta.text)
            out.flush()
        out.write("\n")
        answer = "".join(text).strip()
        self.turns = [*turns, Turn("assistant", answer)]
        return answer


def chat(
    bundle: Annotated[Path, typer.Argument(help="A chat LLM bundle (train --task chat).")],
    question: Annotated[
        str | None,
        typer.Argument(help="Ask this and print the answer; without it, a conversation (REPL)."),
    ] = None,
    image: Annotated[Path | None, typer.Option(help="An image to talk about.")] = None,
    audio: Annotated[Path | None, typer.Option(help="An audio clip to talk about.")] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature (0: greedy, the same answer each time).")
    ] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling: random seed.")] = None,
) -> None:
    """Chat with a chat LLM bundle: the answer is printed as it is decoded.

    With a QUESTION, print one answer and exit. Without one, a conversation: type a message,
    get the answer, go on (the model sees the whole conversation); /image PATH, /audio PATH,
    /reset, /exit (or Ctrl-D). The LLM runs with int8 weights on the CPU unless
    MODALFORGE_LLM_QUANTIZE=none.
    """
    import torch

    from modalforge.bundle import BundleError, load_bundle
    from modalforge.data.errors import DecodeError
    from modalforge.llm.types import SamplingParams
    from modalforge.tasks import for_bundle, load
    from modalforge.tasks.chat.serving import engine_options
    from modalforge.tasks.registry import LLM

    if max_tokens < 1 or temperature < 0:
        fail("--max-tokens must be at least 1 and --temperature at least 0")
    for name, path in (("--image", image), ("--audio", audio)):
        if path is not None and not path.is_file():
            fail(f"{name}: no such file: {path}")
    try:
        found = load_bundle(bundle, verify=False)
        if not for_bundle(found).can(LLM):
            fail(f"{bundle} is a {found.task} bundle, not a chat LLM one (train --task chat)")
        loading = console.status(f"loading {bundle} ...") if question is None else None
        with loading or contextlib.nullcontext():
            predictor = load(bundle)
            device = torch.device(next(predictor.model.parameters()).device)
            engine = predictor.engine(inplace=True, **engine_options(predictor, device))
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        session = Session(predictor, engine, params, system)
        for kind, path in (("image", image), ("audio", audio)):
            if path is not None:
                session.attach(kind, path)
        if question is not None:
            session.ask(question)
            return
    except (BundleError, DecodeError, ValueError, FileNotFoundError, OSError) as err:
        fail(str(err))
    _repl(session)


def _repl(session: Session) -> None:
    from modalforge.data.errors import DecodeError

    console.print(f"[dim]{REPL_HELP}[/]", highlight=False)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        command, _, arg = line.partition(" ")
        try:
            if command == "/exit":
                return
            if command == "/reset":
                session.reset()
                console.print("[dim](a new conversation)[/]")
            elif command in ("/image", "/audio"):
                path = Path(arg.strip()).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(f"no such file: {path}")
                session.attach(command[1:], path)
                console.print(f"[dim]({command[1:]} {path})[/]", highlight=False)
            elif command.startswith("/") and " " not in command and len(command) > 1:
                console.print(f"[dim]unknown command {command}\n{REPL_HELP}[/]", highlight=False)
            else:
                sys.stdout.write("model> ")
                session.ask(line)
        except (DecodeError, ValueError, OSError) as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False)
