"""Modality dropout: hide whole modalities at random in training, so the model learns to cope
with missing ones and does not lean on a single dominant modality."""

from __future__ import annotations

import torch


def modality_dropout(
    mask: dict[str, torch.Tensor], p: float, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """A new presence mask ``{name: (B,) bool}`` with each present modality of each row dropped
    with probability ``p``, except that a row keeps at least one of the modalities it had (one
    picked uniformly among them when all would be dropped). Rows with none present stay so.

    Call it on training batches only. ``p = 0`` returns the mask unchanged, drawing nothing from
    the generator. Modalities absent from ``mask`` (present everywhere, to a fusion) are not
    touched and are not counted.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], not {p}")
    if p == 0.0 or not mask:
        return {k: v.bool() for k, v in mask.items()}
    keys = sorted(mask)
    present = torch.stack([mask[k].bool().reshape(-1) for k in keys], dim=1)  # (B, M)
    device = present.device
    drop = torch.rand(present.shape, generator=generator, device=device) < p
    kept = present & ~drop
    emptied = present.any(dim=1) & ~kept.any(dim=1)  # (B,)
    # a uniformly random present modality per row: the argmax of random scores over present ones
    scores = torch.rand(present.shape, generator=generator, device=device).masked_fill(~present, -1)
    rescue = torch.zeros_like(present).scatter(1, scores.argmax(dim=1, keepdim=True), True)
    kept = kept | (rescue & emptied.unsqueeze(1))
    return {k: kept[:, i].reshape(mask[k].shape) for i, k in enumerate(keys)}
