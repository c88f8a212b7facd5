"""--device: where the model runs. The choice and its errors are tested on every machine; the GPU tests
run where torch sees a CUDA GPU (CI has none: they ran on an H200, see docs/generate.md, "On a GPU")."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_corpus
from test_finetune import data_file, held_out_loss  # noqa: F401 (data_file: a fixture)
from test_pretrain_cli import RECIPE
from test_train import ToySource, config, tiny_model
from typer.testing import CliRunner

from nexttok.cli import app
from nexttok.errors import NexttokError
from nexttok.finetune import DataOptions, LoraOptions, finetune
from nexttok.generate import generate
from nexttok.models import resolve_device
from nexttok.sampling import SamplingConfig
from nexttok.train import _rng_state, _set_rng_state, fit

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the device machine)")
PROMPT = "the king"
# A device this machine does not have: a CUDA GPU where torch sees none, else one past the last.
MISSING = f"cuda:{torch.cuda.device_count()}" if CUDA else "cuda"


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_auto_is_the_gpu_when_torch_sees_one_else_the_cpu(monkeypatch):
    monkeypatch.delenv("NEXTTOK_DEVICE")
    assert resolve_device().type == ("cuda" if CUDA else "cpu")
    assert resolve_device("auto") == resolve_device(None)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("NEXTTOK_DEVICE", "cpu")
    assert resolve_device() == torch.device("cpu")  # the environment names the default


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tpu", "--device must be auto, cpu, cuda, cuda:N or mps (got 'tpu')"),
        ("cuda:x", "--device must be auto, cpu, cuda, cuda:N or mps"),
        (MISSING, "CUDA GPU"),
    ],
)
def test_a_device_that_is_not_there_is_refused(name, message):
    with pytest.raises(NexttokError, match="--device") as e:
        resolve_device(name)
    assert message in str(e.value) and e.value.param == "device"


@pytest.mark.parametrize("command", ["predict", "generate"])
def test_cli_refuses_a_missing_device_in_one_line(tiny_model_dir, command):
    r = run(command, PROMPT, "--model", tiny_model_dir, "--device", MISSING)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: --device") and "CUDA GPU" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_pretrain_refuses_a_missing_device_before_any_work(tmp_path):
    (tmp_path / "c.txt").write_text(tiny_corpus(2000))
    (tmp_path / "r.yaml").write_text(RECIPE.format(data=tmp_path / "c.txt", out=tmp_path / "run"))
    r = run("pretrain", "-c", tmp_path / "r.yaml", "--device", "tpu")
    assert r.exit_code == 2 and "--device must be" in r.stderr, r.output
    assert not (tmp_path / "run").exists()


def test_rng_state_round_trips_and_reads_a_cpu_checkpoint():
    cpu = torch.device("cpu")
    state = _rng_state(cpu)
    a = torch.rand(3)
    _set_rng_state(state, cpu)
    assert torch.equal(torch.rand(3), a)
    _set_rng_state({"cpu": state, "cuda": None}, cpu)  # written on a GPU, resumed on a CPU: the CPU part
    assert torch.equal(torch.rand(3), a)


# --- on a CUDA GPU -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_lm(tiny_model_dir):
    import nexttok

    return nexttok.load(str(tiny_model_dir), device="cuda")


@gpu
def test_gpu_model_is_on_the_gpu_and_predicts_as_on_the_cpu(gpu_lm, tiny_lm):
    assert gpu_lm.model.device.type == "cuda" and tiny_lm.model.device.type == "cpu"
    ids = gpu_lm.encode(PROMPT)
    logits = gpu_lm.last_logits(ids)
    assert logits.device.type == "cpu"  # the distribution side runs on the CPU
    torch.testing.assert_close(logits, tiny_lm.last_logits(ids), atol=1e-4, rtol=1e-4)
    d = gpu_lm.distribution(PROMPT)
    assert abs(float(d.probs.sum()) - 1) < 1e-5


@gpu
def test_gpu_greedy_equals_hf_generate_on_the_gpu(gpu_lm):
    ids = gpu_lm.encode(PROMPT)
    config = SamplingConfig(temperature=0, max_new_tokens=40, ignore_eos=True)
    ours = [s.id for s in generate(gpu_lm, ids, config)]
    x = torch.tensor([ids], device="cuda")
    hf = gpu_lm.model.generate(x, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert ours == hf[0, len(ids) :].tolist()


@gpu
def test_gpu_seed_draws_the_same_tokens_as_on_the_cpu(gpu_lm, tiny_lm):
    assert tiny_lm.model.device.type == "cpu"
    config = SamplingConfig(seed=7, max_new_tokens=24, ignore_eos=True, top_k=50, top_p=0.9)
    on_gpu = [s.id for s in generate(gpu_lm, PROMPT, config)]
    assert on_gpu == [s.id for s in generate(gpu_lm, PROMPT, config)]
    assert on_gpu == [s.id for s in generate(tiny_lm, PROMPT, config)]  # the seed's stream is the CPU's


@gpu
def test_gpu_n_samples_share_one_prefill(gpu_lm, monkeypatch):
    from nexttok.torchdecode import TorchDecoder

    calls = []
    forward = TorchDecoder._forward
    monkeypatch.setattr(
        TorchDecoder, "_forward", lambda self, x, *a, **k: calls.append(tuple(x.shape)) or forward(self, x, *a, **k)
    )
    config = SamplingConfig(seed=3, max_new_tokens=6, ignore_eos=True)
    steps = list(generate(gpu_lm, PROMPT, config, num_samples=4))
    assert calls == [(1, len(gpu_lm.encode(PROMPT)))] + [(4, 1)] * 5
    assert len(steps) == 24


@gpu
def test_gpu_cli_generate_and_predict(tiny_model_dir, tiny_lm):
    r = run("generate", PROMPT, "--model", tiny_model_dir, "-n", 12, "--seed", 3, "--ignore-eos", "--device", "cuda")
    assert r.exit_code == 0, r.output
    config = SamplingConfig(seed=3, max_new_tokens=12, ignore_eos=True)
    assert r.stdout == "".join(s.delta for s in generate(tiny_lm, PROMPT, config)) + "\n"
    r = run("predict", PROMPT, "--model", tiny_model_dir, "--json", "--device", "cuda")
    assert r.exit_code == 0, r.output
    top = json.loads(r.stdout)["distributions"][0]["top"][0]
    assert top["id"] == int(tiny_lm.last_logits(tiny_lm.encode(PROMPT)).argmax())


@gpu
def test_gpu_training_resumes_exactly_with_dropout(tmp_path, tok, ids):
    """The GPU's random state (dropout draws there) is saved with the checkpoint and restored."""
    cuda = torch.device("cuda", torch.cuda.current_device())
    whole = fit(tiny_model(tok).to(cuda), tok, ToySource(ids), None, config(tmp_path / "a"))

    def crash(index: int) -> None:
        if index == 2 * 10:  # the first micro-batch of step 10; the last checkpoint is step 8
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(tok).to(cuda), tok, ToySource(ids, hook=crash), None, config(tmp_path / "b"))
    torch.cuda.manual_seed(123)  # a different GPU stream: the checkpoint's must replace it
    resumed = fit(tiny_model(tok).to(cuda), tok, ToySource(ids), None, config(tmp_path / "b"), resume=True)
    assert resumed.step == 12 and resumed.train_loss == pytest.approx(whole.train_loss, abs=1e-6)


@gpu
def test_gpu_lora_finetune_learns_and_its_merged_model_loads_anywhere(tiny_model_dir, data_file, tmp_path):  # noqa: F811
    out = tmp_path / "lora"
    before = held_out_loss(str(tiny_model_dir), data_file)  # on the CPU (NEXTTOK_DEVICE=cpu)
    data = DataOptions(data_file, layout="pad", eval_fraction=0)
    result = finetune(
        str(tiny_model_dir), data, str(out), LoraOptions(r=4, alpha=8), True, steps=10, notify=lambda s: None,
        lr=1e-2, device="cuda",
    )  # fmt: skip
    assert result.fit.step == 10
    assert held_out_loss(str(out / "merged"), data_file) < before - 0.5  # trained on the GPU, read on the CPU
