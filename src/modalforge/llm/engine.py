"""``LlmEngine``: many generations at once over one model, with continuous batching.

A background thread owns the model (a ``SlotDecoder``) and loops:

1. drop cancelled requests; admit waiting ones while a slot is free and the tokens in flight
   stay under ``max_tokens_in_flight``, copying in the longest prefix the prefix cache holds;
2. prefill up to ``prefill_chunk`` prompt positions (a long prompt takes several steps, so it
   never stalls the others' decoding for long); a prompt that is done samples its first token;
3. one batched decode step over every sequence that has a token to feed, then sample, stream
   the text, and finish sequences (stop token, stop string, grammar done, ``max_tokens``,
   ``max_len``), freeing their slots for the next step.

Requests join and leave between steps. Finished sequences leave their KV (prompt and answer)
in the prefix cache, so a follow-up chat turn only prefills the new turn. An exception while
handling one request fails that request only (raised from its iterator / ``result()``).

Decoding at temperature 0 gives the same tokens batched or alone in fp32. With
``quantize="int8"`` it may not: dynamic quantization scales the activations of the whole
batch together, so the other rows nudge each row's logits.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .decoder import SlotDecoder
from .sampling import TextStream, make_generator, pick_tokens
from .types import Completion, Constraint, Delta, Prompt, SamplingParams

log = logging.getLogger(__name__)


class Generation:
    """A submitted request: iterate it (``for`` or ``async for``) for ``Delta``s, or wait for
    its ``result()``. Each iterator sees every delta from the start; several may run."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deltas: list[Delta] = []
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._wakers: list = []  # async iterators' callbacks, called from the engine thread
        self.cancel_requested = False

    @property
    def done(self) -> bool:
        return self._completion is not None or self._error is not None

    def cancel(self) -> None:
        """Stop generating: the engine frees the slot at its next step (finish "cancelled")."""
        self.cancel_requested = True

    def result(self, timeout: float | None = None) -> Completion:
        """Block until finished; the ``Completion``, or the request's error raised."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"generation not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._completion

    def _snapshot(self, start: int) -> tuple[list[Delta], bool]:
        with self._cond:
            return self._deltas[start:], self.done

    def __iter__(self) -> Iterator[Delta]:
        seen = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda n=seen: self.done or len(self._deltas) > n)
            deltas, done = self._snapshot(seen)
            seen += len(deltas)
            yield from deltas
            if done and not self._snapshot(seen)[0]:
                break
        if self._error is not None:
            raise self._error

    async def aiter(self) -> AsyncIterator[Delta]:
        """The deltas, for ``async for``: waiting never blocks the event loop (the engine
        thread wakes it with ``call_soon_threadsafe``)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(ready.set)

        with self._cond:
            self._wakers.append(wake)
        try:
            seen = 0
            while True:
                ready.clear()  # before reading, so a delta pushed after the read wakes us
                deltas, done = self._snapshot(seen)
                seen += len(deltas)
                for delta in deltas:
                    yield delta
                if done and not deltas:
                    break
                if not deltas:
                    await ready.wait()
        finally:
            with self._cond:
                self._wakers.remove(wake)
        if self._error is not None:
            raise self._error

    __aiter__ = aiter

    def _push(self, delta: Delta | None = None, *, completion=None, error=None) -> None:
        with self._cond:
            if delta is not None:
                self._deltas.append(delta)
            self._completion = completion or self._completion
            self._error = error or self._error
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens
                wake()


@dataclass
class _Sequence:
    gen: Generation
    prompt: Prompt
    params: SamplingParams
    keys: list  # prefix-cache key of each position: token id, or (span key, offset)
    stream: TextStream
    constraint: Constraint | None
    generator: torch.Generator
    slot: int | None = None
    prefilled: int = 0  # prompt positions whose KV is in the slot
    cached: int = 0  # of which from the prefix cache
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled, not yet fed to the model


def prompt_keys(prompt: Prompt) -> list:
    """Each position's prefix-cache key: its token id, or ``(span.key, offset)`` inside an
    embedding span (the placeholder token ids there say nothing about the content)."""
    keys: list = list(prompt.token_ids)
    for span in prompt.spans:
        for offset in range(len(span.embeds)):
            keys[span.start + offset] = (span.key, offset)
    return keys


class PrefixCache:
    """KV of finished sequences, keyed by their positions' keys; LRU, bounded in tokens.

    A lookup takes the entry sharing the longest prefix with the prompt. An entry whose keys
    are a prefix of a new one's is dropped (the new one serves every lookup it would)."""

    def __init__(self, capacity_tokens: int):
        self.capacity = capacity_tokens
        self.entries: OrderedDict[int, tuple[list, torch.Tensor]] = OrderedDict()
        self.tokens = 0
        self._next_id = 0

    @staticmethod
    def _common(a: list, b: list) -> int:
        n = min(len(a), len(b))
        for i in range(n):
            if a[i] != b[i]:
                return i
        return n

    def lookup(self, keys: list, limit: int) -> tuple[int, torch.Tensor | None]:
        """The longest cached prefix of ``keys`` (at most ``limit`` positions) and its KV."""
        best, best_id = 0, None
        for entry_id, (entry_keys, _) in self.entries.items():
            n = min(self._common(entry_keys, keys), limit)
            if n > best:
                best, best_id = n, entry_id
        if best_id is None:
            return 0, None
        self.entries.move_to_end(best_id)
        return best, self.entries[best_id][1][:, :, :, :best]

    def add(self, keys: list, kv: torch.Tensor) -> None:
        if not keys or len(keys) > self.capacity:
            return
        for entry_id, (entry_keys, _) in list(self.entries.items()):
            if len(entry_keys) <= len(keys) and self._common(entry_keys, keys) == len(entry_keys):
                self._drop(entry_id)
        self.entries[self._next_id] = (keys, kv)
        self._next_id += 1
        self.tokens += len(keys)
        while self.tokens > self.capacity:
            self._drop(next(iter(self.entries)))

    def _drop(self, entry_id: int) -> None:
        keys, _ = self.entries.pop(entry_id)
        self.tokens -= len(keys)


class LlmEngine:
    """Continuous-batching generation over a Gemma-3 causal LM (see the module docstring).

    ``max_slots`` sequences decode at once, each up to ``max_len`` positions (prompt and
    answer); admission also keeps the KV positions in use (``max_tokens_in_flight``) bounded.
    ``prefix_cache_size`` is in tokens (0 turns the cache off). ``prefill_chunk`` bounds the
    prompt positions prefilled per step. ``quantize="int8"`` swaps the model's Linear layers
    for int8 ones in place (CPU); ``kv_dtype`` defaults to the model's dtype.
    ``stop_token_ids`` defaults to the tokenizer's eos and ``<end_of_turn>``; a request's own
    ``stop_token_ids`` add to them. A completion's ``token_ids`` never include the stop token.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_slots: int = 16,
        max_len: int = 2048,
        max_tokens_in_flight: int = 8192,
        prefix_cache_size: int = 8192,
        prefill_chunk: int = 256,
        quantize: str | None = None,
        kv_dtype: torch.dtype | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ):
        self.decoder = SlotDecoder(
            model, max_slots=max_slots, max_len=max_len, kv_dtype=kv_dtype, quantize=quantize
        )
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.max_tokens_in_flight = max_tokens_in_flight
        self.prefill_chunk = prefill_chunk
        if stop_token_ids is None:
            stop_token_ids = default_stop_token_ids(tokenizer)
        self.stop_token_ids = frozenset(stop_token_ids)
        self.prefix_cache = PrefixCache(prefix_cache_size)
        self._cond = threading.Condition()
        self._inbox: list[_Sequence] = []
        self._waiting: deque[_Sequence] = deque()
        self._active: dict[int, _Sequence] = {}  # slot -> sequence
        self._free = list(range(max_slots))  # a heap: the lowest slot first keeps them compact
        self._counts = {"prefix_hits": 0, "prefix_misses": 0, "cached_tokens": 0}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    # -- the caller's side -----------------------------------------------------------------

    def submit(self, prompt: Prompt, params: SamplingParams | None = None) -> Generation:
        """Queue a request (thread-safe); its ``Generation`` streams the answer."""
        params = params or SamplingParams()
        self._check(prompt, params)
        gen = Generation()
        seq = _Sequence(
            gen=gen, prompt=prompt, params=params, keys=prompt_keys(prompt),
            stream=TextStream(self.tokenizer, params.stop),
            constraint=params.constraint() if params.constraint is not None else None,
            generator=make_generator(params.seed, self.decoder.device),
        )  # fmt: skip
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._inbox.append(seq)
            self._cond.notify_all()
        return gen

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Submit every prompt (one params for all, or one each) and wait for all of them."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        gens = [self.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        return [g.result() for g in gens]

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "active": len(self._active),
                "waiting": len(self._waiting) + len(self._inbox),
                "free_slots": len(self._free),
                "tokens_in_flight": self._tokens_in_flight(),
                "prefix_cache_tokens": self.prefix_cache.tokens,
                **self._counts,
            }

    def close(self) -> None:
        """Stop the loop; requests not finished yet fail with ``RuntimeError``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> LlmEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, prompt: Prompt, params: SamplingParams) -> None:
        n = len(prompt.token_ids)
        if not 0 < n <= self.max_len:
            raise ValueError(f"a prompt needs 1 to max_len={self.max_len} tokens, not {n}")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {params.max_tokens}")
        if params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0:
            raise ValueError(f"bad sampling parameters: {params}")
        bad = [t for t in prompt.token_ids if not 0 <= t < self.decoder.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary: {bad[:5]}")
        taken = [False] * n
        for span in prompt.spans:
            if span.embeds.ndim != 2 or span.embeds.shape[1] != self.decoder.hidden:
                raise ValueError(
                    f"span {span.key!r}: embeds must be (n, {self.decoder.hidden}), "
                    f"not {tuple(span.embeds.shape)}"
                )
            end = span.start + len(span.embeds)
            if span.start < 0 or end > n or any(taken[span.start : end]):
                raise ValueError(f"span {span.key!r} ({span.start}..{end}) is outside the "
                                 f"prompt's {n} positions or overlaps another span")  # fmt: skip
            taken[span.start : end] = [True] * len(span.embeds)

    # -- the loop --------------------------------------------------------------------------

    def _tokens_in_flight(self) -> int:
        return sum(len(s.prompt.token_ids) + len(s.generated) for s in self._active.values())

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._inbox or self._waiting
                                    or self._active)  # fmt: skip
                if self._closed:
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as exc:  # a bug outside any one request: fail the batch, go on
                log.exception("LLM engine step failed")
                for seq in list(self._active.values()):
                    self._fail(seq, exc)
        closed = RuntimeError("the engine was closed before this request finished")
        for seq in [*self._inbox, *self._waiting, *self._active.values()]:
            self._fail(seq, closed)

    def _step(self) -> None:
        for seq in [s for s in self._waiting if s.gen.cancel_requested]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled")
        for seq in [s for s in self._active.values() if s.gen.cancel_requested]:
            self._finish(seq, "cancelled")
        self._admit()
        self._prefill()
        decoding = sorted(
            (s for s in self._active.values() if s.next_token is not None), key=lambda s: s.slot
        )
        if decoding:
            self._decode(decoding)

    def _decode(self, seqs: list[_Sequence]) -> None:
        """One batched decode step over ``seqs``; when it raises, each sequence steps on its
        own, so only one that fails alone fails (the step rewrites the same cache positions)."""
        try:
            tokens = [s.next_token for s in seqs]
            logits = self.decoder.decode([s.slot for s in seqs], self.decoder.embed(tokens))
        except Exception as exc:
            if len(seqs) == 1:
                self._fail(seqs[0], exc)
                return
            log.warning("LLM decode step of %d failed (%r); stepping each alone", len(seqs), exc)
            for seq in seqs:
                self._decode([seq])
            return
        for seq, token in zip(seqs, tokens, strict=True):
            seq.keys.append(token)
            seq.next_token = None
        self._sample(seqs, logits)

    def _admit(self) -> None:
        while self._waiting and self._free:
            seq = self._waiting[0]
            need = len(seq.prompt.token_ids)
            if self._active and self._tokens_in_flight() + need > self.max_tokens_in_flight:
                break
            self._waiting.popleft()
            with self._cond:
                seq.slot = heapq.heappop(self._free)
                self._active[seq.slot] = seq
            try:
                self.decoder.reset(seq.slot)
                n, kv = self.prefix_cache.lookup(seq.keys, limit=need - 1)
                if n:
                    self.decoder.write(seq.slot, kv)
                seq.prefilled = seq.cached = n
                with self._cond:
                    self._counts["prefix_hits" if n else "prefix_misses"] += 1
                    self._counts["cached_tokens"] += n
            except Exception as exc:
                self._fail(seq, exc)

    def _prefill(self) -> None:
        """Prefill up to ``prefill_chunk`` prompt positions, oldest admitted first."""
        budget = self.prefill_chunk
        for seq in list(self._active.values()):
            total = len(seq.prompt.token_ids)
            if budget <= 0:
                break
            if seq.prefilled == total:
                continue
            try:
                end = min(total, seq.prefilled + budget)
                logits = self.decoder.prefill(
                    seq.slot, self._embeds(seq.prompt, seq.prefilled, end)
                )
            except Exception as exc:
                self._fail(seq, exc)
                continue
            budget -= end - seq.prefilled
            seq.prefilled = end
            if end == total:
                self._sample([seq], logits[None])

    def _embeds(self, prompt: Prompt, start: int, end: int) -> torch.Tensor:
        """Input embeddings of prompt positions ``start .. end - 1``: the tokens' (scaled),
        with the spans' embeddings spliced in as given."""
        embeds = self.decoder.embed(prompt.token_ids[start:end])
        for span in prompt.spans:
            lo, hi = max(start, span.start), min(end, span.start + len(span.embeds))
            if lo < hi:
                rows = span.embeds[lo - span.start : hi - span.start]
                embeds[lo - start : hi - start] = rows.to(embeds.device, embeds.dtype)
        return embeds

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Pick each sequence's next token (grammar masks first) and act on it."""
        keep = []
        for row, seq in enumerate(seqs):
            try:
                if seq.constraint is not None:
                    logits[row] = _masked(logits[row], seq.constraint.mask())
                keep.append(row)
            except Exception as exc:
                self._fail(seq, exc)
        if not keep:
            return
        seqs = [seqs[r] for r in keep]
        try:
            tokens = pick_tokens(
                logits[keep], [s.params for s in seqs], [s.generator for s in seqs]
            )
        except Exception as exc:
            for seq in seqs:
                self._fail(seq, exc)
            return
        for seq, token in zip(seqs, tokens, strict=True):
            try:
                if isinstance(token, Exception):
                    raise token
                self._advance(seq, token)
            except Exception as exc:
                self._fail(seq, exc)

    def _advance(self, seq: _Sequence, token: int) -> None:
        if token in self.stop_token_ids or token in seq.params.stop_token_ids:
            self._finish(seq, "stop")
            return
        seq.generated.append(token)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        text = seq.stream.push(token)
        if seq.stream.stopped or (seq.constraint is not None and seq.constraint.is_finished()):
            self._finish(seq, "stop", text, [token])
        # max_len: no position is left to feed the token to
        elif len(seq.generated) >= seq.params.max_tokens or (
            self.decoder.lengths[seq.slot] >= self.max_len
        ):
            self._finish(seq, "length", text, [token])
        else:
            seq.next_token = token
            seq.gen._push(Delta(text, [token]))

    def _release(self, seq: _Sequence, *, keep_kv: bool) -> None:
        if seq.slot is None:
            return
        slot, seq.slot = seq.slot, None
        n = self.decoder.lengths[slot]
        if keep_kv and 0 < n <= self.prefix_cache.capacity:
            self.prefix_cache.add(seq.keys[:n], self.decoder.read(slot))
        self.decoder.reset(slot)
        with self._cond:
            del self._active[slot]
            heapq.heappush(self._free, slot)

    def _finish(self, seq: _Sequence, reason: str, text: str = "", token_ids=()) -> None:
        self._release(seq, keep_kv=True)
        text += seq.stream.flush()
        completion = Completion(
            text=seq.stream.text,
            token_ids=list(seq.generated),
            finish_reason=reason,
            prompt_tokens=len(seq.prompt.token_ids),
            cached_tokens=seq.cached,
            completion_tokens=len(seq.generated),
        )
        seq.gen._push(Delta(text, list(token_ids), reason), completion=completion)

    def _fail(self, seq: _Sequence, exc: BaseException) -> None:
        try:
            self._release(seq, keep_kv=False)
        finally:
            seq.gen._push(error=exc)


def _masked(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with the tokens a constraint disallows at -inf (a mask shorter than the
    model's vocabulary, e.g. the tokenizer's, disallows the padding ids beyond it)."""
    if allowed is None:
        return logits
    allowed = allowed.to(device=logits.device, dtype=torch.bool)
    if allowed.shape[0] < logits.shape[0]:
        allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[0] - allowed.shape[0])])
    if not allowed.any():
        raise RuntimeError("the constraint allows no next token")
    return logits.masked_fill(~allowed, -torch.inf)


def default_stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's eos and, if it has one, ``<end_of_turn>`` (Gemma's end of a chat turn)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.append(end_of_turn)
    return ids
