"""`nexttok corpus`, `predict --corpus`, `generate --corpus`, `serve --corpus`, `patterns` and `memorization`
end to end on tiny models, against brute-force answers; and their bad inputs."""

from __future__ import annotations

import json
from importlib.resources import files

import httpx
import jsonschema
import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer, tiny_corpus
from serving import running
from typer.testing import CliRunner

from nexttok.cli import app
from nexttok.corpus import CorpusIndex, count, index_corpus, infgram

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    body = tiny_corpus(6000)
    (folder / "a.txt").write_text(body[:3000], encoding="utf-8")
    (folder / "b.txt").write_text(body[3000:], encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, texts, tiny_model_dir):
    out = tmp_path_factory.mktemp("idx") / "corpus"
    r = run("corpus", "index", texts, "--model", tiny_model_dir, "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_index_maps_positions_to_file_and_line(index_dir, texts, tiny_lm):
    index = CorpusIndex(index_dir)
    assert index.manifest["documents"] == 2 and index.manifest["bytes_on_disk"] / index.manifest["tokens"] <= 16
    text = (texts / "b.txt").read_text()
    lines = text.split("\n")
    n = next(i for i, line in enumerate(lines[5:], 5) if len(line) > 25 and line[0].isalpha())
    phrase = lines[n][:25]
    ids = tiny_lm.encode(phrase)
    assert count(index, ids) >= 1
    from nexttok.corpus import locate

    hits = [w for w in locate(index, ids, 50) if w.file.endswith("b.txt")]
    want = [i + 1 for i, line in enumerate(lines) if line.startswith(phrase)]
    assert sorted(w.line for w in hits) == want


def test_split_heldout_indexes_the_recipes_tail(tmp_path, texts, tiny_lm):
    from nexttok.data.blocks import split_documents
    from nexttok.data.sources import load_corpus

    index = index_corpus(tiny_lm, [str(texts)], tmp_path / "held", split="heldout", show=False)
    _, held = split_documents(load_corpus([str(texts)]).documents, 0.1, "tail", 0)
    tokens = np.asarray(index.tokens)
    docs = np.split(tokens, np.flatnonzero(tokens == 0xFFFFFFFF) + 1)[:-1]
    assert "".join(tiny_lm.tokenizer.decode(d[:-1].tolist()) for d in docs) == held[0]


def test_query_json_is_the_brute_force_count(index_dir, tiny_model_dir, tiny_lm):
    r = run("corpus", "query", index_dir, "the king", "--model", tiny_model_dir, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    tokens = np.asarray(CorpusIndex(index_dir).tokens).tolist()
    ids = tiny_lm.encode("the king")
    brute = sum(tokens[i : i + len(ids)] == ids for i in range(len(tokens) - len(ids) + 1))
    assert out["count"] == brute


def test_predict_corpus_json_matches_schema_and_the_index(index_dir, tiny_model_dir, tiny_lm):
    schema = json.loads(files("nexttok").joinpath("schemas/predict.schema.json").read_text())
    r = run("predict", "And the king", "--model", tiny_model_dir, "--corpus", index_dir, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    jsonschema.validate(out, schema)
    g = infgram(CorpusIndex(index_dir), tiny_lm.encode("And the king"))
    c = out["corpus"]
    assert c["suffix_length"] == g.length and c["occurrences"] == g.occurrences
    assert c["top1_agrees"] == (g.top1 == tiny_lm.distribution("And the king").top(1)[0].id)
    assert abs(sum(n["share"] for n in c["next"]) - 1) < 1e-9 or c["distinct_next"] > len(c["next"])


def test_generate_corpus_json_spans_are_verbatim(index_dir, tiny_model_dir):
    r = run("generate", "the", "--model", tiny_model_dir, "--corpus", index_dir, "--min-span", 2, "-n", 24,
            "-T", 0, "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    sample = json.loads(r.stdout)["samples"][0]
    corpus = sample["corpus"]
    ids = [t["id"] for t in sample["tokens"]]
    index = CorpusIndex(index_dir)
    covered = set()
    for s in corpus["spans"]:
        assert s["stop"] - s["start"] >= 2 and count(index, ids[s["start"] : s["stop"]]) == s["occurrences"] > 0
        assert count(index, ids[s["start"] : s["stop"] + 1]) == 0 or s["stop"] == len(ids)  # maximal
        covered |= set(range(s["start"], s["stop"]))
    assert corpus["coverage"] == pytest.approx(len(covered) / len(ids))


def test_generate_corpus_table_highlights_and_says_where(index_dir, tiny_model_dir):
    r = run("generate", "the", "--model", tiny_model_dir, "--corpus", index_dir, "--min-span", 1, "-n", 8, "-T", 0)
    assert r.exit_code == 0, r.output
    assert "verbatim spans" in r.output and "of the 8 output tokens" in r.output and ".txt:" in r.output


def test_serve_corpus_puts_spans_in_the_extension(index_dir, tiny_lm):
    with running(lambda: tiny_lm, corpus=str(index_dir), min_span=2) as (base, _):
        body = {"model": "default", "prompt": "the", "max_tokens": 12, "temperature": 0}
        out = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        ids = [t["id"] for t in out["nexttok"]["choices"][0]["tokens"]]
        corpus = out["nexttok"]["choices"][0]["corpus"]
        from nexttok.corpus.report import spans_report

        assert corpus == spans_report(tiny_lm, CorpusIndex(index_dir), ids, 2)
        with httpx.stream("POST", f"{base}/v1/completions", json=body | {"stream": True}, timeout=60) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert chunks[-1]["nexttok"]["corpus"] == corpus


def test_patterns_agreement_table_equals_its_positions(index_dir, tiny_model_dir, texts, tmp_path):
    png = tmp_path / "p.png"
    r = run("patterns", "--model", tiny_model_dir, "--corpus", index_dir, "--data", texts / "a.txt",
            "--split", "all", "--limit-tokens", 300, "--json", "--plot", png)  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert sum(b["positions"] for b in out["buckets"]) == out["positions"] == 300
    assert sum(b["share"] for b in out["buckets"]) == pytest.approx(1)
    assert png.stat().st_size > 1000


def test_patterns_positions_are_the_corpus_top1(index_dir, tiny_lm, texts):
    from nexttok.corpus.patterns import patterns

    index = CorpusIndex(index_dir)
    r = patterns(tiny_lm, index, str(texts / "b.txt"), limit_tokens=120)
    ids = tiny_lm.tokenizer((texts / "b.txt").read_text(), add_special_tokens=False)["input_ids"][:120]
    first = 120 - r.positions  # 0 with a BOS (the first token is scored too), else 1
    for t in range(first, 120, 7):
        g = infgram(index, ids[:t])
        i = t - first
        assert r.suffix_length[i] == g.length and r.corpus_top1[i] == g.top1 and r.target[i] == ids[t]


def memorized_model(folder, text: str, steps: int = 400, block: int = 16):
    """The tiny model trained on one string until it reproduces it: every block of it, as pretraining
    feeds blocks that start anywhere."""
    import nexttok

    make_tiny_model(folder)
    lm = nexttok.load(str(folder))
    full = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([full[i : i + block] for i in range(len(full) - block + 1)])  # (B, block)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=3e-3)
    lm.model.train()
    for _ in range(steps):
        loss = lm.model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.model.eval()
    lm.model.save_pretrained(folder)
    return folder


def test_memorized_string_is_extractable_and_unseen_ones_are_not(tmp_path):
    # Strings of the same shape: distinct made-up words, so a few tokens of prefix say where one is.
    words = [a + b for a in ("ka", "mo", "ri", "tu", "se", "ln") for b in ("pet", "dor", "vis", "gam", "rul")]
    order = np.random.default_rng(0).permutation(len(words))
    seen = " ".join(words[i] for i in order[:15]) + "\n"
    unseen = " ".join(words[i] for i in order[15:]) + "\n"
    (tmp_path / "seen.txt").write_text(seen)
    (tmp_path / "unseen.txt").write_text(unseen)
    model = memorized_model(tmp_path / "m", seen)
    r = run("corpus", "index", tmp_path / "seen.txt", "--model", model, "--out", tmp_path / "idx")
    assert r.exit_code == 0, r.output
    r = run("memorization", "--model", model, "--corpus", tmp_path / "idx", "--data", tmp_path / "unseen.txt",
            "--split", "all", "-k", 8, "-s", 8, "--windows", 40, "--baseline", "init", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    sides = {(s["model"], s["windows"]): s for s in json.loads(r.stdout)["sides"]}
    assert sides[(str(model), "train")]["extractable"] == 1.0
    assert sides[(str(model), "heldout")]["extractable"] <= 0.1
    assert sides[("untrained init", "train")]["extractable"] == 0.0
    assert sides[(str(model), "train")]["mean_logprob"] > sides[(str(model), "heldout")]["mean_logprob"]


def test_teacher_forced_extraction_equals_greedy_decoding(tiny_lm, index_dir):
    import nexttok
    from nexttok.corpus import memorization as mem

    windows = mem.sample_windows(CorpusIndex(index_dir).tokens, 12, 6, 0)
    exact, _ = mem.suffix_scores(tiny_lm, windows, 6)
    config = nexttok.SamplingConfig(temperature=0, max_new_tokens=6, ignore_eos=True)
    for w, e in zip(windows, exact, strict=True):
        greedy = [s.id for s in nexttok.generate(tiny_lm, w[:6].tolist(), config)]
        assert e == (greedy == w[6:].tolist())


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "x", "--min-span", 0], "--min-span must be at least 1"),
        (["memorization", "-k", 0], "--prefix must be at least 1"),
        (["memorization", "-s", 0], "--suffix must be at least 1"),
        (["predict", "x", "--corpus", "."], "not a corpus index"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tiny_model_dir, index_dir):
    if args[0] == "memorization":
        args = [*args, "--corpus", index_dir]
    r = run(*args, "--model", tiny_model_dir)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_index_built_with_another_tokenizer_is_refused(tmp_path, texts, tiny_model_dir):
    other = tmp_path / "other"

    other.mkdir()
    make_tiny_tokenizer(other, vocab_size=300)
    from transformers import AutoTokenizer

    import nexttok

    lm = nexttok.load(str(tiny_model_dir))
    lm.tokenizer = AutoTokenizer.from_pretrained(other)
    index_corpus(lm, [str(texts)], tmp_path / "idx2", show=False)
    r = run("predict", "the", "--model", tiny_model_dir, "--corpus", tmp_path / "idx2")
    assert r.exit_code == 2 and "another tokenizer" in r.output


def test_empty_corpus_is_refused(tmp_path, tiny_model_dir):
    (tmp_path / "empty.txt").write_text("")
    r = run("corpus", "index", tmp_path / "empty.txt", "--model", tiny_model_dir, "--out", tmp_path / "i")
    assert r.exit_code == 2 and "empty" in r.output
