"""From logits to a token, and from tokens to streamed text: the per-sequence half of decoding.

* ``pick_tokens``: greedy rows by one batched argmax; sampled rows (temperature, top-k, top-p)
  each with its own ``torch.Generator``, so a seeded request gives the same tokens whatever
  else is in the batch;
* ``TextStream``: incremental detokenization that never emits half a UTF-8 character nor
  text that could turn out to be the start of a stop string.
"""

from __future__ import annotations

import torch

from .types import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """The request's random stream: ``seed`` if given, else fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` (``[vocab]``, already divided by the temperature) with everything outside
    the top-k and outside the nucleus (the smallest set whose probability reaches ``top_p``)
    set to -inf. The most likely token always survives."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the ones before it already reach top_p
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), -torch.inf)
    return logits


def pick_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int | Exception]:
    """One next token per row of ``logits`` (``[B, vocab]``, constraint masks applied), or the
    exception that sampling that row raised (non-finite logits): a row never fails another."""
    greedy = logits.argmax(-1)
    picked: list[int | Exception] = list(greedy.tolist())
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.temperature == 0:
            continue
        try:
            scaled = filter_logits(logits[row].float() / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(scaled, dim=-1)
            picked[row] = int(torch.multinomial(probs, 1, generator=generator))
        except RuntimeError as exc:  # "probability tensor contains either inf, nan or < 0"
            picked[row] = exc
    return picked


class TextStream:
    """Turns a growing list of token ids into text deltas, honouring stop strings.

    Decoding token by token breaks multi-byte characters (a byte-level BPE token can hold
    half of one), so each step decodes a short window (from the last point where the text was
    whole) and holds back while it ends in U+FFFD. Any tail of the text that is a prefix of a
    stop string is held back too, until it either completes the stop string (the text is cut
    before it) or stops matching.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (the emitted part is text[: self.sent])
        self.sent = 0
        self._prefix_offset = 0  # ids[prefix_offset:read_offset] decode to the text's tail
        self._read_offset = 0
        self.stopped = False  # a stop string appeared; text ends before it

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to emit (may be ""; always "" once a
        stop string has appeared)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete character (or nothing visible yet)
        self.text += full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return self._release()

    def _release(self) -> str:
        hits = [at for s in self.stop if (at := self.text.find(s, self.sent)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._emit(len(self.text))
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        return self._emit(len(self.text) - hold)

    def _emit(self, end: int) -> str:
        out, self.sent = self.text[self.sent : end], end
        return out

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the sequence), held-back parts included."""
        if not self.stopped:
            tail = self._decode(self.ids[self._prefix_offset :])
            prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
            self.text += tail[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self.ids)
            released = self._release()
            return released + self._emit(len(self.text))
        return self._emit(len(self.text))
