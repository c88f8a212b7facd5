"""Checkpoints: atomic writes (a full disk mid-write keeps the previous one), interrupted swaps, peft."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from test_train import ToySource, config, tiny_model

from nexttok import checkpoint
from nexttok.errors import NexttokError
from nexttok.train import fit


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, tok, ids, monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 2:  # the first checkpoint (optimizer + rng) succeeds, the second runs out of space
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(NexttokError, match=r"No space left on device.*previous checkpoint \(step 4\).*--resume"):
        fit(tiny_model(tok), tok, ToySource(ids), None, config(tmp_path))
    assert checkpoint.read_step(tmp_path / "checkpoint") == 4
    assert not list(tmp_path.glob(".checkpoint.tmp-*"))  # the half-written folder is gone
    monkeypatch.setattr(torch, "save", real_save)
    res = fit(tiny_model(tok), tok, ToySource(ids), None, config(tmp_path), resume=True)
    assert res.step == 12


def test_an_interrupted_swap_falls_back_to_the_previous_checkpoint(tmp_path, tok, ids):
    fit(tiny_model(tok), tok, ToySource(ids), None, config(tmp_path, max_steps=4, warmup_steps=1))
    # A crash between "checkpoint -> .checkpoint.old" and "tmp -> checkpoint" leaves only the old one.
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old")
    assert checkpoint.latest(tmp_path) == tmp_path / ".checkpoint.old"
    res = fit(tiny_model(tok), tok, ToySource(ids), None, config(tmp_path, max_steps=6, warmup_steps=1), resume=True)
    assert res.step == 6 and checkpoint.latest(tmp_path) == tmp_path / "checkpoint"
    assert not (tmp_path / ".checkpoint.old").exists()


def test_peft_model_trains_saves_its_adapter_and_resumes(tmp_path, tok, ids):
    from peft import LoraConfig, get_peft_model

    def lora():
        return get_peft_model(tiny_model(tok, 0.0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    whole = fit(lora(), tok, ToySource(ids), None, config(tmp_path / "a", lr=1e-2))
    assert (tmp_path / "a/adapter_model.safetensors").is_file() and not (tmp_path / "a/model.safetensors").exists()

    def crash(index: int) -> None:
        if index == 2 * 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(lora(), tok, ToySource(ids, hook=crash), None, config(tmp_path / "b", lr=1e-2))
    resumed = fit(lora(), tok, ToySource(ids), None, config(tmp_path / "b", lr=1e-2), resume=True)
    assert resumed.train_loss == pytest.approx(whole.train_loss, abs=1e-6)
    assert json.loads((tmp_path / "b/checkpoint/trainer_state.json").read_text())["step"] == 12


def test_resuming_into_a_different_model_shape_is_a_clear_error(tmp_path, tok, ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    fit(tiny_model(tok), tok, ToySource(ids), None, config(tmp_path, max_steps=2, warmup_steps=1))
    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    )  # fmt: skip
    with pytest.raises(NexttokError, match="does not match this model"):
        fit(other, tok, ToySource(ids), None, config(tmp_path, max_steps=4, warmup_steps=1), resume=True)
