"""The learning-rate schedule: polynomial decay over epochs or over a time budget."""

from __future__ import annotations


class PolySchedule:
    """nnU-Net's ``lr = base * (1 - progress)^0.9``, progress in epochs or in the time budget.

    Progress is given, not counted, so a time budget ends the schedule when it ends whatever
    the epoch length; ``state_dict`` keeps a checkpoint's layout (resume).
    """

    def __init__(self, optimizer, base_lr: float, exponent: float = 0.9):
        self.optimizer, self.base_lr, self.exponent = optimizer, base_lr, exponent
        self.progress = 0.0

    def set_progress(self, progress: float) -> None:
        self.progress = min(max(progress, 0.0), 1.0)
        lr = self.base_lr * (1.0 - self.progress) ** self.exponent
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"progress": self.progress, "base_lr": self.base_lr}

    def load_state_dict(self, state: dict) -> None:
        self.progress = float(state.get("progress", 0.0))  # an older cosine state: from 0
