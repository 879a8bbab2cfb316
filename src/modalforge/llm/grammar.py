"""JSON-constrained decoding (OpenAI ``response_format``) on top of llguidance.

The engine asks a :class:`~modalforge.llm.types.Constraint` for the allowed next tokens at every
step, so the per-token cost matters more than anything else here. llguidance (the grammar engine
behind vLLM's and llama.cpp's structured outputs) computes that set as a bitmask from a token
trie in tens of microseconds; what is expensive is building its view of the tokenizer (seconds
for Gemma's 262,144 tokens) and, for large schemas, compiling the grammar against it. Both are
therefore cached: the tokenizer view once per tokenizer object, the compiled grammar once per
(tokenizer, schema) as a template matcher, and every sequence gets a cheap ``deep_copy`` of it.

End of the JSON: a top-level object (or array, or string) closes with a byte after which
llguidance's JSON grammar allows nothing more, not even whitespace. The matcher then reports
"stopped" and :meth:`JsonConstraint.is_finished` turns true right after the closing token, so the
engine stops with finish_reason "stop" and the text is the JSON and nothing else: no trailing
whitespace the model might ramble on with, and no end-of-sequence token that the engine would
have to strip. Only where the grammar accepts *and* could go on (a top-level number: ``12`` or
``123``) does the mask also allow the end-of-sequence ids, and accepting one of them finishes.

Whitespace between JSON tokens is allowed (models are trained on pretty-printed JSON, and
forcing one layout fights their tokenization) but bounded per gap: with llguidance's default,
unbounded whitespace, a weak model can emit newline tokens until ``max_tokens`` and return
nothing parseable -- a known failure of JSON modes.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch

# At most this much whitespace between two JSON tokens: enough for a newline and indentation
# several levels deep, too little for a runaway. Spaces, newlines, tabs, CR: JSON's whitespace.
WHITESPACE_PATTERN = r"[\x20\x0A\x0D\x09]{0,24}"
# Compiled grammars kept per tokenizer; a server sees a few schemas over and over.
GRAMMAR_CACHE_SIZE = 32
# Tokens that end a turn besides the tokenizer's eos: the chat templates end the assistant's
# turn with these, so a chat engine stops on them.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")

_lock = threading.Lock()


class _TokenizerGrammars:
    """llguidance's view of one tokenizer, and the grammars compiled against it.

    The grammar cache lives here rather than in a global keyed by ids, so a template matcher can
    never outlive (or be confused with another) tokenizer it was compiled for."""

    def __init__(self, tokenizer) -> None:
        import llguidance.hf

        # slices=None: llguidance's default slicer, which speeds up masks inside strings, the
        # bulk of JSON text. The eos given here is only llguidance's own; the constraint decides
        # which end ids to allow (see JsonConstraint.mask).
        self.lltok = llguidance.hf.from_tokenizer(tokenizer)
        self.mask_bytes = (self.lltok.vocab_size + 31) // 32 * 4
        # get_vocab() builds a dict of the whole vocabulary (~0.2 s for Gemma): once, here.
        vocab = tokenizer.get_vocab()
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.default_end_ids = tuple(
            sorted(eos | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab})
        )
        self.grammars: OrderedDict[str, object] = OrderedDict()

    def template(self, schema_key: str, schema: dict):
        """A matcher at the start of the grammar for ``schema``, compiled once (LRU)."""
        with _lock:
            if schema_key in self.grammars:
                self.grammars.move_to_end(schema_key)
                return self.grammars[schema_key]
        matcher = _compile(self.lltok, schema)
        with _lock:
            self.grammars[schema_key] = matcher
            while len(self.grammars) > GRAMMAR_CACHE_SIZE:
                self.grammars.popitem(last=False)
        return matcher


# tokenizer -> its llguidance view. Weak keys: dropping a tokenizer frees the (large) trie.
_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_grammars(tokenizer) -> _TokenizerGrammars:
    with _lock:
        found = _tokenizers.get(tokenizer)
    if found is not None:
        return found
    built = _TokenizerGrammars(tokenizer)  # seconds for a large vocabulary: outside the lock
    with _lock:
        return _tokenizers.setdefault(tokenizer, built)


def _check_schema(schema: dict) -> None:
    """Reject what is not a JSON schema with jsonschema's own message (it names the offending
    keyword and where it is), before llguidance sees it. Runs on a cache miss only: checking
    against the metaschema costs about a millisecond."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"invalid JSON schema at {where}: {e.message}") from None


def _compile(lltok, schema: dict):
    """Compile ``schema`` into a fresh matcher; ValueError for what llguidance cannot do.

    llguidance refuses schemas that are well-formed but that it does not implement (unknown or
    unsupported keywords: it is not lenient, so nothing is silently unconstrained), unresolvable
    ``$ref``s and unsatisfiable ones (a required property that is forbidden)."""
    from llguidance import LLMatcher

    _check_schema(schema)
    try:
        grammar = LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_pattern": WHITESPACE_PATTERN}
        )
    except ValueError as e:
        raise ValueError(f"invalid JSON schema: {e}") from None
    error = LLMatcher.validate_grammar(grammar, lltok)
    if error:
        raise ValueError(f"unsupported JSON schema: {error}")
    matcher = LLMatcher(lltok, grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(f"unsupported JSON schema: {matcher.get_error()}")
    return matcher


class JsonConstraint:
    """The grammar state of one sequence: a llguidance matcher plus the vocabulary padding.

    Not thread-safe (one sequence, one decoding loop); the factory that made it is."""

    def __init__(self, matcher, grammars: _TokenizerGrammars, vocab_size: int, end_ids):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._mask_bytes = grammars.mask_bytes  # exactly llguidance's vocabulary, in 32-bit words
        ids = np.asarray(end_ids, dtype=np.int64)
        self._end_ids = ids[ids < vocab_size]
        self._end_set = frozenset(end_ids)
        eos = np.asarray(grammars.lltok.eos_tokens, dtype=np.int64)
        self._llg_eos = eos[eos < vocab_size]
        # One bit per id of the *model's* vocabulary; bytes past llguidance's part stay zero, so
        # padded embedding rows (ids the tokenizer never produces) are always disallowed.
        self._bits = np.zeros(max(self._mask_bytes, (vocab_size + 7) // 8), dtype=np.uint8)
        self._ended = False

    def mask(self) -> torch.Tensor:
        """Bool tensor [vocab_size]: llguidance fills the bitmask in place (no Python per token)
        and numpy's unpackbits expands it in one pass (~15 us for 262,144 ids)."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._mask_bytes)
        allowed = np.unpackbits(self._bits, count=self._vocab_size, bitorder="little")
        allowed = allowed.view(np.bool_)
        # The end ids are ours to choose: llguidance's eos (the tokenizer's) only where we were
        # given it, and the engine's end-of-turn ids too, exactly when the JSON may end here.
        allowed[self._llg_eos] = False
        if self._matcher.is_accepting():
            allowed[self._end_ids] = True
        return torch.from_numpy(allowed)

    def accept(self, token_id: int) -> None:
        """Advance past ``token_id``. An end id finishes the sequence (the JSON was complete); a
        token the mask did not allow is a bug in the caller and raises rather than letting the
        sequence silently leave the grammar."""
        token_id = int(token_id)
        if token_id in self._end_set and self._matcher.is_accepting():
            self._ended = True
            return
        if self._ended or not self._matcher.consume_token(token_id):
            raise RuntimeError(
                f"token {token_id} is not allowed by the JSON grammar here: "
                f"{self._matcher.get_error() or 'the sequence already ended'}"
            )

    def is_finished(self) -> bool:
        """True once the JSON is complete and nothing may follow it (the closing brace of an
        object), or after an end id was accepted."""
        return self._ended or self._matcher.is_stopped()


class JsonConstraintFactory:
    """A zero-argument callable giving a fresh :class:`JsonConstraint` per sequence (the
    engine's ``SamplingParams.constraint``). Copying the compiled template costs microseconds;
    the template itself is never advanced."""

    def __init__(self, grammars: _TokenizerGrammars, template, vocab_size: int, end_ids):
        self._grammars = grammars  # keeps the tokenizer view (and its trie) alive
        self._template = template
        self._vocab_size = vocab_size
        self._end_ids = tuple(end_ids)

    def __call__(self) -> JsonConstraint:
        return JsonConstraint(
            self._template.deep_copy(), self._grammars, self._vocab_size, self._end_ids
        )


def json_constraint(
    tokenizer,
    vocab_size: int,
    schema: dict | None = None,
    *,
    eos_token_ids: Iterable[int] | None = None,
) -> JsonConstraintFactory:
    """Constrain generation to JSON: any JSON object when ``schema`` is None (OpenAI's
    ``response_format={"type": "json_object"}``), else an instance of the JSON schema
    (``{"type": "json_schema", ...}``'s ``schema``).

    ``tokenizer`` is a fast Hugging Face tokenizer; ``vocab_size`` is the size of the model's
    logits, which may exceed the tokenizer's (padded embedding): the extra ids are never allowed.
    ``eos_token_ids`` are the ids that may end the sequence where the JSON may end without
    closing (a top-level number); None means the tokenizer's eos plus any end-of-turn token it
    has (``<end_of_turn>`` for Gemma).

    Raises ValueError, with the reason, for an invalid or unsupported schema (an HTTP 400) and
    for a ``vocab_size`` smaller than the tokenizer's. The compile happens here, not per
    sequence, so a bad schema fails before anything is queued."""
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise ValueError(f"JSON schema must be an object, got {type(schema).__name__}")
    try:
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"JSON schema is not JSON-serializable: {e}") from None
    grammars = _tokenizer_grammars(tokenizer)
    if vocab_size < grammars.lltok.vocab_size:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the tokenizer's "
            f"{grammars.lltok.vocab_size}: the grammar could require an id the model lacks"
        )
    template = grammars.template(key, schema)
    if eos_token_ids is None:
        end_ids = grammars.default_end_ids
    else:
        end_ids = tuple(sorted({int(i) for i in eos_token_ids}))
    return JsonConstraintFactory(grammars, template, vocab_size, end_ids)
