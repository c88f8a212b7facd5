"""The logit lens: its last row is the model's own distribution (Llama and GPT-2, so no double norm),
an inner row is norm(h_i) @ W_out^T by hand, and `nexttok predict --layers` shows it."""

import json
from importlib.resources import files

import jsonschema
import pytest
import torch
from conftest import make_tiny_tokenizer
from rich.console import Console
from typer.testing import CliRunner

import nexttok.lm
from nexttok.cli.app import app
from nexttok.errors import NexttokError
from nexttok.lens import backbone_and_norm, lens_report, logit_lens, print_lens

TEXT = "the king"
runner = CliRunner()


def sharpen(norm: torch.nn.Module, head: torch.nn.Module, scale: float = 1.0) -> None:
    """A fresh final norm (weight 1, bias 0) is nearly idempotent: norming twice would go unseen. Random
    norm weights and sharper logits make a double norm show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 3 + 0.2)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))
        head.weight.mul_(scale)


@pytest.fixture(scope="module")
def llama_lm(tiny_model_dir):
    lm = nexttok.lm.load(str(tiny_model_dir))
    sharpen(lm.model.model.norm, lm.model.lm_head)
    return lm


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tok = make_tiny_tokenizer(folder)
    torch.manual_seed(0)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tok), **ids)
    model = GPT2LMHeadModel(config)
    sharpen(model.transformer.ln_f, model.lm_head, 8.0)  # lm_head is tied to the embeddings
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_lm(gpt2_dir):
    return nexttok.lm.load(str(gpt2_dir))


def double_normed(lm, norm: torch.nn.Module) -> torch.Tensor:
    """What the lens's last row would be with the final norm applied twice, shape (V,)."""
    model = lm.model
    with torch.no_grad():
        out = model(input_ids=torch.tensor([lm.encode(TEXT)]), output_hidden_states=True)
        return torch.softmax(model.get_output_embeddings()(norm(out.hidden_states[-1][0, -1])), -1)  # (V,)


def test_last_layer_is_the_models_distribution(llama_lm):
    lens, dist = logit_lens(llama_lm, TEXT), llama_lm.distribution(TEXT)
    assert len(lens.layers) == llama_lm.model.config.num_hidden_layers + 1
    torch.testing.assert_close(lens.logprobs[-1].exp(), dist.probs, atol=1e-5, rtol=0)
    assert (double_normed(llama_lm, llama_lm.model.model.norm) - dist.probs).abs().max() > 1e-3  # the test has teeth
    assert lens.columns == [r.id for r in dist.top(10)]
    last = lens.layers[-1]
    assert (last.final_rank, last.top_id, last.label, lens.layers[0].label) == (1, lens.columns[0], "2", "embed")


def test_last_layer_matches_on_gpt2_too(gpt2_lm):
    """GPT-2's final norm is a LayerNorm kept in transformer.ln_f: a double norm would show here too."""
    lens, dist = logit_lens(gpt2_lm, TEXT), gpt2_lm.distribution(TEXT)
    assert len(lens.layers) == 3
    torch.testing.assert_close(lens.logprobs[-1].exp(), dist.probs, atol=1e-5, rtol=0)
    assert (double_normed(gpt2_lm, gpt2_lm.model.transformer.ln_f) - dist.probs).abs().max() > 1e-3


def capped_or_scaled(name: str, folder):
    """A tiny Gemma 2 (its logits capped at 0.5: cap * tanh(z / cap)) or Cohere (logits scaled by 1/16)."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    tok = make_tiny_tokenizer(folder)
    torch.manual_seed(0)
    shape = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, max_position_embeddings=128, vocab_size=len(tok),
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)  # fmt: skip
    if name == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(final_logit_softcapping=0.5, **shape))
    else:
        model = CohereForCausalLM(CohereConfig(logit_scale=0.0625, **shape))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # logits well past the cap
    model.save_pretrained(folder)
    return nexttok.lm.load(str(folder))


@pytest.mark.parametrize("name", ["gemma2", "cohere"])
def test_last_layer_matches_models_that_change_their_logits(name, tmp_path):
    """Gemma 2 caps its logits after the output layer and Cohere scales them: the lens must too."""
    lm = capped_or_scaled(name, tmp_path)
    lens, dist = logit_lens(lm, TEXT), lm.distribution(TEXT)
    torch.testing.assert_close(lens.logprobs[-1].exp(), dist.probs, atol=1e-5, rtol=0)
    model = lm.model
    with torch.no_grad():
        out = model(input_ids=torch.tensor([lm.encode(TEXT)]), output_hidden_states=True)
        raw = torch.softmax(model.get_output_embeddings()(out.hidden_states[-1][0, -1]), -1)  # (V,), uncapped
    assert (raw - dist.probs).abs().max() > 1e-3  # the test has teeth: the head alone is not the model


def test_inner_layer_is_the_final_norm_then_the_output_layer(llama_lm):
    model = llama_lm.model
    ids = torch.tensor([llama_lm.encode(TEXT)])  # (1, T)
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1]  # (H,)
        logits = model.model.norm(h) @ model.lm_head.weight.T  # (V,)
    lens = logit_lens(llama_lm, TEXT, top=5)
    torch.testing.assert_close(lens.logprobs[1], torch.log_softmax(logits.double(), -1).float(), atol=1e-5, rtol=0)
    row = lens.layers[1]
    assert row.probs == pytest.approx([float(lens.logprobs[1, c].exp()) for c in lens.columns])
    assert row.top_id == int(logits.argmax()) and len(row.probs) == 5


def test_report_and_table(tiny_lm):
    lens = logit_lens(tiny_lm, TEXT, top=3)
    report = lens_report(lens)
    assert report["num_layers"] == 2 and len(report["rows"]) == 3 and len(report["tokens"]) == 3
    assert json.loads(json.dumps(report)) == report
    console = Console(record=True, width=120)
    print_lens(lens, console)
    out = console.export_text()
    assert "embed" in out and f"{lens.layers[-1].top_prob:.4f}" in out


def test_unknown_architecture_names_its_class():
    class Odd(torch.nn.Module):
        pass

    with pytest.raises(NexttokError, match="does not know where Odd keeps its final norm"):
        backbone_and_norm(Odd())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft on transformers 5
def test_peft_wrapped_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    lm = nexttok.lm.load(str(tiny_model_dir))
    wrapped = nexttok.lm.LM(get_peft_model(lm.model, LoraConfig(r=2, target_modules=["q_proj"])), lm.tokenizer)
    torch.testing.assert_close(logit_lens(wrapped, TEXT).logprobs[-1], logit_lens(lm, TEXT).logprobs[-1])


def test_cli_layers_json_and_heatmap(tiny_model_dir, tmp_path):
    schema = json.loads(files("nexttok").joinpath("schemas/predict.schema.json").read_text())
    png = tmp_path / "x.png"
    r = runner.invoke(app, ["predict", TEXT, "--layers", "--json", "-m", str(tiny_model_dir), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    jsonschema.validate(out, schema)
    rows = out["layers"]["rows"]
    assert [row["layer"] for row in rows] == [0, 1, 2]
    assert out["layers"]["tokens"][0]["id"] == out["distributions"][0]["top"][0]["id"]
    assert rows[-1]["top"]["prob"] == pytest.approx(out["distributions"][0]["top"][0]["prob"], abs=1e-5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_layers_table(tiny_model_dir):
    r = runner.invoke(app, ["predict", TEXT, "--layers", "-m", str(tiny_model_dir)])
    assert r.exit_code == 0, r.output
    assert "logit lens" in r.output and "embed" in r.output and "entropy" in r.output
