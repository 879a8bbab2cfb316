"""The LLM decoder (parity with transformers' Gemma-3 forward) and the engine (continuous
batching, sampling, stops, prefix cache, cancellation, errors, async), on the tiny random
Gemma-3 of ``tiny_llm`` (sliding window 8, so 20-token prompts cross it)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from modalforge.llm.decoder import SlotDecoder
from modalforge.llm.engine import LlmEngine
from modalforge.llm.sampling import TextStream
from modalforge.llm.types import EmbedSpan, Prompt, SamplingParams
from tests.tiny_llm import tiny_gemma, tiny_tokenizer

GREEDY = SamplingParams(max_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_gemma()


def engine(model, tok, **kwargs) -> LlmEngine:
    # no stop ids by default: a random model says <eos> whenever it likes
    kwargs = {"max_slots": 4, "max_len": 96, "stop_token_ids": (), **kwargs}
    return LlmEngine(model, tok, **kwargs)


def prompt(n: int, seed: int = 0) -> Prompt:
    g = torch.Generator().manual_seed(seed)
    return Prompt([2, *torch.randint(10, 500, (n - 1,), generator=g).tolist()])


# -- decoder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_decoder_matches_hf_past_the_sliding_window(bias):
    model = tiny_gemma(attention_bias=bias)
    if bias:  # HF initialises biases to zero: make them count
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias)
            torch.nn.init.normal_(layer.self_attn.v_proj.bias)
    ids = prompt(30).token_ids
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0]
    dec = SlotDecoder(model, max_slots=3, max_len=64)
    other = dec.prefill(0, dec.embed([2, 50, 60]))  # a neighbour slot at another length
    last = dec.prefill(2, dec.embed(ids[:9]))
    torch.testing.assert_close(last, ref[8], atol=1e-4, rtol=0)
    last = dec.prefill(2, dec.embed(ids[9:20]))  # a second chunk, across the window
    torch.testing.assert_close(last, ref[19], atol=1e-4, rtol=0)
    for t in range(20, 30):
        logits = dec.decode([0, 2], dec.embed([int(other.argmax()), ids[t]]))
        other = logits[0]
        torch.testing.assert_close(logits[1], ref[t], atol=1e-4, rtol=0)
    assert dec.lengths[:3] == [13, 0, 30]
    dec.copy_slot(2, 1, 25)  # a copied prefix continues like the original
    logits = dec.decode([1], dec.embed([ids[25]]))
    torch.testing.assert_close(logits[0], ref[25], atol=1e-4, rtol=0)


def test_decoder_span_embeddings_match_hf_inputs_embeds(model):
    ids = prompt(24, seed=1).token_ids
    span = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embeds = model.model.embed_tokens(torch.tensor([ids]))
        embeds[0, 4:10] = span  # HF inputs_embeds: used as given, not scaled
        ref = model(inputs_embeds=embeds).logits[0]
    dec = SlotDecoder(model, max_slots=1, max_len=64)
    tokens = dec.embed(ids[:20]).clone()  # an inference tensor: a clone to write into
    tokens[4:10] = span
    torch.testing.assert_close(dec.prefill(0, tokens), ref[19], atol=1e-4, rtol=0)
    for t in range(20, 24):
        logits = dec.decode([0], dec.embed([ids[t]]))
        torch.testing.assert_close(logits[0], ref[t], atol=1e-4, rtol=0)


def test_decoder_int8_quantizes_every_linear_and_stays_close():
    fp32 = tiny_gemma(seed=2)
    ids = prompt(20).token_ids
    with torch.no_grad():
        ref = fp32(input_ids=torch.tensor([ids])).logits[0, -1]
    quantized = tiny_gemma(seed=2)
    dec = SlotDecoder(quantized, max_slots=1, max_len=32, quantize="int8")
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    assert dec.embed_weight.dtype == torch.bfloat16  # the lookup table: half of fp32's bytes
    assert dec.embed(ids).dtype == torch.float32
    logits = dec.prefill(0, dec.embed(ids))
    assert torch.corrcoef(torch.stack([logits, ref]))[0, 1] > 0.99


# -- engine: batching and sampling -----------------------------------------------------------


def test_batched_equals_sequential_with_staggered_joins(model, tok):
    prompts = [prompt(n, seed=n) for n in (5, 20, 12, 31, 3)]
    params = SamplingParams(max_tokens=24, temperature=0)
    with engine(model, tok, max_slots=1, prefix_cache_size=0) as alone:
        expected = [alone.generate([p], params)[0].token_ids for p in prompts]
    with engine(model, tok, prefill_chunk=8, prefix_cache_size=0) as eng:
        gens = []
        for p in prompts:  # each joins once the previous one is decoding
            gens.append(eng.submit(p, params))
            next(iter(gens[-1]))
        got = [g.result().token_ids for g in gens]
    assert got == expected
    assert all(len(t) == 24 for t in got)


def test_seeded_sampling_is_reproducible_whatever_the_batch(model, tok):
    p = prompt(10)
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    with engine(model, tok) as eng:
        alone = eng.generate([p], seeded)[0].token_ids
        crowd = eng.generate([prompt(15, 1), p, prompt(4, 2)], [GREEDY, seeded, GREEDY])[1]
        other = eng.generate([p], SamplingParams(max_tokens=20, temperature=1.0, seed=8))[0]
    assert crowd.token_ids == alone
    assert other.token_ids != alone


def test_top_k_1_is_greedy(model, tok):
    p = prompt(12)
    with engine(model, tok) as eng:
        greedy = eng.generate([p], GREEDY)[0].token_ids
        top1 = eng.generate([p], SamplingParams(max_tokens=16, temperature=1.5, top_k=1))[0]
    assert top1.token_ids == greedy


# -- engine: stops ---------------------------------------------------------------------------


def test_stop_string_truncates_and_streams_the_same_text(model, tok):
    p = Prompt(tok("the cat sat on the mat.").input_ids)
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=3)
    with engine(model, tok) as eng:
        full = eng.generate([p], params)[0].text
        stop = full[6:9]
        gen = eng.submit(p, SamplingParams(max_tokens=40, temperature=0.8, seed=3, stop=(stop,)))
        deltas = list(gen)
    done = gen.result()
    assert done.text == full[: full.find(stop)]
    assert done.finish_reason == "stop" and deltas[-1].finish_reason == "stop"
    assert "".join(d.text for d in deltas) == done.text


def test_stop_token_ids_end_without_the_token(model, tok):
    p = prompt(9)
    with engine(model, tok) as eng:
        greedy = eng.generate([p], GREEDY)[0].token_ids
        stop_id = greedy[3]
        done = eng.generate(
            [p], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=(stop_id,))
        )[0]
    assert done.finish_reason == "stop"
    assert done.token_ids == greedy[: greedy.index(stop_id)]


def test_max_tokens_and_max_len_give_length(model, tok):
    with engine(model, tok, max_len=32) as eng:
        short = eng.generate([prompt(10)], SamplingParams(max_tokens=5, temperature=0))[0]
        long = eng.generate([prompt(20)], SamplingParams(max_tokens=100, temperature=0))[0]
    assert (short.finish_reason, short.completion_tokens) == ("length", 5)
    # 32 positions: the 20-token prompt, 12 fed answer tokens, and the last one sampled
    assert (long.finish_reason, long.completion_tokens) == ("length", 13)


def test_text_stream_holds_back_partial_characters_and_stop_prefixes(tok):
    stream = TextStream(tok, stop=("mat.",))
    pieces = [stream.push(t) for t in tok("é the cat sat on the mat. no").input_ids[1:]]
    assert "\ufffd" not in "".join(pieces)
    assert stream.stopped and stream.text == "é the cat sat on the " == "".join(pieces)
    held = TextStream(tok, stop=("the end",))
    assert "".join(held.push(t) for t in tok("a dog the e").input_ids[1:]) == "a dog "
    assert held.flush() == "the e"  # no stop after all: released at the end


# -- engine: prefix cache --------------------------------------------------------------------


def test_prefix_cache_hits_a_follow_up_turn(model, tok):
    turn1 = Prompt(
        tok("<start_of_turn>user what is this?<end_of_turn><start_of_turn>model").input_ids
    )
    with engine(model, tok) as eng:
        first = eng.generate([turn1], GREEDY)[0]
        turn2 = Prompt(
            turn1.token_ids
            + first.token_ids
            + tok("<end_of_turn> a dog", add_special_tokens=False).input_ids
        )
        second = eng.generate([turn2], GREEDY)[0]
        assert eng.stats()["prefix_hits"] == 1
    with engine(model, tok, prefix_cache_size=0) as cold:
        reference = cold.generate([turn2], GREEDY)[0]
    # the answer's last token was sampled but never fed, so its KV is not cached
    assert second.cached_tokens == len(turn1.token_ids) + len(first.token_ids) - 1
    assert reference.cached_tokens == 0
    assert second.token_ids == reference.token_ids


def test_prefix_cache_keys_embed_spans_by_their_key(model, tok):
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    ids = prompt(20).token_ids
    ids[5:11] = [6] * 6  # placeholder tokens

    def with_span(key: str) -> Prompt:
        return Prompt(list(ids), [EmbedSpan(5, torch.randn(6, hidden, generator=g), key)])

    a, b = with_span("img-a"), with_span("img-b")
    with engine(model, tok) as eng:
        eng.generate([a], GREEDY)
        again = eng.generate(
            [Prompt(list(ids), [EmbedSpan(5, a.spans[0].embeds, "img-a")])], GREEDY
        )[0]
        other = eng.generate([b], GREEDY)[0]
    with engine(model, tok, prefix_cache_size=0) as cold:
        reference = cold.generate([b], GREEDY)[0]
    assert again.cached_tokens == 19  # all but the last prompt position
    assert other.cached_tokens == 5  # up to the span only
    assert other.token_ids == reference.token_ids


# -- engine: cancellation, errors, async -----------------------------------------------------


def test_cancel_frees_the_slot(model, tok):
    with engine(model, tok, max_slots=1, max_len=4096) as eng:
        gen = eng.submit(prompt(8), SamplingParams(max_tokens=10_000, temperature=0))
        next(iter(gen))
        gen.cancel()
        assert gen.result(timeout=10).finish_reason == "cancelled"
        stats = eng.stats()
        assert (stats["active"], stats["free_slots"]) == (0, 1)
        assert eng.generate([prompt(5)], GREEDY)[0].finish_reason == "length"


class Boom(RuntimeError):
    pass


class FailingConstraint:
    """Allows anything, then raises on its third mask."""

    def __init__(self):
        self.calls = 0

    def mask(self):
        self.calls += 1
        if self.calls == 3:
            raise Boom("grammar broke")
        return None

    def accept(self, token_id):
        pass

    def is_finished(self):
        return False


class EvenTokens:
    """Only even token ids; finished after four tokens."""

    def __init__(self):
        self.accepted = []

    def mask(self):
        return torch.arange(512) % 2 == 0

    def accept(self, token_id):
        self.accepted.append(token_id)

    def is_finished(self):
        return len(self.accepted) == 4


def test_a_failing_constraint_fails_its_request_only(model, tok):
    others = [prompt(7, 1), prompt(14, 2)]
    with engine(model, tok) as eng:
        expected = [c.token_ids for c in eng.generate(others, GREEDY)]
        bad = SamplingParams(max_tokens=16, temperature=0, constraint=FailingConstraint)
        gens = [
            eng.submit(others[0], GREEDY),
            eng.submit(prompt(9), bad),
            eng.submit(others[1], GREEDY),
        ]
        with pytest.raises(Boom):
            gens[1].result()
        with pytest.raises(Boom):
            list(gens[1])
        assert [gens[0].result().token_ids, gens[2].result().token_ids] == expected
        assert eng.stats()["free_slots"] == 4


def test_constraint_masks_and_finishes(model, tok):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=0, constraint=EvenTokens)
    with engine(model, tok) as eng:
        done = eng.generate([prompt(6)], params)[0]
    assert done.finish_reason == "stop" and len(done.token_ids) == 4
    assert all(t % 2 == 0 for t in done.token_ids)


def test_async_iteration_does_not_block_the_event_loop(model, tok):
    async def main(eng):
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        gen = eng.submit(prompt(10), SamplingParams(max_tokens=30, temperature=0))
        deltas = [d async for d in gen.aiter()]
        task.cancel()
        return gen, deltas, ticks

    with engine(model, tok) as eng:
        gen, deltas, ticks = asyncio.run(main(eng))
    assert len(deltas) == 30 and deltas[-1].finish_reason == "length"
    assert [t for d in deltas for t in d.token_ids] == gen.result().token_ids
    assert ticks > 1


def test_bad_requests_are_refused_and_close_fails_pending(model, tok):
    eng = engine(model, tok, max_slots=1, max_len=4096)
    with pytest.raises(ValueError, match="max_len"):
        eng.submit(prompt(5000))
    with pytest.raises(ValueError, match="span"):
        eng.submit(Prompt([2, 3, 4], [EmbedSpan(2, torch.zeros(2, 32), "x")]))
    gens = [
        eng.submit(prompt(5), SamplingParams(max_tokens=10_000, temperature=0)) for _ in range(2)
    ]
    time.sleep(0.05)
    eng.close()
    for gen in gens:
        with pytest.raises(RuntimeError, match="closed"):
            gen.result(timeout=5)
    with pytest.raises(RuntimeError, match="closed"):
        eng.submit(prompt(5))
