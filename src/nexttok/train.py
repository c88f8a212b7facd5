"""``fit()``: the one training loop. Pretraining and fine-tuning differ only in the batches they give it.

A batch is a pure function of its global index, so exact resume needs only the step, the optimizer
state and the RNG state; the learning rate is a pure function of the step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from nexttok import checkpoint, distributed
from nexttok.errors import NexttokError
from nexttok.evaluation import evaluate_source
from nexttok.loss import token_loss_sum, trained_tokens
from nexttok.models import quiet_transformers
from nexttok.optim import OPTIMIZERS, make_optimizer
from nexttok.precision import use_bf16

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# pydantic's ConfigDict on the config dataclasses, read by config.py's TypeAdapters: unknown keys are errors.
FORBID_EXTRA = {"extra": "forbid"}
SCHEDULES = '"steps", or "time" with max_seconds set'


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model and the batches. Checked on construction."""

    __pydantic_config__ = FORBID_EXTRA

    out_dir: str
    max_steps: int
    batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int
    eval_every: int
    eval_batches: int
    save_every: int
    log_every: int
    grad_accum: int = 1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    sample_every: int = 0
    sample_prompt: str = ""
    sample_tokens: int = 48
    seed: int = 0
    bf16: bool = False
    compile: bool = False
    max_seconds: float | None = None  # stop cleanly (and checkpoint) after this much training time
    # "steps": the cosine decays over max_steps (exactly reproducible); "time": over max_seconds of
    # training, so a run that must end on time still anneals fully (the LR then depends on speed).
    schedule: str = "steps"
    embedding_lr_scale: float = 1.0  # the embeddings' learning rate is lr x this
    # "adamw", or "muon": Muon (orthogonalised momentum) for the hidden weight matrices and AdamW for
    # the rest (embeddings, output layer, norms, biases), both with lr, min_lr and weight_decay above.
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        checks: list[tuple[str, bool, str]] = [
            ("max_steps", self.max_steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("lr", 0 < self.lr <= 1, "in (0, 1]"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"in [0, lr={self.lr}]"),
            ("warmup_steps", 0 <= self.warmup_steps <= self.max_steps, f"in [0, max_steps={self.max_steps}]"),
            ("weight_decay", 0 <= self.weight_decay < 1, "in [0, 1)"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0 turns clipping off)"),
            ("embedding_lr_scale", 0 < self.embedding_lr_scale <= 1000, "in (0, 1000]"),
            ("optimizer", self.optimizer in OPTIMIZERS, " or ".join(f'"{o}"' for o in OPTIMIZERS)),
            ("eval_every", self.eval_every >= 0, ">= 0 (0 turns evaluation off)"),
            ("eval_batches", self.eval_batches >= 1, ">= 1"),
            ("save_every", self.save_every >= 0, ">= 0 (0 saves only at the end)"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("sample_every", self.sample_every >= 0, ">= 0 (0 turns samples off)"),
            ("sample_tokens", self.sample_tokens >= 1, ">= 1"),
            ("max_seconds", self.max_seconds is None or self.max_seconds > 0, "> 0, or null for no limit"),
            ("schedule", self.schedule == "steps" or (self.schedule == "time" and self.max_seconds), SCHEDULES),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise NexttokError(
                    f"train.{name} must be {allowed} (got {getattr(self, name)!r})", param=f"train.{name}"
                )

    def lr_at(self, step: int, seconds: float = 0.0) -> float:
        """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``max_steps`` (or, with
        ``schedule: time``, at ``max_seconds`` of training)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "time":
            progress = min(1.0, seconds / self.max_seconds)
        else:
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)


class BatchSource(Protocol):
    """Where batches come from. ``batch(index, B)`` must be a pure function of ``index``."""

    def batch(self, index: int, batch_size: int) -> dict[str, torch.Tensor]: ...

    def eval_batches(self, batch_size: int, limit: int) -> Iterator[dict[str, torch.Tensor]]: ...


@dataclass
class FitResult:
    """How a run ended: the final step, the last train loss, the last evaluation, where it was saved."""

    step: int
    train_loss: float
    eval: dict[str, float] = field(default_factory=dict)
    out_dir: str = ""
    stopped_early: bool = False


class _Run:
    """The state of one fit() call: model, optimizer, timers and the metrics log."""

    def __init__(self, model, tokenizer, train, eval_source, config: TrainConfig):
        self.raw, self.tokenizer, self.train, self.eval_source, self.config = (
            model,
            tokenizer,
            train,
            eval_source,
            config,
        )
        self.world, self.rank = distributed.world(), distributed.rank()
        self.out = Path(config.out_dir)
        self.optimizer = make_optimizer(model, config)
        self.bf16 = use_bf16(config.bf16, model.device, "train.bf16 (--bf16)")
        self.model = distributed.wrap(model)
        self.forward_model = torch.compile(self.model) if config.compile else self.model
        self.step = 0
        self.train_seconds = 0.0
        # CPU seconds of this process while training: with other jobs on the machine, wall time
        # overstates the work; CPU time / threads is what an idle machine would have taken.
        self.cpu_seconds = 0.0
        self.tokens_seen = 0
        self.last_loss = float("nan")
        self.last_eval: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.raw.device.type, dtype=torch.bfloat16)

    # --- one optimizer step ------------------------------------------------------------------------

    def micro_batches(self) -> list[dict[str, torch.Tensor]]:
        c, device = self.config, self.raw.device
        out = []
        for micro in range(c.grad_accum):
            index = (self.step * c.grad_accum + micro) * self.world + self.rank
            batch = self.train.batch(index, c.batch_size)
            out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return out

    def train_step(self) -> float:
        """Forward/backward over the accumulated micro-batches; the loss is the mean over every trained
        token of the whole step, on every rank together (so DDP's gradient average is exact)."""
        batches = self.micro_batches()
        local = sum(trained_tokens(b) for b in batches)
        total = distributed.all_sum([float(local)])[0]
        if total == 0:
            raise NexttokError(f"every label in the batches of step {self.step} is -100: nothing to train on")
        lr = self.config.lr_at(self.step, self.train_seconds)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            with distributed.no_sync(self.model, sync), self.autocast():
                loss, _ = token_loss_sum(self.forward_model, batch)
                # DDP averages gradients over ranks; scaling by world/total makes that the global token mean.
                (loss * (self.world / total)).backward()
            loss_sum += float(loss.detach())
            self.tokens_seen += int(batch["input_ids"].numel()) * self.world
        mean = distributed.all_sum([loss_sum])[0] / total
        if not math.isfinite(mean):
            self.optimizer.zero_grad(set_to_none=True)
            raise NexttokError(self._nan_message(mean))
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean

    def _nan_message(self, loss: float) -> str:
        where = checkpoint.latest(self.out)
        kept = (
            f"the last good checkpoint (step {checkpoint.read_step(where)}) is in {where}"
            if where
            else "no checkpoint was written yet"
        )
        return (
            f"the training loss became {loss} at step {self.step + 1}; stopped, {kept}. "
            f"Lower train.lr (now {self.config.lr:g}), keep train.grad_clip on, or turn off bf16"
        )

    # --- periodic work -----------------------------------------------------------------------------

    def run_eval(self) -> dict[str, float]:
        if self.eval_source is None:
            return {}
        with self.autocast():
            metrics = evaluate_source(self.raw, self.eval_source, self.config.batch_size, self.config.eval_batches)
        self.last_eval = metrics
        timing = {"train_seconds": round(self.train_seconds, 3), "cpu_seconds": round(self.cpu_seconds, 3)}
        self.log({"step": self.step, **timing, **{f"eval_{k}": v for k, v in metrics.items()}})
        return metrics

    def sample(self) -> str:
        """A short sample from the prompt; under its own RNG so training's random stream is untouched."""
        tok = self.tokenizer
        ids = tok.encode(self.config.sample_prompt, add_special_tokens=False) if self.config.sample_prompt else []
        ids = ids or [tok.bos_token_id if tok.bos_token_id is not None else 0]
        self.raw.eval()
        gpu = [self.raw.device] if self.raw.device.type == "cuda" else []  # seeding reseeds the GPU too
        with torch.random.fork_rng(devices=gpu), torch.no_grad():
            torch.manual_seed(self.config.seed + self.step)
            x = torch.tensor([ids], device=self.raw.device)
            out = self.raw.generate(
                x,
                max_new_tokens=self.config.sample_tokens,
                do_sample=True,
                top_k=50,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
        self.raw.train()
        text = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
        self.log({"step": self.step, "sample": self.config.sample_prompt + text})
        return self.config.sample_prompt + text

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def save(self) -> None:
        state = {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "cpu_seconds": self.cpu_seconds,
            "tokens_seen": self.tokens_seen,
            "last_loss": self.last_loss,
            "config": asdict(self.config),
            "world": self.world,
        }
        rng = distributed.gather_objects(_rng_state(self.raw.device))
        if self.main:
            checkpoint.save(self.out, self.raw, self.tokenizer, self.optimizer, state, rng)
        distributed.barrier()

    def restore(self) -> None:
        state = checkpoint.load(self.out, self.raw, self.optimizer)
        if state is None:
            return
        if state["world"] != self.world:
            raise NexttokError(
                f"the checkpoint in {self.out} was written by {state['world']} processes but this run has "
                f"{self.world}; resume with the same --nproc_per_node (batches depend on it)"
            )
        self.step, self.train_seconds = state["step"], state["train_seconds"]
        self.cpu_seconds = state.get("cpu_seconds", 0.0)
        self.tokens_seen, self.last_loss = state["tokens_seen"], state["last_loss"]
        _set_rng_state(state["rng"][self.rank], self.raw.device)
        if self.main:
            self._truncate_log(self.step)

    def _truncate_log(self, step: int) -> None:
        """Drop log records past the checkpoint (written before a crash): the resumed run redoes those steps."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            keep = [x for x in path.read_text(encoding="utf-8").splitlines() if x and json.loads(x)["step"] <= step]
            path.write_text("".join(x + "\n" for x in keep), encoding="utf-8")


def _rng_state(device: torch.device):
    """This process's random state: the CPU generator's, and on a GPU also the GPU's (dropout draws there)."""
    if device.type != "cuda":
        return torch.get_rng_state()
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device)}


def _set_rng_state(state, device: torch.device) -> None:
    if not isinstance(state, dict):  # written on the CPU
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def fit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: BatchSource,
    eval: BatchSource | None,
    config: TrainConfig,
    resume: bool = False,
) -> FitResult:
    """Train ``model`` on ``train``'s batches for ``config.max_steps`` optimizer steps.

    Evaluates on ``eval`` every ``eval_every`` steps, checkpoints to ``config.out_dir`` every
    ``save_every`` steps and at the end (an HF folder: model, tokenizer, trainer state), logs
    ``metrics.jsonl`` and ``loss.png``. ``resume`` continues exactly from the checkpoint there.
    Works unchanged on a peft-wrapped model and under ``torchrun`` (DDP).
    """
    if not resume and checkpoint.latest(Path(config.out_dir)) is not None:
        raise NexttokError(
            f"{config.out_dir} already holds a checkpoint; pass --resume to continue it, or choose another --out"
        )
    if not resume and distributed.rank() == 0:
        (Path(config.out_dir) / "metrics.jsonl").unlink(missing_ok=True)
    torch.manual_seed(config.seed + distributed.rank())
    model.train()
    run = _Run(model, tokenizer, train, eval, config)
    with quiet_transformers():  # checkpoint writes would print a progress bar each
        if resume:
            run.restore()
        stopped = _loop(run)
        if config.eval_every == 0 or run.step % config.eval_every != 0:
            run.run_eval()
        run.save()
    _plot(run)
    return FitResult(run.step, run.last_loss, run.last_eval, str(run.out), stopped)


def _out_of_time(run: _Run) -> bool:
    """Ranks must agree, so the check is an all-reduce (only when there is a time limit)."""
    limit = run.config.max_seconds
    return limit is not None and distributed.any_true(run.train_seconds >= limit)


def _loop(run: _Run) -> bool:
    """Optimizer steps until max_steps or max_seconds; True when time ran out first."""
    from nexttok.progress import TrainProgress

    c = run.config
    timed = c.schedule == "time"
    total, start = (c.max_seconds, run.train_seconds) if timed else (c.max_steps, run.step)
    with TrainProgress(total, start, enabled=run.main, timed=timed) as bar:
        while run.step < c.max_steps:
            if _out_of_time(run):  # checked first: a resumed run that is out of time takes no step
                return True
            t0, c0, tokens_before = time.perf_counter(), time.process_time(), run.tokens_seen
            run.last_loss = run.train_step()
            run.step += 1
            run.train_seconds += time.perf_counter() - t0
            run.cpu_seconds += time.process_time() - c0
            rate = (run.tokens_seen - tokens_before) / max(1e-9, time.perf_counter() - t0)
            bar.update(run.step, run.last_loss, rate, run.train_seconds)
            _periodic(run, bar)
    return False


def _periodic(run: _Run, bar) -> None:
    c, step = run.config, run.step
    if step % c.log_every == 0 or step == 1:
        run.log(
            {
                "step": step,
                "loss": run.last_loss,
                "lr": run.optimizer.param_groups[0]["lr"],
                "tokens": run.tokens_seen,
                "train_seconds": round(run.train_seconds, 3),
                "cpu_seconds": round(run.cpu_seconds, 3),
                "tokens_per_second": round(run.tokens_seen / max(1e-9, run.train_seconds), 1),
            }
        )
    if c.eval_every and step % c.eval_every == 0:
        metrics = run.run_eval()
        if metrics and run.main:
            bar.note(f"step {step}: held-out loss {metrics['loss']:.4f}" + _bits(metrics))
    if c.sample_every and step % c.sample_every == 0 and run.main:
        bar.note(f"sample: {run.sample()!r}")
    if c.save_every and step % c.save_every == 0 and step < c.max_steps:
        run.save()


def _bits(metrics: dict[str, float]) -> str:
    parts = [
        f"{metrics[k]:.3f} {name}"
        for k, name in [("bits_per_char", "bits/char"), ("bits_per_byte", "bits/byte")]
        if k in metrics
    ]
    return (" · " + ", ".join(parts)) if parts else ""


def _plot(run: _Run) -> None:
    if not run.main:
        return
    from nexttok.plots import plot_loss_curve

    records = [
        json.loads(line) for line in (run.out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line
    ]
    plot_loss_curve(records, run.out / "loss.png")
