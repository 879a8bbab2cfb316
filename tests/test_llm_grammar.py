"""JSON-constrained decoding: whatever the logits, the decoded text is JSON valid for the schema.

The logits come from a seeded random source (biased towards closing quotes and brackets so that
random strings and containers end within the budget) or from the tiny random Gemma; the tiny
tokenizer has 442 tokens and the "model" 512, so the padded-vocabulary case is always on.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from modalforge.llm.grammar import JsonConstraint, json_constraint
from tests.tiny_llm import VOCAB, tiny_gemma, tiny_tokenizer

EOS, END_OF_TURN = 1, 5

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "color", "tags"],
}
NESTED = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "score": {"type": "number"}},
                "required": ["id", "score"],
                "additionalProperties": False,
            },
        },
        "note": {"type": ["string", "null"]},
    },
    "required": ["items", "note"],
    "additionalProperties": False,
}
# Every value bounded: any model, even greedy and random, has to finish it.
BOUNDED = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "name": {"type": "string", "maxLength": 8},
    },
    "required": ["ok", "color", "n", "name"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def closers(tok):
    """Ids whose text holds a quote or a closing bracket: what ends strings and containers."""
    return torch.tensor(
        [i for i in range(len(tok)) if any(c in tok.decode([i]) for c in '"]}')], dtype=torch.long
    )


def _random_decode(constraint, seed, closers, max_tokens=3000, bias=3.0):
    """Sample from seeded random logits under the constraint, as the engine does."""
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(max_tokens):
        logits = torch.randn(VOCAB, generator=gen)
        logits[closers] += bias
        mask = constraint.mask()
        assert mask.dtype == torch.bool and mask.shape == (VOCAB,)
        assert mask.any(), "the grammar left no allowed token"
        logits[~mask] = float("-inf")
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        constraint.accept(token)
        ids.append(token)
        if constraint.is_finished():
            return ids
    raise AssertionError(f"not finished after {max_tokens} tokens: {ids[:50]}...")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("schema", [PERSON, NESTED, None], ids=["person", "nested", "object"])
def test_random_logits_give_valid_json(tok, closers, schema, seed):
    factory = json_constraint(tok, VOCAB, schema, eos_token_ids=(EOS, END_OF_TURN))
    ids = _random_decode(factory(), seed, closers)
    text = tok.decode(ids)
    value = json.loads(text)
    jsonschema.validate(value, schema or {"type": "object"})
    # It stopped at the closing brace: nothing after it, and no end token was needed.
    assert text.startswith("{") and text.endswith("}"), text
    assert EOS not in ids and END_OF_TURN not in ids


def test_greedy_tiny_gemma_finishes_bounded_schema(tok):
    model = tiny_gemma(seed=0)
    constraint = json_constraint(tok, VOCAB, BOUNDED)()
    prompt = tok.encode("what is this?")
    ids = []
    with torch.no_grad():
        for _ in range(400):
            logits = model(torch.tensor([prompt + ids])).logits[0, -1]
            logits[~constraint.mask()] = float("-inf")
            ids.append(int(logits.argmax()))
            constraint.accept(ids[-1])
            if constraint.is_finished():
                break
    assert constraint.is_finished(), tok.decode(ids)
    value = json.loads(tok.decode(ids))
    jsonschema.validate(value, BOUNDED)


def test_first_mask_allows_only_an_opening_brace(tok):
    mask = json_constraint(tok, VOCAB)().mask()
    allowed = mask.nonzero().flatten().tolist()
    assert allowed, "nothing allowed"
    assert all(tok.decode([i]).startswith("{") for i in allowed), [tok.decode([i]) for i in allowed]
    assert tok.convert_tokens_to_ids("{") in allowed
    letters = [i for i in range(len(tok)) if tok.decode([i])[:1].isalpha()]
    assert letters and not mask[letters].any()
    assert not mask[len(tok) :].any()  # padded embedding rows
    assert not mask[EOS] and not mask[END_OF_TURN]  # no ending before the JSON


def test_end_ids_allowed_only_where_the_value_may_end(tok):
    """A top-level integer never closes: the end ids become allowed once it may end, and
    accepting one finishes; an object finishes at its closing brace with no end id."""
    c = json_constraint(tok, VOCAB, {"type": "integer"}, eos_token_ids=[END_OF_TURN])()
    assert not c.mask()[END_OF_TURN]
    for t in tok.encode("12", add_special_tokens=False):
        c.accept(t)
    mask = c.mask()
    assert mask[END_OF_TURN] and not mask[EOS]  # only the given end ids
    assert mask[tok.convert_tokens_to_ids("3")] and not c.is_finished()
    c.accept(END_OF_TURN)
    assert c.is_finished()

    c = json_constraint(tok, VOCAB)()
    for t in tok.encode('{"a": [1, 2]', add_special_tokens=False):
        c.accept(t)
        assert not c.is_finished()
    c.accept(tok.convert_tokens_to_ids("}"))
    assert c.is_finished()


def test_default_end_ids_are_eos_and_end_of_turn(tok):
    c = json_constraint(tok, VOCAB, {"type": "number"})()
    c.accept(tok.convert_tokens_to_ids("7"))
    assert c.mask()[[EOS, END_OF_TURN]].all()


def test_disallowed_token_raises(tok):
    c = json_constraint(tok, VOCAB)()
    with pytest.raises(RuntimeError, match="not allowed"):
        c.accept(tok.convert_tokens_to_ids("a"))


def test_factory_gives_independent_constraints(tok):
    factory = json_constraint(tok, VOCAB, PERSON)
    first, second = factory(), factory()
    assert isinstance(first, JsonConstraint) and first is not second
    fresh = second.mask()
    for t in tok.encode('{"name": "bo', add_special_tokens=False):
        first.accept(t)
    assert not torch.equal(first.mask(), fresh)  # first moved on: inside a string now
    assert torch.equal(second.mask(), fresh)
    assert torch.equal(factory().mask(), fresh)  # the compiled template never advances


def test_caches_tokenizer_view_and_compiled_grammar(tok):
    a = json_constraint(tok, VOCAB, {"type": "object", "required": ["x"]})
    b = json_constraint(tok, 600, {"required": ["x"], "type": "object"})  # same, keys reordered
    c = json_constraint(tok, VOCAB, {"type": "object", "required": ["y"]})
    assert a._grammars is b._grammars is c._grammars
    assert a._template is b._template and a._template is not c._template
    assert b().mask().shape == (600,)


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "foo"}, "type"),
        ({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}, "nope"),
        ({"type": "string", "minLength": "x"}, "minLength"),
        ({"type": "object", "required": ["a"], "additionalProperties": False}, "'a'"),
        (["not", "an", "object"], "must be an object"),
    ],
)
def test_invalid_schema_raises_value_error(tok, schema, words):
    with pytest.raises(ValueError, match="schema") as info:
        json_constraint(tok, VOCAB, schema)
    assert words in str(info.value)


def test_vocab_smaller_than_tokenizer_raises(tok):
    with pytest.raises(ValueError, match="vocab_size 100"):
        json_constraint(tok, 100)


def test_whitespace_between_tokens_is_bounded(tok):
    """A model stuck on whitespace cannot run to max_tokens: the gap closes after 24."""
    c = json_constraint(tok, VOCAB)()
    space = tok.convert_tokens_to_ids("Ġ")
    c.accept(tok.convert_tokens_to_ids("{"))
    for _ in range(24):
        assert c.mask()[space]
        c.accept(space)
    mask = c.mask()
    blank = [i for i in range(len(tok)) if tok.decode([i]) and not tok.decode([i]).strip()]
    assert blank and not mask[blank].any()
    assert mask[tok.convert_tokens_to_ids("}")]
