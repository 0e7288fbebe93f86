"""Classification metrics from summed counts: top-k, per-class accuracy, confusion matrix.

Everything is kept as sums in one float64 tensor (`Meter.sums`) so that data-parallel ranks can add
their sums with a single all_reduce and divide once at the end: the mean over ranks of per-rank
means would be wrong when ranks see different numbers of images.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the k highest logits, for each k (k capped at C)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = pred == target[:, None]  # (B, maxk)
    return [hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts, rows = true class, columns = predicted class."""
    idx = target.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


class Meter:
    """Sums of loss, top-1/top-5 hits and images (and optionally a confusion matrix) over batches."""

    def __init__(self, num_classes: int, device, confusion: bool = False):
        self.num_classes = num_classes
        # [loss sum, top-1 hits, top-5 hits, images]
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.confusion = (torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
                          if confusion else None)

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """Add one batch; `loss_sum` is the batch's summed (not averaged) loss."""
        top1, top5 = topk_correct(logits, target)
        batch = torch.stack([loss_sum.detach().double(), top1.double(), top5.double(),
                             torch.tensor(float(len(target)), dtype=torch.float64, device=self.sums.device)])
        self.sums += batch
        if self.confusion is not None:
            self.confusion += confusion_matrix(logits.argmax(1), target, self.num_classes).double()

    def all_reduce(self) -> Meter:
        """Sum over data-parallel ranks (in place), when a process group is running."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums)
            if self.confusion is not None:
                dist.all_reduce(self.confusion)
        return self

    def result(self) -> dict:
        loss, top1, top5, n = self.sums.tolist()
        n = max(n, 1.0)
        out = {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "images": int(n)}
        if self.confusion is not None:
            out.update(per_class_top1(self.confusion), confusion=self.confusion.long().tolist())
        return out


def per_class_top1(confusion: torch.Tensor) -> dict:
    """Per-class accuracy (recall) from a confusion matrix; NaN-free: a class with no images gets None."""
    totals = confusion.sum(dim=1).tolist()
    correct = confusion.diagonal().tolist()
    return {"per_class_top1": [c / t if t else None for c, t in zip(correct, totals)]}
