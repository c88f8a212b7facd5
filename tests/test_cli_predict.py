"""`nexttok predict` and `nexttok tokenize` end to end on the tiny model, and every bad input's
one-line error with exit code 2."""

import json
import shutil
import subprocess
import sys
from importlib.resources import files

import jsonschema
import pytest
from typer.testing import CliRunner

from nexttok.cli import app

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def schema():
    return json.loads(files("nexttok").joinpath("schemas/predict.schema.json").read_text())


def test_predict_table_shows_top_candidates(tiny_model_dir, tiny_lm):
    r = run("predict", "the king", "--model", tiny_model_dir, "--top", 5)
    assert r.exit_code == 0, r.output
    d = tiny_lm.distribution("the king")
    for row in d.top(5):
        assert f"{row.prob:.4f}" in r.output
    assert "entropy" in r.output and f"vocabulary {d.vocab_size:,}" in r.output


def test_predict_json_matches_schema_and_library(tiny_model_dir, tiny_lm, schema):
    r = run("predict", "the king", "--model", tiny_model_dir, "--json", "--top", 7, "--token", " the", "--token-id", 5)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    jsonschema.validate(out, schema)
    d = tiny_lm.distribution("the king")
    dist = out["distributions"][0]
    assert [row["id"] for row in dist["top"]] == [row.id for row in d.top(7)]
    assert dist["entropy_nats"] == pytest.approx(d.entropy)
    assert [t["id"] for t in out["prompt_tokens"]] == tiny_lm.encode("the king")
    assert dist["tokens"][0]["rank"] == d.rank(" the") and dist["tokens"][1]["ids"] == [5]


def test_predict_temperatures_side_by_side(tiny_model_dir, schema, tmp_path):
    png = tmp_path / "t.png"
    r = run("predict", "the king", "-m", tiny_model_dir, "--temperatures", "0.5,1,2", "--json", "--plot", png)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    jsonschema.validate(out, schema)
    ents = [d["entropy_bits"] for d in out["distributions"]]
    assert [d["temperature"] for d in out["distributions"]] == [0.5, 1.0, 2.0]
    assert ents[0] < ents[1] < ents[2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run("predict", "the king", "-m", tiny_model_dir, "--temperatures", "0.5,1,2")
    assert "T=0.5" in table.output and "T=2" in table.output and "entropy (bits)" in table.output


def test_predict_reads_stdin_and_chat(tiny_model_dir, tiny_lm):
    r = run("predict", "-", "-m", tiny_model_dir, "--json", input="the king")
    assert json.loads(r.stdout)["prompt_tokens"][0]["id"] == tiny_lm.encode("the king")[0]
    r = run("predict", "hello", "-m", tiny_model_dir, "--json", "--chat")
    assert [t["id"] for t in json.loads(r.stdout)["prompt_tokens"]] == tiny_lm.encode("hello", chat=True)


def test_token_lines(tiny_model_dir, tiny_lm):
    d = tiny_lm.distribution("the king")
    r = run("predict", "the king", "-m", tiny_model_dir, "--token", " understanding")
    assert r.exit_code == 0, r.output
    assert "tokens" in r.output and "chain rule" in r.output
    assert f"rank {d.rank(' understanding'):,} of {d.vocab_size:,}" in r.output


def test_tokenize(tiny_model_dir, tiny_lm):
    r = run("tokenize", "the king\nx", "-m", tiny_model_dir, "--json")
    out = json.loads(r.stdout)
    assert [t["id"] for t in out["tokens"]] == tiny_lm.encode("the king\nx")
    assert "".join(t["text"] for t in out["tokens"]) == "the king\nx"
    assert "↵" in run("tokenize", "a\nb", "-m", tiny_model_dir).output


@pytest.fixture(scope="module")
def no_bos_model(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nobos") / "m"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["bos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def bad_inputs(tiny_model_dir, no_bos_model, tmp_path):
    (tmp_path / "empty").mkdir()
    return [
        (["predict", "", "-m", no_bos_model], None, "prompt is empty"),
        (["predict", "x", "-m", tmp_path / "nope"], None, "does not exist"),
        (["predict", "x", "-m", tmp_path / "empty"], None, "not a model folder"),
        (["predict", "x", "-m", tiny_model_dir, "--temperature", "0"], None, "temperature 0 in `nexttok generate`"),
        (["predict", "x", "-m", tiny_model_dir, "--temperatures", "1,-2"], None, "must be > 0"),
        (["predict", "x", "-m", tiny_model_dir, "--top", "0"], None, "--top must be at least 1"),
        (["predict", "x", "-m", tiny_model_dir, "--token", ""], None, "cannot encode"),
        (["predict", "x", "-m", tiny_model_dir, "--token-id", "999999"], None, "outside the vocabulary"),
        (["predict", "-", "-m", tiny_model_dir], b"caf\xe9 \xff", "not valid UTF-8"),
        (["predict", "x", "-m", tiny_model_dir, "--dtype", "float16"], None, "--dtype must be one of"),
        (["predict", "x", "-m", tiny_model_dir, "--threads", "0"], None, "--threads must be at least 1"),
    ]


def test_bad_input_one_line_exit_2(tiny_model_dir, no_bos_model, tmp_path):
    for args, stdin, message in bad_inputs(tiny_model_dir, no_bos_model, tmp_path):
        r = runner.invoke(app, [str(a) for a in args], input=stdin)
        assert r.exit_code == 2, (args, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, r.stderr)
        assert "Traceback" not in r.output


def test_empty_prompt_uses_bos(tiny_model_dir, tiny_lm):
    r = run("predict", "", "-m", tiny_model_dir, "--json")
    assert r.exit_code == 0
    assert [t["id"] for t in json.loads(r.stdout)["prompt_tokens"]] == [tiny_lm.tokenizer.bos_token_id]


def test_console_script_exit_code(tmp_path):
    """The real entry point (python -m nexttok): one line on stderr, exit 2, no traceback."""
    p = subprocess.run(
        [sys.executable, "-m", "nexttok", "predict", "x", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_console_script_flushes_everything_before_its_quick_exit(tiny_model_dir):
    """predict leaves without the interpreter's teardown (cli.main): stdout must still be complete."""
    cmd = ["predict", "ROMEO:", "--model", str(tiny_model_dir), "--json", "--top", "100000"]
    p = subprocess.run(
        [sys.executable, "-m", "nexttok", *cmd],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # the whole document arrived, not a cut-off buffer
    assert len(doc["distributions"][0]["top"]) == doc["vocab_size"]  # every row (--top is clamped)


def test_quick_exit_flushes_runs_atexit_and_keeps_the_code():
    code = (
        "import atexit, sys\n"
        "from nexttok.cli import _leave_now\n"
        "atexit.register(lambda: sys.stdout.write(' bye'))\n"
        "sys.stdout.write('unflushed')\n"
        "_leave_now(3)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (p.returncode, p.stdout) == (3, "unflushed bye")
