"""Decoding a sequence model token by token: greedy, beam search, nucleus sampling.

A model is anything with ``start(memory, bos) -> state`` and ``step(memory, state) -> (logits
(B, V), state)``, the state a dict of tensors with one row per sequence (the captioner, in
PyTorch or as its ONNX graphs); ``advance`` appends the chosen tokens. Sequences start with
``bos`` and end at ``eos`` or ``max_length`` tokens; what comes back leaves both out.

* **greedy**: the most likely token at each step.
* **beam search** (``width``): the ``width`` best partial sequences by summed log-probability;
  a sequence that emits ``eos`` is finished. Finished ones are ranked by ``logp / lp(len)`` with
  GNMT's length penalty ``lp = ((5 + len) / 6) ** alpha`` (Wu et al. 2016; ``alpha = 0``: raw
  log-probability, which favours short captions). The search stops once ``width`` sequences
  are finished (or at ``max_length``: then the open beams are ranked the same way).
* **sampling**: from ``softmax(logits / temperature)``, restricted to the smallest set of tokens
  whose probability reaches ``top_p`` (Holtzman et al. 2020), with a seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("greedy", "beam", "sample")


MAX_BEAM_WIDTH = 16  # each beam is a row of every decoder step: a request's cost grows with it


@dataclass(frozen=True)
class DecodeOptions:
    method: str = "beam"
    beam_width: int = 3
    length_penalty: float = 0.6
    temperature: float = 1.0
    top_p: float = 0.9
    max_length: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"decoding method must be one of {METHODS}, not {self.method!r}")
        if not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be 1 to {MAX_BEAM_WIDTH}, got {self.beam_width}")
        if not 0 < self.temperature <= 100:
            raise ValueError(f"temperature must be > 0 and at most 100, got {self.temperature}")
        if not -10 <= self.length_penalty <= 10:
            raise ValueError(f"length_penalty must be -10 to 10, got {self.length_penalty}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be 0 to 2**63 - 1, got {self.seed}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


def length_penalty(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def decode(
    model, memory: torch.Tensor, bos: int, eos: int, options: DecodeOptions = DecodeOptions()
) -> list[list[int]]:
    """Token ids (without ``bos`` / ``eos``) for each of the ``B`` rows of ``memory``."""
    if options.method == "beam" and options.beam_width > 1:
        return [_beam(model, memory[i : i + 1], bos, eos, options) for i in range(len(memory))]
    return _step_all(model, memory, bos, eos, options)


def advance(state: dict[str, torch.Tensor], token: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state after ``token`` (B,) is chosen: appended to the prefix, or the GRU's next
    input."""
    if "prefix" in state:
        return {**state, "prefix": torch.cat([state["prefix"], token[:, None]], 1)}
    return {**state, "token": token}


def _rows(state: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in state.items()}


def _step_all(model, memory, bos: int, eos: int, options: DecodeOptions) -> list[list[int]]:
    """Greedy (beam width 1 too) or sampling, the whole batch at once."""
    n = len(memory)
    state = model.start(memory, bos)
    tokens = []
    done = torch.zeros(n, dtype=torch.bool, device=memory.device)
    generator = None
    if options.method == "sample":
        generator = torch.Generator(device=memory.device).manual_seed(options.seed)
    for _ in range(options.max_length - 1):
        logits, state = model.step(memory, state)
        logits = logits.float()
        if options.method == "sample":
            token = _nucleus(logits / options.temperature, options.top_p, generator)
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, eos), token)
        tokens.append(token)
        state = advance(state, token)
        done |= token == eos
        if bool(done.all()):
            break
    rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(n)]
    return [_strip(row, eos) for row in rows]


def _nucleus(logits: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    # keep a token while the mass before it is below top_p (the first token always stays)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def _beam(model, memory: torch.Tensor, bos: int, eos: int, options: DecodeOptions) -> list[int]:
    width, alpha = options.beam_width, options.length_penalty
    state = model.start(memory, bos)
    beams: list[list[int]] = [[]]
    scores = torch.zeros(1, device=memory.device)
    finished: list[tuple[float, list[int]]] = []
    for _ in range(options.max_length - 1):
        logits, state = model.step(memory.expand(len(beams), -1, -1), state)
        total = (scores[:, None] + logits.float().log_softmax(-1)).flatten()
        top = total.topk(min(2 * width, len(total)))
        vocab = logits.shape[-1]
        keep_rows, keep_tokens, keep_scores = [], [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            row, token = divmod(flat, vocab)
            if token == eos:
                words = beams[row]
                finished.append((score / length_penalty(len(words) + 1, alpha), words))
            else:
                keep_rows.append(row)
                keep_tokens.append(token)
                keep_scores.append(score)
            if len(keep_rows) == width:
                break
        if len(finished) >= width or not keep_rows:
            break
        rows = torch.tensor(keep_rows, device=memory.device)
        state = advance(_rows(state, rows), torch.tensor(keep_tokens, device=memory.device))
        beams = [[*beams[r], t] for r, t in zip(keep_rows, keep_tokens, strict=True)]
        scores = torch.tensor(keep_scores, device=memory.device)
    if not finished:  # max_length reached: the open beams, ranked the same way
        finished = [(s / length_penalty(len(b), alpha), b)
                    for s, b in zip(scores.tolist(), beams, strict=True)]  # fmt: skip
    return max(finished, key=lambda f: f[0])[1]


def _strip(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


__all__ = ["METHODS", "DecodeOptions", "advance", "decode", "length_penalty"]
