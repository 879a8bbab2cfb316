"""A tiny random Gemma-3 and a byte-level tokenizer for tests of the chat LLM (no download: the
tokenizer is trained here, in well under a second, on the text below).

The tokenizer has Gemma's special tokens at Gemma's ids where they matter to the chat format
(<pad> 0, <eos> 1, <bos> 2, <unk> 3, then <start_of_turn>, <end_of_turn>, and the soft-token
placeholders <unused0> / <unused1>), so code written for the real tokenizer runs unchanged.
"""

from __future__ import annotations

import functools

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<unused0>",
           "<unused1>", "<start_of_image>", "<end_of_image>"]  # fmt: skip
CORPUS = [
    "what is this? a grinning face. a red apple. a dog. the cat sat on the mat.",
    "is this a face? yes. no. which category is this? smileys and emotion. animals and nature.",
    "what is said in this clip? seven. three. do these match? they match. they do not match.",
    '{"name": "apple", "count": 3, "ok": true, "tags": ["red", "fruit"]} [1, 2.5, -3, null]',
    "The quick brown fox jumps over the lazy dog. 0123456789 user model system assistant",
]
VOCAB = 512


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` with every byte, so any text (and any JSON) is encodable."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )  # fmt: skip
    tok.add_bos_token = True
    return tok


def tiny_gemma_config(vocab_size: int = VOCAB, **overrides):
    """Gemma-3 text with hidden 32, 2 layers (one sliding-window, one global), like the real one
    in kind: grouped-query attention (2 heads, 1 KV head), q/k norms, two RoPE bases."""
    from transformers import Gemma3TextConfig

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    kwargs.update(overrides)
    return Gemma3TextConfig(**kwargs)


def tiny_gemma(seed: int = 0, **overrides):
    import torch
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(tiny_gemma_config(**overrides)).eval()
    return model
