"""`nexttok pretrain`: recipe -> tokenizer -> model folder that predict loads; overrides; errors; DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_corpus
from typer.testing import CliRunner

from nexttok.cli import app
from nexttok.config import load_recipe
from nexttok.errors import NexttokError

RECIPE = """
data: {{paths: ["{data}"], holdout: tail, holdout_fraction: 0.1, eos_between_documents: false}}
tokenizer: {{source: train, vocab_size: 300}}
model: {{layers: 1, heads: 2, hidden: 32, intermediate: 64, context: 32}}
train:
  out_dir: {out}
  max_steps: 8
  batch_size: 4
  lr: 3e-3
  min_lr: 3e-4
  warmup_steps: 2
  eval_every: 4
  eval_batches: 2
  save_every: 4
  log_every: 2
"""


@pytest.fixture()
def recipe(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NEXTTOK_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text(tiny_corpus(12000))
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(data=tmp_path / "corpus.txt", out=tmp_path / "run"))
    return path


def test_pretrain_writes_a_model_that_predict_loads(recipe, tmp_path):
    res = CliRunner().invoke(app, ["pretrain", "--config", str(recipe), "--threads", "1", "train.max_steps=6"])
    assert res.exit_code == 0, res.output
    assert "parameters" in res.output and "MFLOPs per trained token" in res.output and "bits/char" in res.output
    run = tmp_path / "run"
    final = json.loads((run / "final_eval.json").read_text())
    assert final["step"] == 6 and 0 < final["bits_per_char"] < 12
    assert (run / "loss.png").is_file() and (run / "generation_config.json").is_file()
    out = CliRunner().invoke(app, ["predict", "--model", str(run), "ROMEO:", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["vocab_size"] == 300


def test_resume_continues_from_the_checkpoint(recipe, tmp_path):
    assert CliRunner().invoke(app, ["pretrain", "-c", str(recipe), "train.max_seconds=0.01"]).exit_code == 0
    state = json.loads((tmp_path / "run/checkpoint/trainer_state.json").read_text())
    assert state["step"] < 8
    again = CliRunner().invoke(app, ["pretrain", "-c", str(recipe)])
    assert again.exit_code == 2 and "--resume" in again.output
    res = CliRunner().invoke(app, ["pretrain", "-c", str(recipe), "--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run/final_eval.json").read_text())["step"] == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.layer=2", "unknown field 'model.layer'; model fields are: attention_dropout, context, dropout"),
        ("train.lr=-1", r"train.lr must be in \(0, 1\]"),
        ("model.heads=3", "model.heads must be a divisor of hidden=32"),
        ("optimizer.lr=1", "unknown field 'optimizer'"),
        ("tokenizer.vocab_size=10", "tokenizer.vocab_size must be >= 261"),
        ("train.max_steps=null", "train.max_steps cannot be null"),
        ("train.max_steps=many", r"train.max_steps must be a number \(got 'many'\)"),
        ("model.tie_embeddings=maybe", "model.tie_embeddings must be true or false"),
    ],
)
def test_bad_fields_name_the_field_and_the_allowed_range(recipe, override, message):
    with pytest.raises(NexttokError, match=message):
        load_recipe(recipe, [override])
    res = CliRunner().invoke(app, ["pretrain", "-c", str(recipe), override])
    assert res.exit_code == 2 and res.output.startswith("error: ")


def test_overrides_parse_yaml_values(recipe):
    r = load_recipe(recipe, ["train.lr=1e-3", "model.tie_embeddings=false", "data.paths=[a, b]"])
    assert r.train.lr == 1e-3 and r.model.tie_embeddings is False and r.data.paths == ["a", "b"]


def test_shakespeare_recipe_is_valid():
    r = load_recipe(Path(__file__).parents[1] / "recipes" / "shakespeare.yaml")
    assert r.data.paths == ["shakespeare"] and r.data.holdout == "tail" and r.train.out_dir == "runs/shakespeare"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_two_processes_equal_one_process_with_accumulation(recipe, tmp_path, optimizer):
    """torchrun, 2 CPU processes (gloo): rank r takes micro-batch 2*step + r, exactly the batches a single
    process takes with grad_accum=2, and the loss is the mean over all their tokens: same training."""
    env = {**os.environ, "NEXTTOK_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    opt = f"train.optimizer={optimizer}"
    cmd = [*torchrun, "-m", "nexttok", "pretrain", "-c", str(recipe), f"train.out_dir={tmp_path / 'ddp'}", opt]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("held-out (all") == 1  # only rank 0 reports
    one_process = ["pretrain", "-c", str(recipe), "--threads", "1", f"train.out_dir={tmp_path / 'one'}"]
    single = CliRunner().invoke(app, [*one_process, "train.grad_accum=2", opt])
    assert single.exit_code == 0, single.output
    ddp = json.loads((tmp_path / "ddp/checkpoint/trainer_state.json").read_text())
    one = json.loads((tmp_path / "one/checkpoint/trainer_state.json").read_text())
    assert ddp["world"] == 2 and ddp["step"] == one["step"] == 8
    assert ddp["last_loss"] == pytest.approx(one["last_loss"], abs=1e-4)


def test_pretrain_with_a_given_tokenizer_folder(recipe, tmp_path):
    from conftest import make_tiny_tokenizer

    make_tiny_tokenizer(tmp_path / "tok")  # 384 tokens, not the recipe's 300
    args = ["pretrain", "-c", str(recipe), "--tokenizer", str(tmp_path / "tok"), "train.max_steps=2"]
    res = CliRunner().invoke(app, [*args, "train.warmup_steps=1", "final_eval=false"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run/config.json").read_text())["vocab_size"] == 384


def test_a_recipe_without_the_training_fields_names_them():
    with pytest.raises(NexttokError, match=r"the recipe lacks train.out_dir, train.max_steps, .*train.FIELD=VALUE"):
        load_recipe(None)


def test_dropout_acts_in_training_only_and_is_not_saved(recipe, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    from nexttok.pretrain import build_model
    from nexttok.tokenizer_train import train_bpe

    tok = train_bpe([tiny_corpus(4000)], 300)
    plain = build_model(load_recipe(recipe, ["model.dropout=0"]), tok)
    dropped = build_model(load_recipe(recipe, ["model.dropout=0.3"]), tok)
    ids = torch.tensor([tok.encode("ROMEO: speak, good friend")])
    plain.train(), dropped.train()
    # the embeddings, every attention and MLP output: 1 + 2 per layer
    hooks = sum(len(m._forward_hooks) for m in dropped.modules())
    assert hooks == 1 + 2 * dropped.config.num_hidden_layers
    assert not any(m._forward_hooks for m in plain.modules())
    with torch.no_grad():
        a, b = dropped(ids).logits, dropped(ids).logits  # (1, T, V) each
        assert not torch.allclose(a, b)  # a fresh mask per forward
        assert torch.equal(plain(ids).logits, plain(ids).logits)
        dropped.eval()
        assert torch.allclose(dropped(ids).logits, plain.eval()(ids).logits)  # same init, no dropout in eval
    dropped.save_pretrained(tmp_path / "saved")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, plain(ids).logits, atol=1e-6)
