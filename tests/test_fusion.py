"""Every registered fusion, at its tiny config: shapes, gradients, missing modalities, ONNX."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from modalforge.fusion import (
    Fusion,
    FusionOutput,
    create_fusion,
    list_fusions,
    modality_dropout,
    register_fusion,
)

DIMS = {"audio": 5, "image": 7, "text": 6}
KEYS = sorted(DIMS)
BATCH = 4
OUT = 3
EXPECTED = {"attention", "concat", "cross_attention", "early", "late", "lmf", "product", "tensor"}
# the fusions that return per-modality weights; the others return None
WITH_WEIGHTS = {"attention", "cross_attention", "late"}

# every registered fusion at its tiny config, plus the non-default options worth covering
REGISTERED = [pytest.param(info.name, info.tiny, id=info.name) for info in list_fusions()]
CASES = [
    *REGISTERED,
    pytest.param("late", {"width": 32, "weighting": "learned"}, id="late-learned"),
    pytest.param("attention", {"width": OUT, "project_output": False}, id="attention-noproj"),
]
# the dynamo exporter takes a second or two a model: the registered configs only
EXPORT_CASES = [
    *(pytest.param(*c.values, True, id=f"dynamo-{c.id}") for c in REGISTERED),
    *(pytest.param(*c.values, False, id=f"torchscript-{c.id}") for c in CASES),
]


def make(name: str, overrides: dict, dims: dict[str, int] = DIMS, seed: int = 0) -> Fusion:
    torch.manual_seed(seed)
    return create_fusion(name, dims, OUT, **overrides)


def features(batch: int = BATCH, dims: dict[str, int] = DIMS, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, d, generator=gen) for k, d in dims.items()}


def all_masks(keys: list[str] = KEYS) -> dict[str, torch.Tensor]:
    """One row per subset of present modalities (2^M rows, the first with none present)."""
    rows = torch.tensor(list(itertools.product([False, True], repeat=len(keys))))
    return {k: rows[:, i] for i, k in enumerate(keys)}


def test_registry() -> None:
    infos = list_fusions()
    assert {i.name for i in infos} == EXPECTED
    assert [i.name for i in infos] == sorted(EXPECTED)
    assert {i.name for i in infos if i.produces_outputs} == {"late"}
    assert all(i.description and callable(i.factory) for i in infos)
    assert create_fusion("concat", DIMS, OUT).name == "concat"
    with pytest.raises(KeyError, match="unknown fusion"):
        create_fusion("nope", DIMS, OUT)
    with pytest.raises(ValueError, match="registered twice"):
        register_fusion("concat", "again")(Fusion)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one modality"):
        create_fusion("concat", {}, OUT)
    with pytest.raises(KeyError, match="lack modalities"):
        create_fusion("concat", DIMS, OUT)({"audio": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="weighting"):
        create_fusion("late", DIMS, OUT, weighting="max")
    with pytest.raises(ValueError, match="divisible"):
        create_fusion("cross_attention", DIMS, OUT, width=30, heads=4)
    with pytest.raises(ValueError, match="project_output"):
        create_fusion("attention", DIMS, OUT, width=8, project_output=False)


@pytest.mark.parametrize(("name", "overrides"), CASES)
def test_output_shape(name: str, overrides: dict) -> None:
    fusion = make(name, overrides)
    out = fusion(features())
    assert isinstance(out, FusionOutput)
    assert out.fused.shape == (BATCH, OUT)
    assert (out.weights is not None) == (name in WITH_WEIGHTS)
    if out.weights is not None:
        assert out.weights.shape == (BATCH, len(KEYS))
    # no mask means all present
    everyone = {k: torch.ones(BATCH, dtype=torch.bool) for k in KEYS}
    fusion.eval()
    torch.testing.assert_close(fusion(features()).fused, fusion(features(), everyone).fused)


@pytest.mark.parametrize(("name", "overrides"), CASES)
def test_backward_reaches_every_parameter(name: str, overrides: dict) -> None:
    fusion = make(name, overrides).train()
    out = fusion(features())
    # a random projection of the output, so that no gradient cancels by symmetry
    (out.fused * torch.randn(out.fused.shape)).sum().backward()
    for pname, p in fusion.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
        # whole tensors: in cross_attention the key slice of in_proj_bias gets an exactly zero
        # gradient (softmax ignores a shift shared by all keys), the query/value slices do not
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize(("name", "overrides"), CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_subset_missing_is_finite(name: str, overrides: dict, training: bool) -> None:
    fusion = make(name, overrides).train(training)
    mask = all_masks()
    out = fusion(features(len(mask["audio"])), mask)
    assert torch.isfinite(out.fused).all()
    loss = out.fused.sum()
    if out.weights is not None:
        assert torch.isfinite(out.weights).all()
        loss = loss + out.weights.square().sum()
    loss.backward()
    for pname, p in fusion.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize(("name", "overrides"), CASES)
@pytest.mark.parametrize("n", [1, 2])
def test_fewer_modalities(name: str, overrides: dict, n: int) -> None:
    dims = {k: DIMS[k] for k in KEYS[:n]}
    fusion = make(name, overrides, dims=dims).eval()
    mask = all_masks(sorted(dims))
    rows = len(mask[KEYS[0]])
    out = fusion(features(rows, dims=dims), mask)
    assert out.fused.shape == (rows, OUT)
    assert torch.isfinite(out.fused).all()
    if out.weights is not None:
        assert out.weights.shape == (rows, n)


@pytest.mark.parametrize(("name", "overrides"), CASES)
def test_missing_modality_has_no_influence(name: str, overrides: dict) -> None:
    fusion = make(name, overrides).eval()
    mask = all_masks()
    rows = len(mask["audio"])
    base = features(rows)
    ref = fusion(base, mask)
    for k in KEYS:
        for junk in (torch.randn(rows, DIMS[k]) * 1e3, torch.full((rows, DIMS[k]), float("nan"))):
            changed = dict(base)
            changed[k] = torch.where(mask[k].unsqueeze(1), base[k], junk)
            out = fusion(changed, mask)
            torch.testing.assert_close(out.fused, ref.fused, rtol=0, atol=0)
            if ref.weights is not None:
                torch.testing.assert_close(out.weights, ref.weights, rtol=0, atol=0)
    # while a present one does, whatever else is missing in its row
    for k in KEYS:
        changed = {**base, k: base[k] + 1.0}
        moved = (fusion(changed, mask).fused - ref.fused).abs().amax(dim=1) > 1e-6
        assert moved[mask[k]].all(), k


@pytest.mark.parametrize(("name", "overrides"), CASES)
def test_deterministic_under_seed(name: str, overrides: dict) -> None:
    a, b = make(name, overrides), make(name, overrides)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    mask = all_masks()
    x = features(len(mask["audio"]))
    torch.manual_seed(7)  # train mode: dropout draws from the global generator
    out_a = a.train()(x, mask).fused
    torch.manual_seed(7)
    torch.testing.assert_close(b.train()(x, mask).fused, out_a, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "overrides"), CASES)
def test_weights_sum_to_one_over_present(name: str, overrides: dict) -> None:
    fusion = make(name, overrides).eval()
    mask = all_masks()
    out = fusion(features(len(mask["audio"])), mask)
    if name not in WITH_WEIGHTS:
        assert out.weights is None
        return
    present = torch.stack([mask[k] for k in KEYS], dim=1)
    w = out.weights
    assert (w >= 0).all()
    assert (w[~present] == 0).all()
    sums = w.sum(dim=1)
    torch.testing.assert_close(sums[present.any(1)], torch.ones(int(present.any(1).sum())))
    assert (sums[~present.any(1)] == 0).all()  # nothing present: all-zero weights


@pytest.mark.parametrize(("name", "overrides"), CASES)
def test_key_order_does_not_matter(name: str, overrides: dict) -> None:
    fusion = make(name, overrides).eval()
    mask = all_masks()
    x = features(len(mask["audio"]))
    ref = fusion(x, mask)
    out = fusion(dict(reversed(x.items())), dict(reversed(mask.items())))
    torch.testing.assert_close(out.fused, ref.fused, rtol=0, atol=0)


class Flat(nn.Module):
    """A fusion taking positional tensors, ONNX-style: the features, then the (B,) bool masks,
    both in sorted key order; returns ``fused`` or ``(fused, weights)``."""

    def __init__(self, fusion: Fusion) -> None:
        super().__init__()
        self.fusion = fusion

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        keys, n = self.fusion.keys, len(self.fusion.keys)
        out = self.fusion(
            dict(zip(keys, tensors[:n], strict=True)), dict(zip(keys, tensors[n:], strict=True))
        )
        return out.fused if out.weights is None else (out.fused, out.weights)


@pytest.mark.parametrize(("name", "overrides", "dynamo"), EXPORT_CASES)
def test_onnx_export_matches_torch(name: str, overrides: dict, dynamo: bool, tmp_path) -> None:
    flat = Flat(make(name, overrides)).eval()
    names = [*KEYS, *(f"{k}_mask" for k in KEYS)]
    x = features(2)
    example = (*(x[k] for k in KEYS), *(torch.ones(2, dtype=torch.bool) for _ in KEYS))
    path = tmp_path / f"{name}.onnx"  # the dynamo exporter puts the weights in {name}.onnx.data
    with warnings.catch_warnings():
        # torch's own: pytree and TorchScript-exporter deprecations, tracer and axis-name notes
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                flat,
                example,
                path,
                input_names=names,
                dynamic_shapes=(tuple({0: batch} for _ in names),),
                dynamo=True,
                verbose=False,
            )
        else:
            torch.onnx.export(
                flat,
                example,
                path,
                input_names=names,
                dynamic_axes={n: {0: "batch"} for n in names},
                dynamo=False,
            )

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = features(5, seed=3)
    mask = {
        "audio": torch.tensor([1, 0, 1, 0, 0], dtype=torch.bool),
        "image": torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool),
        "text": torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool),
    }
    inputs = [*(x[k] for k in KEYS), *(mask[k] for k in KEYS)]
    got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
    with torch.no_grad():
        want = flat(*inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-4)


def random_mask(batch: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = {k: torch.rand(batch, generator=gen) < 0.7 for k in KEYS}
    mask["audio"][:3] = False  # a few rows with nothing present
    mask["image"][:3] = False
    mask["text"][:3] = False
    return mask


@pytest.mark.parametrize("p", [0.3, 0.5, 0.9, 1.0])
def test_modality_dropout_never_empties_a_row(p: float) -> None:
    mask = random_mask(2000, seed=0)
    dropped = modality_dropout(mask, p, generator=torch.Generator().manual_seed(1))
    before = torch.stack([mask[k] for k in KEYS], dim=1)
    after = torch.stack([dropped[k] for k in KEYS], dim=1)
    assert after.dtype == torch.bool
    assert not (after & ~before).any()  # only drops
    assert (after.any(1) == before.any(1)).all()  # rows with something keep something
    if p == 1.0:
        assert (after.sum(1) == before.any(1).long()).all()
    # rows with all three present keep 3(1 - p) modalities on average, plus one where all three
    # were dropped (probability p^3)
    full = before.all(1)
    kept = after[full].sum(1).float().mean()
    assert abs(kept - (3 * (1 - p) + p**3)) < 0.15
    # the kept-last modality is picked uniformly, not always the first key
    only_one = full & (after.sum(1) == 1)
    assert (after[only_one].sum(0) > 0).all()


def test_modality_dropout_p0_and_seed() -> None:
    mask = random_mask(50, seed=2)
    same = modality_dropout(mask, 0.0)
    assert same.keys() == mask.keys()
    assert all(torch.equal(same[k], mask[k]) for k in KEYS)
    a = modality_dropout(mask, 0.5, generator=torch.Generator().manual_seed(3))
    b = modality_dropout(mask, 0.5, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in KEYS)
    with pytest.raises(ValueError):
        modality_dropout(mask, 1.5)
