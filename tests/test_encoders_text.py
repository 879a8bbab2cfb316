import pytest
import torch

from modalforge.data.text import TextConfig, WordVocab, load_tokenizer, tokenize
from modalforge.encoders import create_encoder


def test_rnn_pooling_ignores_padding():
    torch.manual_seed(0)
    enc = create_encoder("gru", vocab_size=20, embed_dim=8, hidden=8).eval()
    vocab = WordVocab.build(["red green blue"])
    short = tokenize(["red green"], vocab, TextConfig(max_length=6))
    longer = tokenize(["red green"], vocab, TextConfig(max_length=12))
    # a backward GRU reads padding first; masked mean must still only average real steps
    a, b = enc(short).pooled, enc(longer).pooled
    assert a.shape == b.shape == (1, 16)
    assert torch.allclose(a, b, atol=1e-6)
    lstm = create_encoder("lstm", vocab_size=20, embed_dim=8, hidden=8).eval()
    assert torch.allclose(lstm(short).pooled, lstm(longer).pooled, atol=1e-6)
    bag = create_encoder("bag_of_embeddings", vocab_size=20, embed_dim=8).eval()
    assert torch.allclose(bag(short).pooled, bag(longer).pooled, atol=1e-6)


def test_hf_text_from_a_local_folder(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    BertModel(cfg).save_pretrained(tmp_path)
    enc = create_encoder("hf_text", path=str(tmp_path), max_length=16)
    ids = torch.randint(5, 60, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    out = enc({"input_ids": ids, "attention_mask": mask})
    assert out.pooled.shape == (2, 32) and out.sequence.shape == (2, 7, 32)
    assert enc.output_dim == 32
    enc.unfreeze_top(1)
    trainable = {n.split(".")[3] for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"1"}  # only encoder.layer.1


@pytest.mark.weights
def test_minilm_ranks_related_sentences_closer():
    enc = create_encoder("minilm").freeze()
    tok = load_tokenizer("minilm")
    texts = ["a photo of a cat", "a kitten on a sofa", "the stock market fell"]
    with torch.no_grad():
        emb = torch.nn.functional.normalize(enc(tokenize(texts, tok, TextConfig())).pooled, dim=-1)
    assert emb.shape == (3, 384)
    cat_kitten, cat_market = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert cat_kitten > cat_market + 0.2, (cat_kitten, cat_market)
    assert sum(p.numel() for p in enc.parameters()) == 22_713_216
