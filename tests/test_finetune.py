"""finetune: the same fit() on rendered records; full and LoRA, merge, adapter folders, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from typer.testing import CliRunner

import nexttok
from nexttok.cli import app
from nexttok.errors import NexttokError
from nexttok.finetune import DataOptions, LoraOptions, apply_lora, check_tokenizer, finetune, prepare_data

PLAYS = ["Hamlet", "Macbeth", "Othello"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A small task the tiny model can learn in a few steps: the play is named in the prompt."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("ft-data") / "plays.jsonl"
    rows = []
    for i in range(48):
        play = rng.choice(PLAYS)
        rows.append({"prompt": f"Which play, {play.lower()} {i}?", "completion": play})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def held_out_loss(model_dir: str, data_file: str) -> float:
    """Mean loss on the trained tokens of every record, computed here independently of fit()."""
    lm = nexttok.load(model_dir)
    prepared = prepare_data(lm.tokenizer, DataOptions(data_file, layout="pad", eval_fraction=0))
    total, count = 0.0, 0
    for batch in prepared.train.eval_batches(8, 100):
        with torch.no_grad():
            logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="sum")
        total, count = total + float(loss), count + int((labels != -100).sum())
    return total / count


def test_full_finetune_lowers_the_loss_and_writes_a_model_folder(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "full"
    before = held_out_loss(str(tiny_model_dir), data_file)
    result = finetune(
        str(tiny_model_dir), DataOptions(data_file, eval_fraction=0), str(out), steps=10, notify=lambda s: None, lr=3e-3
    )
    assert result.fit.step == 10 and result.trainable == result.total
    assert held_out_loss(str(out), data_file) < before - 0.5
    assert (out / "config.json").is_file() and (out / "metrics.jsonl").is_file()


def test_lora_trains_only_adapters_and_merge_matches(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "lora"
    before = held_out_loss(str(tiny_model_dir), data_file)
    data = DataOptions(data_file, layout="pad", eval_fraction=0)
    lora = LoraOptions(r=4, alpha=8)
    result = finetune(str(tiny_model_dir), data, str(out), lora, True, steps=10, notify=lambda s: None, lr=1e-2)
    assert 0 < result.trainable < result.total / 5
    assert (out / "adapter_model.safetensors").is_file() and not (out / "config.json").exists()
    merged = held_out_loss(str(out / "merged"), data_file)
    assert merged < before - 0.5
    # the adapter folder itself loads (base + adapter) and predicts like the merged folder
    assert held_out_loss(str(out), data_file) == pytest.approx(merged, rel=1e-4)


def test_cli_finetune_on_a_model_without_chat_template(tmp_path, data_file):
    """A pretrain-style model (no chat template, no ChatML tokens) gets the default template and grows."""
    folder = make_tiny_model(tmp_path / "plain")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    out = tmp_path / "out"
    args = ["finetune", "--model", str(folder), "--data", data_file, "--out", str(out), "--steps", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 steps" in result.output and "trained tokens" in result.output
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()


def test_unknown_lora_target_lists_valid_ones(tiny_lm):
    with pytest.raises(NexttokError, match=r"do not exist in this model; valid: down_proj, gate_proj, k_proj"):
        apply_lora(tiny_lm.model, LoraOptions(targets=["query"]))


def test_tokenizer_that_does_not_match_the_model(tiny_lm):
    from transformers import AutoTokenizer

    big = AutoTokenizer.from_pretrained(tiny_lm.source.location)
    big.add_tokens([f"extra{i}" for i in range(tiny_lm.vocab_size)])
    with pytest.raises(NexttokError, match="do not belong together"):
        check_tokenizer(tiny_lm.model, big)


def test_every_token_masked_is_an_error(tiny_model_dir, data_file, tmp_path):
    args = ["finetune", "-m", str(tiny_model_dir), "-d", data_file, "-o", str(tmp_path / "o"), "--max-length", "8"]
    result = CliRunner().invoke(app, [*args, "--truncate"])
    assert result.exit_code == 2
    assert "error: every record was dropped" in result.output and "no trained tokens" in result.output


def test_merge_needs_lora(tiny_model_dir, data_file, tmp_path):
    args = ["finetune", "-m", str(tiny_model_dir), "-d", data_file, "-o", str(tmp_path / "o"), "--merge"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--merge folds LoRA adapters" in result.output


def test_mask_preview_cli(tiny_model_dir, data_file, tmp_path):
    page = tmp_path / "preview.html"
    args = ["mask-preview", "-m", str(tiny_model_dir), "-d", data_file, "-n", "2", "--html", str(page)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "48 records kept (prompt format)" in result.output
    assert result.output.count("trained,") >= 2
    html = page.read_text()
    assert html.count("<h3>") == 2
    first = html.split("<h3>")[1]
    trained = "".join(part.split("</span>")[0] for part in first.split('<span class="t">')[1:])
    assert trained in {f"{play}&lt;|im_end|&gt;" for play in PLAYS}


def test_mask_preview_warns_on_zero_trained(tiny_model_dir, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "x " * 40, "completion": "y"}) + "\n")
    args = ["mask-preview", "-m", str(tiny_model_dir), "-d", str(path), "--train-on", "last", "--max-length", "10"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "longer than --max-length 10" in result.output


def test_resume_continues_the_same_run(tiny_model_dir, data_file, tmp_path):
    """finetune --resume goes through fit()'s exact resume: 2 + 2 steps end where 4 straight steps do."""
    data = DataOptions(data_file, eval_fraction=0)
    quiet = {"notify": lambda s: None, "lr": 3e-3}
    straight = finetune(str(tiny_model_dir), data, str(tmp_path / "a"), steps=4, **quiet)
    finetune(str(tiny_model_dir), data, str(tmp_path / "b"), steps=4, max_seconds=1e-9, **quiet)  # stops after 1
    resumed = finetune(str(tiny_model_dir), data, str(tmp_path / "b"), steps=4, resume=True, **quiet)
    assert resumed.fit.step == 4
    assert resumed.fit.train_loss == pytest.approx(straight.fit.train_loss, rel=1e-5)


def test_records_longer_than_the_context_are_dropped_and_counted(tiny_model_dir, data_file, tmp_path):
    rows = [json.loads(line) for line in Path(data_file).read_text().splitlines()][:8]
    rows.append({"prompt": "to be or not " * 100, "completion": "Hamlet"})  # > the tiny model's 256 positions
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    notes: list[str] = []
    finetune(str(tiny_model_dir), DataOptions(str(path), eval_fraction=0), str(tmp_path / "o"), steps=1,
             notify=notes.append)  # fmt: skip
    assert any("1 dropped: longer than 256 tokens" in n for n in notes), notes


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_finetune_under_torchrun_equals_one_process_with_accumulation(tiny_model_dir, data_file, tmp_path, lora):
    """torchrun, 2 CPU processes (gloo): finetune runs DDP through the same fit() as pretrain; rank r takes
    micro-batch 2*step + r, the batches one process takes with --grad-accum 2: the same training."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NEXTTOK_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["finetune", "--model", str(tiny_model_dir), "--data", data_file, "--steps", "4", "--batch-size", "4"]
    args += ["--eval-fraction", "0", "--lr", "3e-3", *(["--lora", "--lora-dropout", "0"] if lora else [])]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "nexttok", *args, "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one"), "--grad-accum", "2", "--threads", "1"])
    assert single.exit_code == 0, single.output
    ddp = json.loads((tmp_path / "ddp/checkpoint/trainer_state.json").read_text())
    one = json.loads((tmp_path / "one/checkpoint/trainer_state.json").read_text())
    assert ddp["world"] == 2 and ddp["step"] == one["step"] == 4
    assert ddp["last_loss"] == pytest.approx(one["last_loss"], abs=1e-4)
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert (tmp_path / "ddp" / weights).is_file()  # rank 0 wrote the result
