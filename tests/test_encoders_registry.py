"""Every from-scratch encoder in the registry, built tiny, checked the same way
(like timm's parametrized model tests)."""

import pytest
import torch

from modalforge.encoders import create_encoder, list_encoders
from modalforge.encoders.base import EncoderOutput
from modalforge.schema import Modality

SCRATCH = [i for i in list_encoders() if not i.pretrained]


def make_batch(modality: Modality, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if modality is Modality.IMAGE:
        return {"pixels": torch.randn(batch, 3, 30, 30, generator=g)}
    if modality is Modality.TEXT:
        ids = torch.randint(4, 50, (batch, 8), generator=g)
        mask = torch.ones(batch, 8, dtype=torch.long)
        mask[0, 5:] = 0
        ids[0, 5:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    if modality is Modality.AUDIO:
        waves = 0.1 * torch.randn(batch, 8000, generator=g)
        lengths = torch.full((batch,), 8000, dtype=torch.long)
        lengths[0] = 4000
        waves[0, 4000:] = 0
        return {"waves": waves, "wave_lengths": lengths}
    if modality is Modality.GRAPH:
        from modalforge.data.graph import collate_graphs, parse_graph

        graphs = [
            parse_graph({"x": torch.randn(n, 3, generator=g).tolist(), "edges": [[0, 1], [1, 2]]})
            for n in (3, 4, 5)[:batch]
        ]
        return collate_graphs(graphs)
    if modality is Modality.TABULAR:
        return {"values": torch.randn(batch, 3, generator=g)}
    raise AssertionError(modality)


def test_registry_has_every_modality_and_rejects_unknown_names():
    modalities = {i.modality for i in list_encoders()}
    assert {Modality.IMAGE, Modality.TEXT, Modality.AUDIO, Modality.TABULAR} <= modalities
    with pytest.raises(KeyError, match="unknown encoder"):
        create_encoder("nope")


@pytest.mark.parametrize("info", SCRATCH, ids=lambda i: i.name)
def test_forward_shapes_backward_and_determinism(info):
    batch = make_batch(info.modality)
    torch.manual_seed(0)
    enc = create_encoder(info.name, **info.tiny)
    torch.manual_seed(0)
    again = create_encoder(info.name, **info.tiny)
    # the same seed builds the same model: same outputs (eval: no dropout, fixed BN statistics)
    assert torch.equal(enc.eval()(batch).pooled, again.eval()(batch).pooled)
    out = enc.train()(batch)
    assert isinstance(out, EncoderOutput)
    assert out.pooled.shape == (3, enc.output_dim)
    assert torch.isfinite(out.pooled).all()
    if out.sequence is not None:
        assert out.sequence.shape[0] == 3 and out.sequence.ndim == 3
    out.pooled.square().sum().backward()
    no_grad = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("info", SCRATCH, ids=lambda i: i.name)
def test_freeze(info):
    enc = create_encoder(info.name, **info.tiny).freeze()
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # stays in eval mode: frozen batch-norm statistics
    out = enc(make_batch(info.modality))
    assert not out.pooled.requires_grad


def test_encoder_id_tracks_weights_and_preprocessing():
    a = create_encoder("gru", vocab_size=50, max_length=16)
    b = create_encoder("gru", vocab_size=50, max_length=32)
    c = create_encoder("gru", vocab_size=50, max_length=16)
    assert a.encoder_id != b.encoder_id and a.encoder_id == c.encoder_id
    assert a.encoder_id.startswith("gru-")
