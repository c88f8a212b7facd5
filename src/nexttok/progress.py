"""The training progress bar: step, loss, tokens/s and ETA (rich), on the main process only."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """``with TrainProgress(total, start) as bar: bar.update(step, loss, tok_per_s)``; a no-op when disabled.

    The bar measures steps, or training seconds when ``timed`` (a run that ends at ``max_seconds``),
    so the ETA is right either way."""

    def __init__(self, total: float, start: float = 0, enabled: bool = True, timed: bool = False):
        self.enabled, self.timed = enabled, timed
        self.rate = 0.0
        if not enabled:
            return
        self.progress = Progress(
            TextColumn("step {task.fields[step]}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
            refresh_per_second=2,  # rendering competes with training for the same cores
        )
        self.task = self.progress.add_task("train", total=total, completed=start, step="-", loss="-", rate="-")

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, step: int, loss: float, tokens_per_second: float, seconds: float = 0.0) -> None:
        if not self.enabled:
            return
        # A smoothed rate: single steps of small models are noisy.
        self.rate = tokens_per_second if self.rate == 0 else 0.9 * self.rate + 0.1 * tokens_per_second
        done = seconds if self.timed else step
        self.progress.update(self.task, completed=done, step=step, loss=f"{loss:.4f}", rate=f"{self.rate:,.0f}")

    def note(self, text: str) -> None:
        """A line printed above the bar (evaluations, samples)."""
        if self.enabled:
            self.progress.console.print(text, markup=False, highlight=False)
