"""precision: whether bf16 is fast here, measured once; every bf16 option falls back to float32 with a
one-line notice where it is slow."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from nexttok import precision
from nexttok.errors import NexttokError, NexttokNotice

CHECK = "from nexttok.precision import bf16_is_fast, cpu_bf16_ratio; print(bf16_is_fast('cpu'), cpu_bf16_ratio())"


def measured(env: dict[str, str]) -> tuple[bool, float]:
    env = os.environ | env
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True)
    fast, ratio = out.stdout.split()
    return fast == "True", float(ratio)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's ISA cap is an x86 setting")
def test_a_cpu_without_native_bf16_is_measured_slow():
    # Capping oneDNN below AVX-512 BF16 makes bf16 matmuls emulated, as on a Zen 3 or an older Intel CPU
    # (where the cap changes nothing); torch's CPU flags still report AVX-512 BF16 then.
    fast, ratio = measured({"ONEDNN_MAX_CPU_ISA": "AVX2", "NEXTTOK_BF16": "auto"})
    assert not fast and ratio > 10  # emulated: 40-60x slower than fp32 on the machines measured


def test_the_measurement_agrees_with_its_ratio_and_leaves_the_global_random_stream_alone():
    precision.cpu_bf16_ratio.cache_clear()
    state = torch.get_rng_state()
    ratio = precision.cpu_bf16_ratio()
    assert torch.equal(torch.get_rng_state(), state)  # training's dropout draws stay where resume expects them
    fast, _ = measured({"NEXTTOK_BF16": "auto"})
    assert fast == (ratio <= precision.SLOW_RATIO) or abs(ratio - precision.SLOW_RATIO) < 1  # a noisy border


def test_the_setting_overrides_the_measurement(monkeypatch):
    monkeypatch.setenv("NEXTTOK_BF16", "fast")
    assert precision.bf16_is_fast("cpu")
    monkeypatch.setenv("NEXTTOK_BF16", "slow")
    assert not precision.bf16_is_fast("cpu")
    monkeypatch.setenv("NEXTTOK_BF16", "maybe")
    with pytest.raises(NexttokError, match="NEXTTOK_BF16 must be auto, fast or slow"):
        precision.bf16_is_fast("cpu")


def test_use_bf16_falls_back_with_one_notice_only_when_asked(monkeypatch, recwarn):
    monkeypatch.setenv("NEXTTOK_BF16", "slow")
    assert precision.use_bf16(False, "cpu", "--bf16") is False and not recwarn.list  # not asked: nothing said
    with pytest.warns(NexttokNotice) as seen:
        assert precision.use_bf16(True, "cpu", "--bf16") is False
    (message,) = [str(w.message) for w in seen]
    assert message.startswith("--bf16: ") and "float32" in message and "\n" not in message
    monkeypatch.setenv("NEXTTOK_BF16", "fast")
    assert precision.use_bf16(True, "cpu", "--bf16") is True


def test_dtype_bfloat16_loads_float32_where_bf16_is_slow_and_the_cli_says_so(tiny_model_dir, monkeypatch):
    from nexttok.cli import app
    from nexttok.models import load_model_and_tokenizer

    monkeypatch.setenv("NEXTTOK_BF16", "fast")
    model, _, _ = load_model_and_tokenizer(str(tiny_model_dir), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    monkeypatch.setenv("NEXTTOK_BF16", "slow")
    with pytest.warns(NexttokNotice, match="--dtype bfloat16"):
        model, _, _ = load_model_and_tokenizer(str(tiny_model_dir), dtype="bfloat16")
    assert model.dtype == torch.float32
    r = CliRunner().invoke(app, ["predict", "the king", "--model", str(tiny_model_dir), "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "--dtype bfloat16" in notes[0] and "float32 instead" in notes[0]
    assert "Warning" not in r.stderr  # one line, not Python's two-line warning format
