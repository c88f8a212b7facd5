"""A library user's process is left as it was: the garbage collector, logging and progress bars, and a
model passed in (its attributes and where its parameters live) after ``generate()``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import nexttok
from nexttok import weights
from nexttok.sampling import SamplingConfig

HOST = """
import gc, json, logging, sys
import transformers
from transformers.utils import logging as hf_logging
gc.set_threshold(1234, 7, 9)
gc.disable()
hf_logging.set_verbosity_info()
hf_logging.enable_progress_bar()
logging.getLogger().setLevel(logging.DEBUG)
def state():
    return {"gc": [gc.isenabled(), list(gc.get_threshold()), gc.get_freeze_count()],
            "hf": [hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()],
            "root": [logging.getLogger().level, len(logging.getLogger().handlers)]}
before = state()
import nexttok
after_import = state()
lm = nexttok.load(sys.argv[1])
print(json.dumps([before, after_import, state()]))
"""


def test_import_and_load_leave_the_collector_logging_and_progress_bars_as_they_were(tiny_model_dir):
    out = subprocess.run([sys.executable, "-c", HOST, str(tiny_model_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after_import, after_load = json.loads(out.stdout)
    assert after_import == before  # gc enabled state, thresholds and freeze count included
    assert after_load == before


def snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    """Every module's attribute names, and every parameter's address and version."""
    attrs = {name: sorted(vars(m)) for name, m in model.named_modules()}
    params = {name: (p.data_ptr(), p._version) for name, p in model.named_parameters()}
    return attrs, params


@pytest.mark.parametrize("samples", [1, 3])
def test_generate_leaves_a_model_passed_in_as_it_was(tiny_model_dir, monkeypatch, samples):
    monkeypatch.setattr(weights, "RELAYOUT_AFTER", 3)  # the long-run relayout happens within this test
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = snapshot(model)
    lm = nexttok.LM(model, tok)
    config = SamplingConfig(seed=1, max_new_tokens=12, ignore_eos=True)
    steps = list(nexttok.generate(lm, "the king", config, num_samples=samples))
    assert len(steps) == 12 * samples
    # The compiled decoder ran past the relayout point and made its packed copy, owned by the LM.
    assert lm.weights.kernel_steps >= 3 and lm.weights.packed() is not None
    assert snapshot(model) == before
    lm.distribution("the king").top(3)  # predict's path too
    assert snapshot(model) == before


def test_a_model_nexttok_loaded_may_move_its_own_weights(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(weights, "RELAYOUT_AFTER", 3)
    lm = nexttok.load(str(tiny_model_dir))
    assert lm.weights.owns_model
    wrapped = nexttok.LM(lm.model, lm.tokenizer)
    assert not wrapped.weights.owns_model  # wrapping a model in memory never moves it
