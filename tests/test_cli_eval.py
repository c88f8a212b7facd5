"""`nexttok eval` end to end: the pretraining run's own held-out figures, torchrun, records, two models,
bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_model, tiny_corpus
from test_pretrain_cli import RECIPE
from typer.testing import CliRunner

from nexttok.cli import app


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny pretraining run (held-out: the text's last 10%); its folder holds final_eval.json."""
    tmp = tmp_path_factory.mktemp("pretrained")
    (tmp / "corpus.txt").write_text(tiny_corpus(12000))
    (tmp / "tiny.yaml").write_text(RECIPE.format(data=tmp / "corpus.txt", out=tmp / "run"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEXTTOK_CACHE", str(tmp / "cache"))
        res = CliRunner().invoke(app, ["pretrain", "-c", str(tmp / "tiny.yaml"), "--threads", "1"])
    assert res.exit_code == 0, res.output
    return tmp


def run_eval(*args: str) -> dict:
    res = CliRunner().invoke(app, ["eval", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_eval_of_the_heldout_split_is_the_pretraining_runs_own_final_figure(pretrained):
    final = json.loads((pretrained / "run/final_eval.json").read_text())
    out = run_eval("-m", str(pretrained / "run"), "--data", str(pretrained / "corpus.txt"), "--split", "heldout")
    m = out["metrics"]
    assert m["tokens"] == final["tokens"]
    assert m["bits_per_char"] == pytest.approx(final["bits_per_char"], rel=1e-5)
    assert m["loss"] == pytest.approx(final["loss"], rel=1e-5)
    text = CliRunner().invoke(app, ["eval", "-m", str(pretrained / "run"), "-d", str(pretrained / "corpus.txt"),
                                    "--split", "heldout"]).output  # fmt: skip
    assert f"{final['bits_per_char']:.4f} ±" in text  # the table prints the run's figure


def test_torchrun_gives_the_same_totals_as_one_process(pretrained, tmp_path):
    args = ["eval", "-m", str(pretrained / "run"), "-d", str(pretrained / "corpus.txt"), "--json", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, "-m", "nexttok", *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(proc.stdout)["metrics"]  # rank 0 alone prints
    one = run_eval(*args[1:-3], "--batch-size", "2")["metrics"]
    assert ddp["tokens"] == one["tokens"]
    for k in ("loss", "bits_per_char", "top1", "ece", "brier"):
        assert ddp[k] == pytest.approx(one[k], rel=1e-9), k


def test_records_html_and_the_reliability_diagram(tiny_model_dir, tmp_path):
    (tmp_path / "t.txt").write_text(tiny_corpus(2500))
    base = ["-m", str(tiny_model_dir), "-d", str(tmp_path / "t.txt"), "--context", "64"]
    out = run_eval(*base, "--tokens", str(tmp_path / "r.jsonl"), "--html", str(tmp_path / "t.html"),
                   "--plot", str(tmp_path / "rel.png"))  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    m = out["metrics"]
    assert len(rows) == m["tokens"]
    assert -sum(r["logprob"] for r in rows) / len(rows) == pytest.approx(m["loss"], rel=1e-6)
    assert min(r["context"] for r in rows) == m["context_min"]
    page = (tmp_path / "t.html").read_text()
    assert page.count('class="t"') == m["tokens"] and "http" not in page  # self-contained
    assert (tmp_path / "rel.png").read_bytes()[:4] == b"\x89PNG"
    assert sum(b["count"] for b in m["reliability"]) == m["tokens"]
    run_eval(*base, "--tokens", str(tmp_path / "r.parquet"))
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "r.parquet")
    assert table.num_rows == m["tokens"] and sum(table.column("rank").to_pylist()) == sum(r["rank"] for r in rows)


def test_a_model_against_itself_has_zero_kl_and_full_agreement(tiny_model_dir, tmp_path):
    (tmp_path / "t.txt").write_text(tiny_corpus(2000))
    out = run_eval(
        "-m", str(tiny_model_dir), "-m", str(tiny_model_dir), "-d", str(tmp_path / "t.txt"), "--context", "64"
    )
    assert out["kl"]["max"] == pytest.approx(0, abs=1e-6) and out["top1_agreement"] == 1.0
    assert out["perplexity_ratio"] == pytest.approx(1.0)
    assert out["a"]["tokens"] == out["b"]["tokens"] and len(out["differ_most"]) == 10


def test_two_models_that_differ(tiny_model_dir, tmp_path):
    other = make_tiny_model(tmp_path / "other", seed=3)
    (tmp_path / "t.txt").write_text(tiny_corpus(2000))
    out = run_eval("-m", str(tiny_model_dir), "-m", str(other), "-d", str(tmp_path / "t.txt"), "--context", "64")
    assert out["kl"]["mean"] > 0.01 and out["top1_agreement"] < 1
    assert out["perplexity_ratio"] == pytest.approx(out["b"]["perplexity"] / out["a"]["perplexity"])
    assert out["differ_most"][0]["kl"] == pytest.approx(out["kl"]["max"], rel=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--context", "64", "--stride", "64"], "--stride must be between 1 and the context minus 1"),
        (["--context", "64", "--stride", "0"], "--stride must be between 1"),
        (["--context", "4096"], "above the model's 256 positions"),
        (["--windows", "sliding"], "--windows must be one of strided, disjoint"),
        (["--split", "test"], "--split must be one of all, heldout, train"),
        (["--dtype", "float32", "--dtype", "bfloat16"], "give one --dtype, or one per --model (2 for 1)"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(tiny_model_dir, tmp_path, extra, message):
    (tmp_path / "t.txt").write_text(tiny_corpus(500))
    res = CliRunner().invoke(app, ["eval", "-m", str(tiny_model_dir), "-d", str(tmp_path / "t.txt"), *extra])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("t.txt", "", "the corpus is empty"), ("t.jsonl", '{"text": "a"}\n', "at least two")],  # "a": one token
)
def test_an_empty_or_one_token_text_is_refused(tiny_model_dir, tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    res = CliRunner().invoke(app, ["eval", "-m", str(tiny_model_dir), "-d", str(tmp_path / name), "--no-bos"])
    assert res.exit_code == 2 and message in res.output


def test_two_models_with_different_tokenizers_are_refused(tiny_model_dir, pretrained):
    res = CliRunner().invoke(app, ["eval", "-m", str(tiny_model_dir), "-m", str(pretrained / "run"),
                                   "-d", str(pretrained / "corpus.txt")])  # fmt: skip
    assert res.exit_code == 2 and "different tokenizers" in res.output
