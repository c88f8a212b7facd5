"""Checkpoints: an HF folder (model, tokenizer) plus trainer state, written atomically.

Layout under ``out_dir``::

    checkpoint/          the latest complete checkpoint (model, tokenizer, trainer_state.json,
                         optimizer.pt, rng.pt); what ``--resume`` reads
    config.json, ...     the same model files, hard-linked: ``out_dir`` itself is a model folder
                         that ``nexttok predict --model out_dir`` and plain transformers load

A checkpoint is written to a temporary folder and renamed into place, so a crash or a full disk
mid-write leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nexttok.errors import NexttokError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CKPT = "checkpoint"
OLD = ".checkpoint.old"
STATE = "trainer_state.json"
TRAINER_FILES = {STATE, "optimizer.pt", "rng.pt"}


def _complete(folder: Path) -> bool:
    return (folder / STATE).is_file()


def latest(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir``; the previous one if a swap was interrupted."""
    for name in (CKPT, OLD):
        if _complete(out_dir / name):
            return out_dir / name
    return None


def read_step(folder: Path) -> int:
    return int(json.loads((folder / STATE).read_text())["step"])


def save(
    out_dir: Path,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rng: list[torch.Tensor],
) -> Path:
    """Write a checkpoint atomically and publish its model files at ``out_dir``'s top level."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".checkpoint.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, model, tokenizer, optimizer, state, rng)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest(out_dir)
        kept = f"the previous checkpoint (step {read_step(prev)}) in {prev} is intact" if prev else "none was kept"
        raise NexttokError(
            f"could not write the checkpoint at step {state['step']} ({e.strerror or e}); {kept}. "
            "Free disk space and rerun with --resume"
        ) from e
    _swap(tmp, out_dir)
    _publish(out_dir / CKPT, out_dir)
    return out_dir / CKPT


def _write(tmp: Path, model, tokenizer, optimizer, state: dict[str, Any], rng: list[torch.Tensor]) -> None:
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)  # a peft model saves its adapter, as peft does
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng, tmp / "rng.pt")
    # The state file is written last: its presence marks the folder complete.
    with open(tmp / STATE, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _swap(tmp: Path, out_dir: Path) -> None:
    """checkpoint -> .checkpoint.old, tmp -> checkpoint, drop old. Every moment one complete copy exists."""
    current, old = out_dir / CKPT, out_dir / OLD
    if current.exists():
        shutil.rmtree(old, ignore_errors=True)
        current.rename(old)
    tmp.rename(current)
    shutil.rmtree(old, ignore_errors=True)


def _publish(ckpt: Path, out_dir: Path) -> None:
    """Hard-link the model files into ``out_dir`` (each replaced atomically); copy where links fail."""
    for src in ckpt.iterdir():
        if src.name in TRAINER_FILES or not src.is_file():
            continue
        tmp = out_dir / f".{src.name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, out_dir / src.name)


def load(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore model weights and optimizer state from the latest checkpoint; its trainer state
    (with ``rng``: one RNG state per rank), or ``None`` when there is no checkpoint."""
    folder = latest(out_dir)
    if folder is None:
        return None
    _load_weights(folder, model)
    try:
        # To the CPU first: a checkpoint written on a GPU resumes anywhere; the optimizer moves each
        # state to its parameter's device.
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))
    except (KeyError, ValueError) as e:  # another optimizer's state (train.optimizer changed), or other groups
        raise NexttokError(
            f"the checkpoint in {folder} holds the state of a different optimizer or parameter set ({e!r}); "
            "resume with the train.optimizer and model it was written with, or start a new --out"
        ) from None
    state = json.loads((folder / STATE).read_text())
    state["rng"] = torch.load(folder / "rng.pt", weights_only=True)
    return state


def _load_weights(folder: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    if getattr(model, "peft_config", None):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(f))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied weights are saved once; a missing key is fine only if it shares storage with a loaded one.
    loaded = {model.get_parameter(k).data_ptr() for k in weights if _is_param(model, k)}
    real_missing = [k for k in missing if not _is_param(model, k) or model.get_parameter(k).data_ptr() not in loaded]
    if unexpected or real_missing:
        raise NexttokError(
            f"the checkpoint in {folder} does not match this model (missing {real_missing[:3]}, "
            f"unexpected {unexpected[:3]}); resume with the same model config, or choose another --out"
        )


def _is_param(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False
