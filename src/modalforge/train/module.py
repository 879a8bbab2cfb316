"""The LightningModule around a ``MultimodalModel``: losses, optimizer, schedule, logging."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from modalforge.fusion import modality_dropout
from modalforge.models import MultimodalModel


@dataclass
class OptimConfig:
    lr: float = 1e-3
    encoder_lr: float = 1e-5  # for pretrained encoders being fine-tuned: much smaller steps
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05  # share of all steps with a linear warm-up, then cosine decay
    loss: str = "ce"  # classification: ce | focal; regression: mse | huber
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    modality_dropout: float = 0.0
    # knowledge distillation (when batches carry a teacher's logits as "soft"): the loss is
    # alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * the hard-label loss (Hinton et
    # al. 2015; T^2 keeps the soft part's gradients on the hard part's scale)
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0


def focal_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float, weight=None) -> torch.Tensor:
    """Lin et al. 2017: cross-entropy scaled by (1 - p_true)^gamma. (B, C), (B,) -> scalar."""
    logp = F.log_softmax(logits, dim=-1)
    ce = F.nll_loss(logp, y, weight=weight, reduction="none")
    p_true = logp.gather(1, y[:, None]).squeeze(1).exp()
    return ((1 - p_true) ** gamma * ce).mean()


class MultimodalModule(L.LightningModule):
    """Batches: ``{"inputs", "mask", "features", "y"}`` (see ``data.dataset``). ``classify``:
    class ids and cross-entropy / focal loss (and accuracy) -- else regression values and
    MSE / Huber."""

    def __init__(
        self,
        model: MultimodalModel,
        classify: bool,
        optim: OptimConfig,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.classify = classify
        self.optim = optim
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, batch: dict[str, Any]):
        return self.model(batch.get("inputs"), batch.get("mask"), features=batch.get("features"))

    def loss(
        self, outputs: torch.Tensor, y: torch.Tensor, soft: torch.Tensor | None = None
    ) -> torch.Tensor:
        o = self.optim
        if self.classify:
            if o.loss == "focal":
                hard = focal_loss(outputs, y, o.focal_gamma, self.class_weights)
            else:
                hard = F.cross_entropy(
                    outputs, y, weight=self.class_weights, label_smoothing=o.label_smoothing
                )
            if soft is None:
                return hard
            t = o.distill_temperature
            kd = F.kl_div(F.log_softmax(outputs / t, -1), F.log_softmax(soft / t, -1),
                          reduction="batchmean", log_target=True)  # fmt: skip
            return o.distill_alpha * t * t * kd + (1 - o.distill_alpha) * hard
        pred = outputs.squeeze(-1) if outputs.shape[-1] == 1 else outputs
        return F.huber_loss(pred, y) if o.loss == "huber" else F.mse_loss(pred, y)

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        if stage == "train" and self.optim.modality_dropout > 0:
            batch = {**batch, "mask": modality_dropout(batch["mask"], self.optim.modality_dropout)}
        out = self(batch).outputs
        y = batch["y"]
        loss = self.loss(out, y, batch.get("soft"))
        size = y.shape[0]
        self.log(
            f"{stage}_loss",
            loss,
            prog_bar=True,
            batch_size=size,
            on_epoch=True,
            on_step=False,
            sync_dist=True,
        )
        if self.classify:
            acc = (out.argmax(-1) == y).float().mean()
            self.log(
                f"{stage}_acc",
                acc,
                prog_bar=True,
                batch_size=size,
                on_epoch=True,
                on_step=False,
                sync_dist=True,
            )
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def configure_optimizers(self):
        o = self.optim
        # pretrained encoders being fine-tuned take small steps; from-scratch ones learn at lr
        encoder_params = [
            p
            for encoder in self.model.encoders
            if encoder.pretrained
            for p in encoder.parameters()
            if p.requires_grad
        ]
        encoder_ids = {id(p) for p in encoder_params}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in encoder_ids]
        # scalars (a contrastive model's learned temperature) are not decayed towards 0
        scalars = [p for p in rest if p.dim() == 0]
        groups = [{"params": [p for p in rest if p.dim() > 0], "lr": o.lr}]
        if scalars:
            groups.append({"params": scalars, "lr": o.lr, "weight_decay": 0.0})
        if encoder_params:
            groups.append({"params": encoder_params, "lr": o.encoder_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=o.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(o.warmup_ratio * total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class ContrastiveModule(MultimodalModule):
    """Trains a ``ContrastiveModel``: symmetric InfoNCE over its pairs of columns, the learned
    temperature clamped after every optimizer step. After each validation epoch it logs
    ``val_recall``: Recall@1 over the whole validation set (not one batch), averaged over the
    pairs and both directions -- what early stopping watches."""

    def __init__(self, model, optim: OptimConfig) -> None:
        super().__init__(model, False, optim)
        self._val: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        emb = {c: torch.cat([e[c] for e, _ in self._val]) for c in self._val[0][0]}
        mask = {c: torch.cat([m[c] for _, m in self._val]) for c in self._val[0][1]}
        recalls = []
        for a, b in self.model.config.pairs:
            both = mask[a].bool() & mask[b].bool()
            if int(both.sum()) < 2:
                continue
            scores = emb[a][both] @ emb[b][both].T
            for s in (scores, scores.T):  # both directions; the diagonal holds the pairs
                recalls.append(
                    (s.argmax(1) == torch.arange(len(s), device=s.device)).float().mean()
                )
        if recalls:
            self.log("val_recall", torch.stack(recalls).mean(), prog_bar=True, sync_dist=True)

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        from modalforge.models.contrastive import contrastive_loss

        mask = batch["mask"]
        if stage == "train" and self.optim.modality_dropout > 0:
            mask = modality_dropout(mask, self.optim.modality_dropout)
        out = self.model(batch.get("inputs"), mask, features=batch.get("features"))
        loss = contrastive_loss(out, self.model.config.pairs, mask)
        if stage == "val":
            self._val.append(({c: e.detach() for c, e in out.embeddings.items()},
                              {c: m.detach() for c, m in mask.items()}))  # fmt: skip
        size = len(batch["index"])
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=size, on_epoch=True,
                 on_step=False, sync_dist=True)  # fmt: skip
        self.log(
            "temperature",
            1 / out.scale,
            batch_size=size,
            on_epoch=True,
            on_step=False,
            sync_dist=True,
        )
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.model.clamp_()


class CaptionModule(MultimodalModule):
    """Trains a ``CaptionModel`` with teacher forcing: cross-entropy of every next token, label
    smoothing (``optim.label_smoothing``) in training only, so ``val_loss`` -- what early
    stopping watches -- is the plain per-token cross-entropy. Batches carry ``tokens``."""

    def __init__(self, model, optim: OptimConfig) -> None:
        super().__init__(model, False, optim)

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        from modalforge.models.caption import caption_loss

        image = self.model.config.image
        features = (batch.get("features") or {}).get(image)
        inputs = None if features is not None else batch["inputs"][image]
        memory = self.model.memory(features, inputs)
        smoothing = self.optim.label_smoothing if stage == "train" else 0.0
        loss, accuracy = caption_loss(self.model, memory, batch["tokens"], smoothing)
        size = len(batch["index"])
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=size, on_epoch=True,
                 on_step=False, sync_dist=True)  # fmt: skip
        self.log(
            f"{stage}_token_acc",
            accuracy,
            batch_size=size,
            on_epoch=True,
            on_step=False,
            sync_dist=True,
        )
        return loss
