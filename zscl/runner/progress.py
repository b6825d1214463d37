"""Progress display of the sequence runner and the CLIs."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


class TaskProgressBar(RichProgressBar):
    """Lightning's rich bar, titled "task k/n: Dataset"; with ``max_steps`` its total and ETA are the task's steps.

    Loss parts logged with ``prog_bar=True`` (ce, kd_image, kd_text, wc) appear beside it.
    ``refresh_rate`` > 1 keeps the bar's metric reads (host syncs) off most steps.
    """

    def __init__(self, description: str = "train", refresh_rate: int = 10, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=True, **kwargs)
        self.description = description

    def _get_train_description(self, current_epoch: int) -> str:
        return self.description

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # one logger version per task: the title already says which
        return metrics


class TaskTQDMBar(TQDMProgressBar):
    """The same, for consoles where rich's live display is not wanted (``--progress tqdm``)."""

    def __init__(self, description: str = "train", refresh_rate: int = 10) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.description = description

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.description)

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def progress_bar(kind: str, description: str):
    """``rich`` | ``tqdm`` | ``none`` -> a progress-bar callback or None."""
    if kind == "none":
        return None
    return TaskProgressBar(description) if kind == "rich" else TaskTQDMBar(description)
