"""Training the chat model through the project's trainer (``train.loop.fit_module``): batches of
encoded conversations with their cached tower tokens, and the LightningModule of one stage.

A checkpoint holds the trained parameters only (projectors, LoRA adapters) and the optimizer:
the LLM's 268 M frozen weights are the same in every checkpoint and would make each one a
gigabyte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from modalforge.tasks.chat.format import IGNORE, Encoded


@dataclass
class Example:
    """One encoded conversation and its media's tower tokens (None where it has none)."""

    encoded: Encoded
    image: torch.Tensor | None  # (image_tokens, image_dim)
    audio: torch.Tensor | None  # (audio_tokens, audio_dim)


class Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded ``ids`` / ``labels`` / ``attention_mask`` and the tower tokens of every media
    span, in the order the spans occur (row by row), as ``ChatModel.input_embeddings`` reads
    them."""
    width = max(len(e.encoded) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    media: dict[str, list[torch.Tensor]] = {"image": [], "audio": []}
    for row, example in enumerate(examples):
        n = len(example.encoded)
        ids[row, :n] = torch.tensor(example.encoded.ids)
        labels[row, :n] = torch.tensor(example.encoded.labels)
        mask[row, :n] = 1
        for kind, _ in example.encoded.spans:
            tokens = getattr(example, kind)
            if tokens is None:
                raise ValueError(f"conversation {row} has an <{kind}> mark but no {kind}")
            media[kind].append(tokens)
    batch: dict[str, Any] = {"ids": ids, "labels": labels, "attention_mask": mask,
                             "index": torch.arange(len(examples))}  # fmt: skip
    for kind, tokens in media.items():
        if tokens:
            batch[kind] = torch.stack(tokens)
    return batch


class ChatModule(L.LightningModule):
    """One training stage of a ``ChatModel``: AdamW on whatever requires a gradient (the
    projectors; with LoRA, the adapters too), cosine decay after a linear warm-up."""

    def __init__(self, model, lr: float, weight_decay: float = 0.0, warmup: float = 0.03,
                 total_steps: int = 1, skip_ids: tuple[int, ...] = ()) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.skip_ids = skip_ids  # answer tokens left out of this stage's loss
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup, self.total_steps = warmup, max(1, total_steps)
        self.strict_loading = False  # checkpoints hold the trained parameters only

    def trained_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trained_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a checkpoint of the trained parameters: every trained parameter must be there
        and nothing else (a frozen weight in it would be a different model)."""
        missing = self.trained_names() - set(state_dict)
        unexpected = set(state_dict) - {n for n, _ in self.named_parameters()}
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")  # fmt: skip
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        loss, accuracy = self.model.loss(batch, self.skip_ids)
        size = len(batch["index"])
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=size, on_epoch=True,
                 on_step=stage == "train", sync_dist=True)  # fmt: skip
        self.log(
            f"{stage}_token_acc",
            accuracy,
            batch_size=size,
            on_epoch=True,
            on_step=False,
            sync_dist=True,
        )
        return loss

    def training_step(self, batch, _):
        return self._step(batch, "train")

    def validation_step(self, batch, _):
        return self._step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen")
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        warm = max(1, round(self.warmup * self.total_steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, self.total_steps - warm))
            return 0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}  # fmt: skip


__all__ = ["ChatModule", "Example", "Examples", "collate"]
