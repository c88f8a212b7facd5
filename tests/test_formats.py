"""Fine-tuning data formats: detection, reading every file type, malformed and skipped records."""

from __future__ import annotations

import json

import pytest

from nexttok.data.formats import read_dataset
from nexttok.errors import NexttokError

SHAPES = {
    "prompt": {"prompt": "Which play?", "completion": "Hamlet"},
    "alpaca": {"instruction": "Name the play.", "input": "To be, or not to be", "output": "Hamlet"},
    "messages": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Which play?"},
            {"role": "assistant", "content": "Hamlet"},
        ]
    },
    "sharegpt": {"conversations": [{"from": "human", "value": "Which play?"}, {"from": "gpt", "value": "Hamlet"}]},
    "text": {"text": "To be, or not to be, that is the question."},
}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("fmt", list(SHAPES))
def test_detects_each_record_shape(tmp_path, fmt):
    data = read_dataset(write_jsonl(tmp_path / "d.jsonl", [SHAPES[fmt]] * 3))
    assert data.fmt == fmt
    assert len(data.records) == 3
    rec = data.records[0]
    if fmt == "text":
        assert rec.text.startswith("To be") and not rec.is_chat
    else:
        assert rec.messages[-1] == {"role": "assistant", "content": "Hamlet"}


def test_alpaca_input_joins_the_instruction(tmp_path):
    rec = read_dataset(write_jsonl(tmp_path / "a.jsonl", [SHAPES["alpaca"]])).records[0]
    assert rec.messages[0] == {"role": "user", "content": "Name the play.\n\nTo be, or not to be"}


def test_sharegpt_roles_map_to_chat_roles(tmp_path):
    rec = read_dataset(write_jsonl(tmp_path / "s.jsonl", [SHAPES["sharegpt"]])).records[0]
    assert [m["role"] for m in rec.messages] == ["user", "assistant"]


def test_json_csv_parquet_and_text_files(tmp_path):
    rows = [{"prompt": f"line {i}", "completion": f"play {i}"} for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"line {i},play {i}\n" for i in range(4)))
    for name in ["d.json", "d.parquet", "d.csv"]:
        data = read_dataset(tmp_path / name)
        assert data.fmt == "prompt"
        assert [r.messages[1]["content"] for r in data.records] == [f"play {i}" for i in range(4)], name
    (tmp_path / "d.txt").write_text("First paragraph\nstill first.\n\nSecond one.\n")
    text = read_dataset(tmp_path / "d.txt")
    assert [r.text for r in text.records] == ["First paragraph\nstill first.", "Second one."]
    assert text.records[1].where.endswith("d.txt:4")


def test_csv_chat_column_as_json_text(tmp_path):
    cell = json.dumps(SHAPES["messages"]["messages"]).replace('"', '""')
    (tmp_path / "c.csv").write_text(f'messages\n"{cell}"\n')
    data = read_dataset(tmp_path / "c.csv")
    assert data.fmt == "messages" and data.records[0].messages[2]["content"] == "Hamlet"


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(NexttokError, match=r"bad\.jsonl:2: not valid JSON"):
        read_dataset(path)


def test_wrong_field_type_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [SHAPES["prompt"], {"prompt": "a", "completion": 3}])
    with pytest.raises(NexttokError, match=r"t\.jsonl:2: field 'completion' must be a string"):
        read_dataset(path)


def test_unknown_role_is_an_error(tmp_path):
    row = {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(NexttokError, match="role 'wizard'"):
        read_dataset(write_jsonl(tmp_path / "r.jsonl", [row]))


def test_empty_completions_are_skipped_and_counted(tmp_path):
    rows = [SHAPES["prompt"], {"prompt": "x", "completion": "  "}, {"prompt": "y", "completion": ""}]
    data = read_dataset(write_jsonl(tmp_path / "e.jsonl", rows))
    assert len(data.records) == 1
    assert data.skipped["empty completion"] == 2
    assert "1 records kept" in data.summary() and "2 empty completion" in data.summary()


def test_all_skipped_is_an_error(tmp_path):
    with pytest.raises(NexttokError, match="every record was skipped"):
        read_dataset(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "x", "completion": ""}]))


def test_undetectable_keys_suggest_format(tmp_path):
    with pytest.raises(NexttokError, match=r"cannot detect the format.*--format"):
        read_dataset(write_jsonl(tmp_path / "u.jsonl", [{"question": "a", "answer": "b"}]))


def test_forced_format_and_bad_format_name(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "hello", "prompt": "p", "completion": "c"}])
    assert read_dataset(path).fmt == "prompt"
    assert read_dataset(path, fmt="text").records[0].text == "hello"
    with pytest.raises(NexttokError, match="--format must be one of"):
        read_dataset(path, fmt="xml")


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(NexttokError, match="does not exist"):
        read_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(NexttokError, match="cannot tell the file type"):
        read_dataset(tmp_path / "d.xml")
