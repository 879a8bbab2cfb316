"""Magnitude pruning of a model's linear and convolution weights, and a sparsity report.

* ``magnitude_prune(module, amount)``: unstructured, the ``amount`` share of the smallest
  weights (by absolute value) over all the included layers together is set to zero
  (``torch.nn.utils.prune.global_unstructured`` with L1), so layers with many small weights
  lose more; ``structured=True``: in each included layer, the ``amount`` share of its output
  channels (rows of a linear weight, filters of a convolution) with the smallest L2 norm is
  zeroed (``ln_structured``, ``n=2``, ``dim=0``). Tensors keep their shapes either way (the
  zeros are stored; structured pruning does not shrink layers, so the exported graph and the
  bundle's tensors are unchanged in shape); biases are left alone.
* ``sparsity_report(module)``: the share of zero weights per layer and over the included
  layers, plus whole zero output channels per layer.

Depthwise convolutions (``groups == in_channels``, one filter per channel) are skipped by
structured pruning: zeroing one of their filters silences its channel for every later layer (a
constant after batch norm) while saving only ``k*k`` weights, the worst trade there is.
Unstructured pruning includes them. ``skip`` leaves named layers (and their children) out,
e.g. a classifier whose output rows are classes.

**Pruning + fine-tuning.** Pruning hurts accuracy; a short fine-tune recovers most of it. The
trainer does that part:

1. ``magnitude_prune(model, amount, permanent=False)``: the masks stay attached (PyTorch's
   ``weight_orig`` parameter + ``weight_mask`` buffer, the weight recomputed as their product
   before every forward), so the pruned weights stay zero while the optimizer updates the rest;
2. fine-tune a few epochs with the existing trainer at a low learning rate (the masked weights
   get zero gradients through the mask);
3. ``make_permanent(model)`` (or prune with the default ``permanent=True`` when there is no
   fine-tune): the masks are folded into plain ``weight`` tensors, so the state dict holds no
   ``*_orig`` / ``*_mask`` entries and saves to safetensors like any other model; then
   ``sparsity_report`` for the record.

A fine-tune after ``make_permanent`` would regrow the zeros. Zeros alone do not make ONNX
Runtime faster (its kernels are dense); they make weights compress better and, structured, mark
channels that a later export could remove.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import prune

DEFAULT_LAYERS: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def is_depthwise(layer: nn.Module) -> bool:
    """A convolution with one filter group per input channel (depthwise)."""
    return (
        isinstance(layer, nn.modules.conv._ConvNd)
        and layer.groups > 1
        and layer.groups == layer.in_channels
    )


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def _layers(module: nn.Module, include: tuple[type, ...], skip: Iterable[str] = (),
            structured: bool = False) -> list[tuple[str, nn.Module]]:  # fmt: skip
    """(name, layer) of the included layers with a weight, each weight once (shared layers and
    tied weights are counted once)."""
    skip = tuple(skip)
    seen: set[int] = set()
    found = []
    for name, layer in module.named_modules():
        if not isinstance(layer, include) or _skipped(name, skip):
            continue
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or (structured and is_depthwise(layer)):
            continue
        # a layer with an attached pruning mask: its weight is recomputed from weight_orig
        key = id(getattr(layer, "weight_orig", weight))
        if key in seen:
            continue
        seen.add(key)
        found.append((name, layer))
    return found


def sparsity_report(
    module: nn.Module, include: tuple[type, ...] = DEFAULT_LAYERS, skip: Iterable[str] = ()
) -> dict:
    """Zero weights of ``module``'s ``include`` layers (``skip``: names left out).

    Returns ``{"layers": {name: {"type", "shape", "params", "zeros", "sparsity",
    "zero_rows", "rows"}}, "global": {"params", "zeros", "sparsity"}, "model": {"params",
    "zeros", "sparsity"}}``: ``zero_rows`` counts output channels whose weights are all zero;
    ``global`` sums over the listed layers, ``model`` over every parameter of ``module``.
    """
    layers = {}
    total = zeros = 0
    with torch.no_grad():
        for name, layer in _layers(module, include, skip):
            weight = layer.weight.detach()
            count, zero = weight.numel(), int((weight == 0).sum())
            rows = weight.reshape(weight.shape[0], -1) if weight.dim() else weight.reshape(1, 1)
            layers[name] = {
                "type": type(layer).__name__,
                "shape": list(weight.shape),
                "params": count,
                "zeros": zero,
                "sparsity": zero / count if count else 0.0,
                "rows": rows.shape[0],
                "zero_rows": int((rows == 0).all(dim=1).sum()),
            }
            total, zeros = total + count, zeros + zero
        params = {id(p): p.detach() for p in module.parameters()}
        model_total = sum(p.numel() for p in params.values())
        model_zeros = sum(int((p == 0).sum()) for p in params.values())
    return {
        "layers": layers,
        "global": {"params": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0},
        "model": {"params": model_total, "zeros": model_zeros,
                  "sparsity": model_zeros / model_total if model_total else 0.0},
    }  # fmt: skip


def make_permanent(module: nn.Module) -> int:
    """Fold every attached pruning mask into its plain weight (``prune.remove``), so the state
    dict has no ``*_orig`` / ``*_mask`` entries. Returns how many tensors were folded."""
    folded = 0
    for layer in module.modules():
        for hook in list(layer._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(layer, hook._tensor_name)
                folded += 1
    return folded


def magnitude_prune(
    module: nn.Module,
    amount: float,
    structured: bool = False,
    include: tuple[type, ...] = DEFAULT_LAYERS,
    skip: Iterable[str] = (),
    permanent: bool = True,
) -> dict:
    """Magnitude-prune ``module`` in place; returns its ``sparsity_report`` afterwards.

    ``amount`` in [0, 1): unstructured, the share of all the included layers' weights (the
    smallest by absolute value, over the layers together) set to zero; ``structured``, the
    share of each layer's output channels (smallest L2 norm) zeroed, depthwise convolutions
    skipped. ``include``: layer types pruned; ``skip``: layer names (and their children) left
    alone. ``permanent``: fold the masks into the weights (see the module docstring for
    keeping them through a fine-tune). Shapes never change.
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    skip = tuple(skip)
    layers = _layers(module, include, skip, structured=structured)
    if amount > 0 and layers:
        if structured:
            for _, layer in layers:
                prune.ln_structured(layer, "weight", amount=amount, n=2, dim=0)
        else:
            prune.global_unstructured(
                [(layer, "weight") for _, layer in layers],
                pruning_method=prune.L1Unstructured,
                amount=amount,
            )
    if permanent:
        make_permanent(module)
    report = sparsity_report(module, include, skip)
    report["pruning"] = {"amount": amount, "structured": structured,
                         "layers_pruned": [name for name, _ in layers],
                         "permanent": permanent}  # fmt: skip
    return report
