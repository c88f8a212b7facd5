"""The loop: greedy equals HF generate, the cache is exact, seeds reproduce, stops and limits hold."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from nexttok.cpu.decoder import CompiledDecoder
from nexttok.decoders import make_decoder
from nexttok.errors import NexttokError
from nexttok.generate import generate
from nexttok.sampling import SamplingConfig
from nexttok.torchdecode import TorchDecoder

PROMPT = "To be, or not to be"


def ids_of(steps) -> list[int]:
    return [s.id for s in steps]


def greedy(n: int, **kw) -> SamplingConfig:
    return SamplingConfig(temperature=0, max_new_tokens=n, ignore_eos=True, **kw)


@pytest.mark.parametrize("numba", ["1", "0"])  # the compiled one-sample step (nexttok.cpu), and the torch path
def test_greedy_equals_hf_generate(tiny_lm, numba, monkeypatch):
    monkeypatch.setenv("NEXTTOK_NUMBA", numba)
    ids = tiny_lm.encode(PROMPT)
    ours = ids_of(generate(tiny_lm, ids, greedy(40)))
    hf = tiny_lm.model.generate(torch.tensor([ids]), max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert ours == hf[0, len(ids) :].tolist()


def test_greedy_with_repetition_penalty_equals_hf(tiny_lm):
    """Penalties look at the whole context (prompt and generated), as HF's do."""
    ids = tiny_lm.encode(PROMPT)
    ours = ids_of(generate(tiny_lm, ids, greedy(30, repetition_penalty=1.5)))
    hf = tiny_lm.model.generate(
        torch.tensor([ids]), max_new_tokens=30, min_new_tokens=30, do_sample=False, repetition_penalty=1.5
    )
    assert ours == hf[0, len(ids) :].tolist()
    assert ours != ids_of(generate(tiny_lm, ids, greedy(30)))  # the penalty changed something


def test_decode_copy_shares_weights_and_follows_updates(tiny_model_dir):
    import nexttok

    lm = nexttok.load(str(tiny_model_dir))
    fast = lm.weights.inference_model()
    assert fast is lm.weights.inference_model()  # built once
    assert fast.model.embed_tokens.weight is lm.model.model.embed_tokens.weight  # shared, not copied
    row = torch.randn(1, 1, lm.model.config.hidden_size)  # a one-row call: the transposed-weight kernel
    torch.testing.assert_close(fast.lm_head(row), lm.model.lm_head(row))
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(2.0)  # an in-place update, as an optimizer step makes
    assert lm.weights.inference_model() is not fast
    torch.testing.assert_close(lm.weights.inference_model().lm_head(row), lm.model.lm_head(row))


@pytest.mark.parametrize("threads", [1, 2])  # one-row calls pick their kernel by thread count
def test_decode_linear_kernels_agree_with_nn_linear(threads):
    from nexttok.torchdecode import ONEDNN, InferenceLinear

    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out_f, in_f in [(1536, 576), (576, 576), (576, 1536), (192, 576)]:  # widening, square, narrowing, small
            linear = torch.nn.Linear(in_f, out_f, bias=False)
            fast = InferenceLinear(linear)
            for rows in (1, 8, 40):  # one row, a short prefill, a long prefill
                x = torch.randn(1, rows, in_f)
                torch.testing.assert_close(fast(x), linear(x), atol=1e-4, rtol=1e-4)
            assert fast.packed is None  # one sample never pays for the N-sample copy
            for x in (torch.randn(8, 1, in_f), torch.randn(8, in_f), torch.randn(3, 1, in_f)):  # N-sample steps
                torch.testing.assert_close(fast(x), linear(x), atol=1e-4, rtol=1e-4)
            assert (fast.packed is not None) == ONEDNN  # N-sample steps ran on oneDNN's blocked copy
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kernel", [True, False])
def test_cached_logits_equal_recomputed_logits(tiny_lm, kernel):
    ids = tiny_lm.encode(PROMPT)
    decoder = CompiledDecoder(tiny_lm) if kernel else TorchDecoder(tiny_lm)
    row, logits = decoder.add(ids)
    seq = list(ids)
    for _ in range(12):
        torch.testing.assert_close(logits, tiny_lm.last_logits(seq).float(), atol=1e-4, rtol=1e-4)
        seq.append(int(logits.argmax()))
        logits = decoder.step([row], [seq[-1]])[0]


def test_steps_describe_the_model_distribution(tiny_lm):
    steps = list(generate(tiny_lm, PROMPT, greedy(5)))
    assert [s.index for s in steps] == list(range(5))
    first = steps[0]
    d = tiny_lm.distribution(PROMPT)
    assert first.position == len(tiny_lm.encode(PROMPT))
    assert first.rank == 1 and first.id == d.top(1)[0].id
    assert first.prob == pytest.approx(d.top(1)[0].prob, abs=1e-5)
    assert first.entropy == pytest.approx(d.entropy, abs=1e-4)
    assert [a.id for a in first.alternatives] == [r.id for r in d.top(3)]
    assert [s.finish_reason for s in steps] == [None] * 4 + ["length"]


def test_max_new_tokens_is_honoured_and_text_is_complete(tiny_lm):
    steps = list(generate(tiny_lm, PROMPT, SamplingConfig(max_new_tokens=7, seed=1, ignore_eos=True)))
    assert len(steps) == 7
    assert "".join(s.delta for s in steps) == tiny_lm.tokenizer.decode(ids_of(steps))


def test_same_seed_same_output_different_seed_differs(tiny_lm):
    def run(seed: int) -> list[int]:
        return ids_of(generate(tiny_lm, PROMPT, SamplingConfig(seed=seed, max_new_tokens=20, ignore_eos=True)))

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_same_seed_same_output_in_a_new_process(tiny_lm, tiny_model_dir):
    code = (
        "import nexttok; from nexttok.generate import generate; from nexttok.sampling import SamplingConfig;"
        f"lm = nexttok.load({str(tiny_model_dir)!r});"
        f"print([s.id for s in generate(lm, {PROMPT!r}, SamplingConfig(seed=5, max_new_tokens=20, ignore_eos=True))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = ids_of(generate(tiny_lm, PROMPT, SamplingConfig(seed=5, max_new_tokens=20, ignore_eos=True)))
    assert out.strip() == str(here)


def test_stop_string_across_token_boundary_is_not_emitted(tiny_lm):
    steps = list(generate(tiny_lm, PROMPT, greedy(30)))
    pieces = [tiny_lm.tokenizer.decode(ids_of(steps[: i + 1])) for i in range(30)]
    # A stop string made of the end of one token's text and the start of the next one's.
    i = next(i for i in range(5, 29) if len(pieces[i]) - len(pieces[i - 1]) >= 2 and pieces[i + 1] != pieces[i])
    cut = len(pieces[i]) - 1
    stop = pieces[i + 1][cut : cut + 2]
    assert len(stop) == 2 and pieces[i + 1].find(stop) == cut  # it spans tokens i and i + 1
    out = list(generate(tiny_lm, PROMPT, greedy(30, stop=(stop,))))
    assert out[-1].finish_reason == "stop" and len(out) == i + 2
    assert "".join(s.delta for s in out) == pieces[i + 1][:cut]


def test_eos_ends_the_sample(tiny_lm):
    eos = tiny_lm.model.generation_config.eos_token_id
    config = SamplingConfig(seed=0, max_new_tokens=10, logit_bias={eos: 100.0})
    steps = list(generate(tiny_lm, PROMPT, config))
    assert len(steps) == 1 and steps[0].id == eos and steps[0].finish_reason == "eos" and steps[0].delta == ""


@pytest.mark.parametrize("numba", ["1", "0"])  # the compiled N-sample step (nexttok.cpu), and the torch path
def test_n_samples_share_one_prefill(tiny_lm, monkeypatch, numba):
    monkeypatch.setenv("NEXTTOK_NUMBA", numba)
    calls: list[tuple] = []
    hook = tiny_lm.weights.inference_model().model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    call = CompiledDecoder._call
    monkeypatch.setattr(
        CompiledDecoder, "_call", lambda d, slots, tokens, *a: calls.append(("walk", len(slots), len(tokens)))
        or call(d, slots, tokens, *a),
    )  # fmt: skip
    try:
        config = SamplingConfig(seed=3, max_new_tokens=6, ignore_eos=True)
        steps = list(generate(tiny_lm, PROMPT, config, num_samples=4))
    finally:
        hook.remove()
    n_prompt = len(tiny_lm.encode(PROMPT))
    # one prefill, then one batched call per token
    if numba == "1":
        assert calls == [("walk", 1, n_prompt)] + [("walk", 4, 4)] * 5  # rows, positions
    else:
        assert calls == [(1, n_prompt)] + [(4, 1)] * 5
    assert sorted({s.sample for s in steps}) == [0, 1, 2, 3]
    assert [s.seed for s in steps if s.index == 0] == [3, 4, 5, 6]


def test_sample_i_of_a_batch_equals_a_single_run_with_its_seed(tiny_lm):
    config = SamplingConfig(seed=10, max_new_tokens=12, ignore_eos=True)
    batch = list(generate(tiny_lm, PROMPT, config, num_samples=3))
    third = [s.id for s in batch if s.sample == 2]
    single = SamplingConfig(seed=12, max_new_tokens=12, ignore_eos=True)
    assert third == ids_of(generate(tiny_lm, PROMPT, single))


def test_trace_records_stages(tiny_lm):
    config = SamplingConfig(seed=0, max_new_tokens=2, temperature=0.7, top_k=10, top_p=0.9, ignore_eos=True)
    step = next(generate(tiny_lm, PROMPT, config, trace=True))
    names = [r.name for r in step.stages]
    assert names == ["model", "temperature", "top_k", "top_p"]
    assert step.stages[0].survivors == tiny_lm.vocab_size and step.stages[2].survivors == 10
    assert step.stages[3].survivors <= 10


def test_context_overflow_is_an_error(tiny_lm):
    ids = tiny_lm.encode(PROMPT)
    with pytest.raises(NexttokError, match="context of 256"):
        list(generate(tiny_lm, ids, SamplingConfig(max_new_tokens=257 - len(ids))))


def test_bad_logit_bias_and_num_samples(tiny_lm):
    with pytest.raises(NexttokError, match="tokens"):
        list(generate(tiny_lm, PROMPT, SamplingConfig(logit_bias={"To be, or not": 1.0})))
    with pytest.raises(NexttokError, match="num_samples"):
        generate(tiny_lm, PROMPT, num_samples=0)  # raised at the call, not at the first step


@pytest.mark.integration
def test_default_model_greedy_equals_hf_generate(default_lm):
    ids = default_lm.encode("The capital of France is")
    steps = list(generate(default_lm, ids, greedy(16)))
    hf = default_lm.model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert ids_of(steps) == hf[0, len(ids) :].tolist()
    assert steps[0].text == " Paris"


@pytest.mark.integration
def test_default_model_greedy_equals_hf_generate_on_the_packed_weights(default_lm):
    """As a chat, a server or the bench decodes once the engine has packed the weights (nexttok.cpu.packed)."""
    assert default_lm.weights.pack() is not None
    try:
        assert CompiledDecoder(default_lm).arrays.weights.tiles.qkv.all()  # the step reads the packed copy
        ids = default_lm.encode("Once upon a time, in a small village,")
        steps = list(generate(default_lm, ids, greedy(48)))
        hf = default_lm.model.generate(torch.tensor([ids]), max_new_tokens=48, min_new_tokens=48, do_sample=False)
        assert ids_of(steps) == hf[0, len(ids) :].tolist()
    finally:
        default_lm.weights._packed = None  # the other tests' model as it was


def test_stage_records_for_the_next_token(tiny_lm):
    from nexttok.generate import stage_records

    records = stage_records(tiny_lm, PROMPT, SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05))
    assert [r.name for r in records] == ["model", "temperature", "top_k", "top_p", "min_p"]
    d = tiny_lm.distribution(PROMPT)
    assert records[0].top[0][0] == d.top(1)[0].id and records[0].top[0][1] == pytest.approx(d.top(1)[0].prob)
    assert records[1].top[0][1] == pytest.approx(d.with_temperature(0.7).top(1)[0].prob, abs=1e-5)
    assert records[2].survivors == 50
    survivors = [r.survivors for r in records]
    assert survivors == sorted(survivors, reverse=True)  # a filter never brings a token back


def test_greedy_on_a_gpt2_model_equals_hf_generate(tmp_path):
    """An architecture the compiled kernel does not cover (its decoder is .transformer, not .model)."""
    from conftest import make_tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    import nexttok

    tok = make_tiny_tokenizer(tmp_path)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    lm = nexttok.load(str(tmp_path))
    ids = lm.encode(PROMPT)
    hf = lm.model.generate(torch.tensor([ids]), max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert ids_of(generate(lm, ids, greedy(30))) == hf[0, len(ids) :].tolist()


def test_the_kv_cache_goes_in_under_the_name_the_model_takes():
    """transformers 5.x renamed past_key_values to cache; a wrong name would be swallowed by **kwargs."""
    from transformers import LlamaForCausalLM

    from nexttok.torchdecode import cache_argument

    class Older(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs): ...

    assert cache_argument(Older()) == "past_key_values"
    assert cache_argument(LlamaForCausalLM) in inspect.signature(LlamaForCausalLM.forward).parameters


def metaspace_tokenizer(text: str):
    """A SentencePiece-style BPE (Llama 2, Mistral): '▁' marks spaces, byte fallback, and the decoder drops
    the first word's leading space, so a token's text depends on what comes before it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", *bytes_]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def streamed(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> str:
    from types import SimpleNamespace

    from nexttok.samples import TextStream

    text, out = TextStream(SimpleNamespace(tokenizer=tokenizer), stop), []
    for i in ids:
        delta, hit = text.push(i)
        out.append(delta)
        if hit:  # the loop ends the sample here
            return "".join(out)
    return "".join(out) + text.flush()


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_streamed_text_equals_decoding_the_whole_sample(tok, kind):
    """Each token decodes only a window; what is printed must still be exactly the whole decode, for
    multi-byte characters split over tokens and for random ids (invalid UTF-8 included)."""
    import random

    from conftest import tiny_corpus

    text = "Le café d’été — naïve 🙂 coöperation, 東京 and ROMEO: 🙂🙂 " * 3
    tokenizer = tok if kind == "byte-level" else metaspace_tokenizer(tiny_corpus(8000))
    rng = random.Random(0)
    # Random ids, except byte-fallback tokens: their decoder turns every byte of a run that is not valid
    # UTF-8 into U+FFFD, so a later byte can change how an earlier, valid one decodes (no stream can
    # print that ahead of time). Valid characters spelled in byte tokens are in the text sample.
    vocab = [i for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))) if t[:3] != "<0x"]
    samples = [tokenizer.encode(text, add_special_tokens=False)]
    samples += [[rng.choice(vocab) for _ in range(300)] for _ in range(5)]
    for ids in samples:
        assert streamed(tokenizer, ids) == tokenizer.decode(ids)
    ids = samples[0]
    assert streamed(tokenizer, ids, ("ROMEO",)) == tokenizer.decode(ids).split("ROMEO")[0]


def test_streaming_decodes_a_window_per_token_not_the_whole_sample(tok):
    """A long sample costs the same per token at its end as at its start (was quadratic)."""
    from conftest import tiny_corpus

    ids = tok.encode(tiny_corpus(8000), add_special_tokens=False)[:1500]
    decoded = []

    class Counting:
        def decode(self, part):
            decoded.append(len(part))
            return tok.decode(part)

    assert streamed(Counting(), ids) == tok.decode(ids)
    assert sum(decoded) < 10 * len(ids)  # decoding the whole sample each token would be ~len(ids)**2


def test_the_decoder_choice_says_which_decoder_runs_and_why(tiny_lm, monkeypatch):
    from types import SimpleNamespace

    from nexttok.decoders import decoder_choice

    assert decoder_choice(tiny_lm) == (True, "compiled CPU decoder: a LlamaForCausalLM in float32 on the CPU")
    monkeypatch.setenv("NEXTTOK_NUMBA", "0")
    compiled, why = decoder_choice(tiny_lm)
    assert not compiled and why == "torch decoder: NEXTTOK_NUMBA=0 turns the compiled decoder off"
    assert make_decoder(tiny_lm).reason == why
    monkeypatch.delenv("NEXTTOK_NUMBA")
    gpt2 = SimpleNamespace(model=tiny_gpt2())
    compiled, why = decoder_choice(gpt2)
    assert not compiled and why.endswith("does not cover this model (architecture GPT2LMHeadModel)")


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval()


def test_generate_verbose_names_the_decoder(tiny_model_dir):
    from typer.testing import CliRunner

    from nexttok.cli import app

    args = ["generate", "To be", "--model", str(tiny_model_dir), "-n", "3", "--temperature", "0", "--verbose"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "decoder: compiled CPU decoder: a LlamaForCausalLM in float32 on the CPU" in r.stderr


def test_the_loop_reads_as_the_idea_with_no_branch_on_the_decoder():
    """generate's loop talks to the decoder through start/next and Scores only; what the compiled path
    needs (run-ahead, summaries) is behind that interface."""
    import importlib

    module = importlib.import_module("nexttok.generate")  # the package's `generate` is the function
    source = inspect.getsource(module._loop)
    assert "kernel" not in source and "pending" not in source and "summary" not in source
    assert len(source.splitlines()) <= 30


def test_a_sample_that_finishes_leaves_the_batch_and_the_others_go_on_as_alone(tiny_lm):
    """Samples end at different steps (a stop string); the others' tokens are those of their single runs."""
    config = SamplingConfig(seed=21, max_new_tokens=10, ignore_eos=True, temperature=1.3)
    free = list(generate(tiny_lm, PROMPT, config, num_samples=4))
    first = {s.sample: s.text for s in free if s.index == 2}  # a text sample 0 has at step 2
    stop = SamplingConfig(seed=21, max_new_tokens=10, ignore_eos=True, temperature=1.3, stop=(first[0],))
    stopped = list(generate(tiny_lm, PROMPT, stop, num_samples=4))
    ends = {s.sample: s.index for s in stopped if s.finish_reason}
    assert ends[0] <= 2 and len(set(ends.values())) > 1  # sample 0 left early, not all at once
    for i in range(1, 4):
        single = SamplingConfig(seed=21 + i, max_new_tokens=10, ignore_eos=True, temperature=1.3, stop=(first[0],))
        assert [s.id for s in stopped if s.sample == i] == ids_of(generate(tiny_lm, PROMPT, single))
