"""The compiled CPU decoder (nexttok.cpu): the same logits as the HF model's forward, for each architecture it
covers, for one row, N rows and a prompt's blocks; and its primitives against float64."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from nexttok.cpu import model as cpu_model
from nexttok.cpu import primitives, schedule, walk
from nexttok.cpu.buffers import BLOCK
from nexttok.cpu.decoder import CompiledDecoder
from nexttok.torchdecode import TorchDecoder
from nexttok.weights import WeightCache

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0}
ROPE_LLAMA3 |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny(kind: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "qwen2":  # biases on q, k, v
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL, num_key_value_heads=2)).eval()
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=None)).eval()
    if kind == "llama-bias-llama3-rope":  # biases on q, k, v and o; RoPE scaled as Llama 3's
        config = tf.LlamaConfig(**SMALL, num_key_value_heads=4, attention_bias=True, rope_parameters=ROPE_LLAMA3)
        model = tf.LlamaForCausalLM(config).eval()
        assert model.model.rotary_emb.rope_type == "llama3"
        return model
    return tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True)).eval()


def lm_of(model, weights=None):
    """What a decoder needs of an LM: the model and its weight cache."""
    return SimpleNamespace(model=model, weights=weights or WeightCache(model))


def run_kernel(model, ids: list[int], steps: int, weights=None) -> list[tuple]:
    """(logits, the sequence they follow) for the compiled decoder's prefill of ``ids`` and ``steps`` greedy
    steps; ``weights``: the weight cache whose packed copy it reads, if any."""
    decoder = CompiledDecoder(lm_of(model, weights))
    row, logits = decoder.add(ids)
    seq, out = list(ids), [(logits, list(ids))]
    for _ in range(steps):
        seq.append(int(logits.argmax()))
        logits = decoder.step([row], [seq[-1]])[0]
        out.append((logits, list(seq)))
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "llama-bias-llama3-rope"])
def test_kernel_logits_equal_the_model_forward(kind):
    model = tiny(kind)
    assert cpu_model.unsupported(model) is None
    ids = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    for logits, seq in run_kernel(model, ids, 12):  # the slots grow on the way
        with torch.inference_mode():
            reference = model(torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("length", [1, 6, 2 * BLOCK + 7])
def test_kernel_prefill_equals_the_model_forward_and_its_cache(kind, length):
    """The prefill's logits and the keys and values it stores equal the HF forward pass's, for a prompt of
    one position, of a few (not a multiple of the 4-position tile), and of several blocks (the last one
    partial, the cache growing on the way); the step after it continues from them."""
    model = tiny(kind)
    ids = torch.randint(0, 97, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    kernel = CompiledDecoder(lm_of(model))
    kernel.prefill_max = 1000  # every length through the walk's blocks
    row, logits = kernel.add(ids)
    slot = kernel.rows[row]
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        reference = model(torch.tensor([ids]), cache=cache, use_cache=True).logits[0, -1]
        after = model(torch.tensor([ids + [5]])).logits[0, -1]
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    assert kernel.slots.length[slot] == length and kernel.summary(3).argmax == int(reference.argmax())
    k, v = kernel.slots.k[slot], kernel.slots.v[slot]
    for i, layer in enumerate(cache.layers):  # (1, nkv, T, hd)
        torch.testing.assert_close(torch.from_numpy(k[i, :, :length]), layer.keys[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(v[i, :, :length]), layer.values[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel.step([row], [5])[0], after, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_is_the_same_at_any_thread_count(threads):
    model, ids = tiny("llama"), [5, 7, 11, 13]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = [int(logits.argmax()) for logits, _ in run_kernel(model, ids, 8)]
    finally:
        torch.set_num_threads(before)
    hf = model.generate(torch.tensor([ids]), max_new_tokens=9, min_new_tokens=9, do_sample=False)
    assert ours == hf[0, len(ids) :].tolist()  # the prefill's token, then 8 steps


def test_models_it_does_not_cover_are_named_and_use_the_torch_path(tiny_lm):
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert cpu_model.unsupported(gpt2) == "architecture GPT2LMHeadModel"
    assert "bfloat16" in cpu_model.unsupported(tiny("llama").to(torch.bfloat16))
    windowed = tf.MistralForCausalLM(tf.MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=16))
    assert cpu_model.unsupported(windowed) == "sliding-window attention"
    adapted = tiny("llama")
    adapted.model.layers[0].mlp.up_proj = torch.nn.Sequential(adapted.model.layers[0].mlp.up_proj)
    assert "nn.Linear" in cpu_model.unsupported(adapted)


@pytest.mark.parametrize("longest", [100, 4])
def test_decoder_prefills_short_prompts_in_the_kernel_and_long_ones_through_hf(tiny_lm, monkeypatch, longest):
    """A prompt up to PREFILL_MAX tokens is read by the kernel (the HF cache stays empty); a longer one by
    the HF model, whose keys and values the kernel takes over. Either way the steps after equal the
    model's forward pass over the whole sequence."""
    monkeypatch.setattr(CompiledDecoder, "PREFILL_MAX", longest)
    ids = tiny_lm.encode("To be, or not to be")
    assert 4 < len(ids) < 100
    decoder = CompiledDecoder(tiny_lm)
    row, logits = decoder.add(ids)
    assert decoder.torch.forward_calls == (0 if longest == 100 else 1)  # the HF model read it, or not
    assert decoder.slots.length[decoder.rows[row]] == len(ids) and decoder.forward_calls == 1
    sequence = list(ids)
    for token in (3, 8):
        with torch.inference_mode():
            reference = tiny_lm.model(torch.tensor([sequence])).logits[0, -1]
        torch.testing.assert_close(logits.view(-1), reference, atol=1e-4, rtol=1e-4)
        sequence.append(token)
        logits = decoder.step([row], [token])


@pytest.mark.parametrize("longest", [100, 4])  # the prompt read by the walk, or by the HF model (its cache taken over)
def test_one_row_and_forked_rows_equal_the_torch_decoder(tiny_lm, monkeypatch, longest):
    monkeypatch.setattr(CompiledDecoder, "PREFILL_MAX", longest)
    ids = tiny_lm.encode("To be, or not to be")
    ours, theirs = CompiledDecoder(tiny_lm), TorchDecoder(tiny_lm)
    (a, _), (b, _) = ours.add(ids), theirs.add(ids)
    torch.testing.assert_close(ours.step([a], [3]), theirs.step([b], [3]), atol=1e-4, rtol=1e-4)
    rows_a, rows_b = [a, *ours.fork(a, 2)], [b, *theirs.fork(b, 2)]
    tokens = [3, 8, 1]
    for _ in range(2):
        torch.testing.assert_close(ours.step(rows_a, tokens), theirs.step(rows_b, tokens), atol=1e-4, rtol=1e-4)
        tokens = [t + 1 for t in tokens]


def test_the_kernel_keeps_torch_thread_count(tiny_model_dir):
    """numba's OpenMP pool shares libgomp with torch; starting it must not undo --threads 1."""
    import subprocess
    import sys

    code = (
        "import sys, torch, nexttok\n"
        "from nexttok.generate import generate; from nexttok.sampling import SamplingConfig\n"
        "lm = nexttok.load(sys.argv[1], threads=1)\n"
        "steps = list(generate(lm, 'To be', SamplingConfig(temperature=0, max_new_tokens=3, ignore_eos=True)))\n"
        "from nexttok.cpu.decoder import CompiledDecoder; CompiledDecoder(lm).add([5, 6])\n"
        "print(torch.get_num_threads(), len(steps))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "3"]


def test_summary_equals_torch_over_several_chunks_and_ties():
    """The statistics the kernel computes per chunk of the output layer, combined, equal torch's over
    the whole vocabulary: 1000 ids make 8 chunks (the last one partial). The last step has every
    logit equal (the final norm's weight zeroed: the kernel reads the weights in place)."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**(SMALL | {"vocab_size": 1000}), num_key_value_heads=2)).eval()
    kernel = CompiledDecoder(lm_of(model))
    row, _ = kernel.add([5, 9, 2])
    for token in (4, 17, 900):
        if token == 900:
            with torch.no_grad():
                model.model.norm.weight.zero_()
        logits = kernel.step([row], [token])[0].double()
        s = kernel.summary(5)
        logp = torch.log_softmax(logits, -1)
        assert s.argmax == int(logits.argmax())  # the first of equal maxima, as torch's
        # each chunk's exp is float32 (relative error ~1e-7 per term), its sums float64
        assert s.logsumexp == pytest.approx(float(torch.logsumexp(logits, -1)), abs=1e-6)
        assert s.entropy == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-6)
        order = sorted(range(1000), key=lambda i: (-float(logits[i]), i))[:5]  # ties by id
        assert s.top_ids.tolist() == order
        assert s.top_logits.tolist() == logits[order].tolist()
    assert s.top_ids.tolist() == [0, 1, 2, 3, 4] and s.entropy == pytest.approx(math.log(1000))


def test_steps_from_the_kernel_equal_the_torch_path(tiny_lm, monkeypatch):
    """Probability, rank, entropy, alternatives and the sampled token's probability come from the
    kernel's summary on its path; they equal the torch path's, greedy and sampled (with stages)."""
    from nexttok.generate import generate
    from nexttok.sampling import SamplingConfig

    ids = tiny_lm.encode("To be, or not to be")
    for config in (
        SamplingConfig(temperature=0, max_new_tokens=12, ignore_eos=True),
        SamplingConfig(temperature=1.5, top_k=40, max_new_tokens=12, ignore_eos=True, seed=3),
    ):
        runs = {}
        for numba in ("1", "0"):
            monkeypatch.setenv("NEXTTOK_NUMBA", numba)
            runs[numba] = list(generate(tiny_lm, ids, config, alternatives=4))
        assert [s.id for s in runs["1"]] == [s.id for s in runs["0"]]
        assert any(s.rank > 1 for s in runs["1"]) or config.greedy  # the sampled run also took lower ranks
        for a, b in zip(runs["1"], runs["0"], strict=True):
            assert (a.rank, [x.id for x in a.alternatives]) == (b.rank, [x.id for x in b.alternatives])
            for field in ("prob", "logprob", "entropy", "sampled_prob"):
                assert getattr(a, field) == pytest.approx(getattr(b, field), abs=1e-4)


def test_greedy_runs_ahead_in_one_kernel_call_and_stops_at_eos(tiny_lm, monkeypatch):
    """Greedy without stages runs up to AHEAD kernel steps per call (never past max_new_tokens), and a
    call ends at an end-of-turn token: no step is run after it."""
    from nexttok.cpu.decoder import AHEAD as _AHEAD
    from nexttok.generate import eos_ids, generate
    from nexttok.sampling import SamplingConfig

    calls: list[tuple[int, int]] = []  # (steps asked, steps run)
    greedy = CompiledDecoder.greedy

    def recording(self, token, n, top, stop=()):
        out = greedy(self, token, n, top, stop)
        calls.append((n, len(out)))
        return out

    monkeypatch.setattr(CompiledDecoder, "greedy", recording)
    ids = tiny_lm.encode("To be, or not to be")
    new = _AHEAD + 4
    steps = list(generate(tiny_lm, ids, SamplingConfig(temperature=0, max_new_tokens=new, ignore_eos=True)))
    assert len(steps) == new and calls == [(_AHEAD, _AHEAD), (3, 3)]  # the prefill gave the first token

    tokens, already = [s.id for s in steps], eos_ids(tiny_lm)  # the tokenizer's own EOS stays one
    end = next(i for i in range(2, new) if tokens[i] not in tokens[:i])  # a token's first appearance
    assert not already & set(tokens[: end + 1])
    monkeypatch.setattr(tiny_lm.model.generation_config, "eos_token_id", tokens[end])
    calls.clear()
    steps = list(generate(tiny_lm, ids, SamplingConfig(temperature=0, max_new_tokens=new)))
    assert [s.id for s in steps] == tokens[: end + 1] and steps[-1].finish_reason == "eos"
    assert sum(run for _, run in calls) == end  # steps after the prefill's token, up to the eos and no further


def test_silu_with_its_own_exp_equals_torch_over_the_whole_float_range():
    import numpy as np
    from numba import njit

    g = np.concatenate([np.linspace(-120, 120, 20001), [0.0, -0.0, 1e-30, -1e-30, 87.5, -87.5, 89, -89]])
    g = g.astype(np.float32)
    u = np.random.default_rng(0).standard_normal(g.shape[0]).astype(np.float32)

    @njit
    def run(g, u, out):  # in chunks, as the kernel calls it
        e, bits = np.empty(32, np.float32), np.empty(32, np.int32)
        for s in range(0, g.shape[0], 32):
            n = min(32, g.shape[0] - s)
            primitives.silu_mul(n, g[s : s + n], u[s : s + n], e, bits, out, s)

    out = np.empty_like(g)
    run(g, u, out)
    exact = torch.nn.functional.silu(torch.from_numpy(g).double()) * torch.from_numpy(u).double()
    torch_fp32 = torch.nn.functional.silu(torch.from_numpy(g)) * torch.from_numpy(u)
    error = (torch.from_numpy(out).double() - exact).abs()
    # as close to the exact value as torch's own float32 SiLU, within a unit in the last place; below
    # g = -87 the exponent is clamped (values under 1e-35 instead of ~0)
    assert (error <= 2 * (torch_fp32.double() - exact).abs() + 1.2e-7 * exact.abs() + 1e-35).all()
    assert error.max() > 0  # not torch's own result by accident


def test_softmax_exp_equals_torch_within_an_ulp_and_is_clamped_below():
    import numpy as np

    # multiples of 2^-10, so that shifting by ``top`` and back is exact in float32
    v = np.concatenate([np.arange(-102400, 1) / 1024, [0.0, -86.9, -87.0, -87.1, -300.0]]).astype(np.float32)
    top = np.float32(2.0)
    out = v + top  # exp(out - top): the shift is part of what is tested
    primitives.exp_shifted(out.shape[0], out, top, np.empty_like(v), np.empty(v.shape[0], np.int32))
    exact = torch.from_numpy(v).double().exp()
    error = (torch.from_numpy(out).double() - exact).abs()
    torch_fp32 = torch.from_numpy(v).exp().double()
    # as close as torch's float32 exp, within two units in the last place; below -87 clamped (under 2e-38)
    assert (error <= 2 * (torch_fp32 - exact).abs() + 2.4e-7 * exact + 2e-38).all()
    assert out[-1] < 2e-38 and out[-5] == 1.0


@pytest.mark.parametrize("dot", ["dot_paced", "dot_plain"])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 130, 576, 1536])
def test_dot_covers_every_column(length, dot):
    import numpy as np

    # rows of several lengths: whole 64-float blocks, a remainder, or only a remainder (_dot_paced's two
    # loops); both loops are tested whichever this CPU runs (_dot)
    w = np.random.default_rng(length).standard_normal((3, length)).astype(np.float32)
    x = np.random.default_rng(length + 1).standard_normal(length).astype(np.float32)
    exact = w.astype(np.float64) @ x.astype(np.float64)
    got = np.array([getattr(primitives, dot)(w, i, x) for i in range(3)])
    scale = np.abs(w).astype(np.float64) @ np.abs(x).astype(np.float64)
    assert np.all(np.abs(got - exact) <= 1e-6 * scale)


@pytest.mark.parametrize("tile, rows", [("tile4", 4), ("tile2", 2)])
def test_a_prefill_tile_computes_its_rows_times_4_positions(tile, rows):
    import numpy as np

    # whichever tile this CPU's prefill uses (_tile), both are checked against float64
    rng = np.random.default_rng(rows)
    w, x = rng.standard_normal((8, 130)).astype(np.float32), rng.standard_normal((8, 130)).astype(np.float32)
    y = np.full((8, 16), np.nan, np.float32)
    getattr(primitives, tile)(w, 2, x, 4, y, 3)  # rows 2.., positions 4..7, into columns 3 + 2..
    exact = x[4:8].astype(np.float64) @ w[2 : 2 + rows].astype(np.float64).T  # (4, rows)
    scale = np.abs(x[4:8]).astype(np.float64) @ np.abs(w[2 : 2 + rows]).astype(np.float64).T
    assert np.all(np.abs(y[4:8, 5 : 5 + rows] - exact) <= 1e-6 * scale)
    y[4:8, 5 : 5 + rows] = np.nan
    assert np.isnan(y).all()  # nothing else written


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("p", [4, 8, 12])
def test_the_gemm_computes_every_row_and_position_in_both_modes(p, stream):
    import numpy as np

    # 7 weight rows (not a multiple of _tile's rows), p rows of x: 4 (_row4 alone), 8 (_row8), 12 (both)
    rng = np.random.default_rng(p)
    w, x = rng.standard_normal((9, 130)).astype(np.float32), rng.standard_normal((16, 130)).astype(np.float32)
    y = np.full((16, 12), np.nan, np.float32)
    primitives.gemm(p, 1, 8, w, x, y, 2, stream)  # weight rows 1..7, into columns 3..9
    exact = x[:p].astype(np.float64) @ w[1:8].astype(np.float64).T
    scale = np.abs(x[:p]).astype(np.float64) @ np.abs(w[1:8]).astype(np.float64).T
    assert np.all(np.abs(y[:p, 3:10] - exact) <= 1e-6 * scale)
    y[:p, 3:10] = np.nan
    assert np.isnan(y).all()  # nothing else written


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "llama-bias-llama3-rope"])
@pytest.mark.parametrize("n", [1, 3, 8, 9])
def test_forked_rows_equal_the_model_forward_of_each_sample(kind, n):
    """N rows forked from one prompt, each fed its own tokens: each step's logits equal the HF forward pass
    over that row's whole sequence (n of 1 to 9: the rows padded to whole tiles; the slots grow)."""
    model = tiny(kind)
    ids = [5, 7, 11, 13, 17, 2]
    decoder = CompiledDecoder(lm_of(model))
    first, _ = decoder.add(ids, reserve=1)
    rows = [first, *decoder.fork(first, n - 1)]
    sequences = torch.tensor([ids] * n)
    tokens = torch.randint(0, 97, (6, n), generator=torch.Generator().manual_seed(n))
    for step in tokens:  # (n,): a different token per row
        logits = decoder.step(rows, step.tolist())
        sequences = torch.cat([sequences, step[:, None]], dim=1)
        with torch.inference_mode():
            reference = model(sequences).logits[:, -1]
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    assert decoder.slots.k.shape[3] >= len(ids) + 6  # grew


def test_the_attention_asks_for_one_line_per_position_and_loop_up_to_its_end():
    import numpy as np

    hd, pos = 4, 3  # one key/value head, two query heads of 4 dims; 3 cached positions
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((1, 4 * hd)).astype(np.float32)  # one new position
    kc, vc = rng.standard_normal((2, 1, 8, hd)).astype(np.float32)
    cos, sin = np.ones((8, hd), np.float32), np.zeros((8, hd), np.float32)
    out = np.empty((1, 2 * hd), np.float32)
    kb, scores = np.empty((1, hd), np.float32), np.empty(pos + 1, np.float32)
    args = (0, 1, qkv, kc, vc, cos, sin, pos, np.float32(0.5), out, kb, scores)
    assert walk.attention(*args, 4096, 10**9) == 4096 + 64 * 2 * pos  # hints never fault
    first = out[0, :hd].copy()
    assert walk.attention(*args, 4096, 4096 + 128) == 4096 + 128  # stops at its end
    assert walk.attention(*args, 4096, 4096) == 4096
    np.testing.assert_array_equal(out[0, :hd], first)  # the hints change nothing computed
    # against the softmax computed in float64 (both heads share the one key/value head; no rotation here)
    q, k, v = (qkv[0, i * hd : (i + 1) * hd].astype(np.float64) for i in (0, 2, 3))
    keys, values = np.vstack([kc[0, :pos], k]), np.vstack([vc[0, :pos], v])
    p = np.exp(keys @ q * 0.5 - (keys @ q * 0.5).max())
    np.testing.assert_allclose(first, p @ values / p.sum(), rtol=1e-5, atol=1e-6)


def test_the_paced_dot_is_chosen_for_avx512_only(monkeypatch):
    wide = primitives.wide_vectors()
    assert (primitives.dot, primitives.tile) == (
        (primitives.dot_paced, primitives.tile4) if wide else (primitives.dot_plain, primitives.tile2)
    )
    # NUMBA_CPU_FEATURES, when set, is what numba compiles for: the choice follows it, not this CPU
    monkeypatch.setattr(primitives.numba.config, "CPU_FEATURES", "+avx2,+fma,+avx512f,+avx512bw")
    assert primitives.wide_vectors()
    monkeypatch.setattr(primitives.numba.config, "CPU_FEATURES", "+avx2,+fma,-avx512f")
    assert not primitives.wide_vectors()
    monkeypatch.setattr(primitives.numba.config, "CPU_FEATURES", None)
    assert primitives.wide_vectors() == bool(primitives.llvm.get_host_cpu_features().get("avx512f", False))


def test_a_thread_prefetches_where_its_share_of_the_next_stage_begins():
    import numpy as np

    # shares as schedule.chunks hands them out: thread t of nt starts at chunk t * n // nt
    assert schedule.share_address(1000, 1, 2, 18, 32 * 1536) == 1000 + 9 * 32 * 1536 * 4  # 576 rows: 18 chunks
    assert schedule.share_address(1000, 2, 2, 18, 32 * 576) == 1000 + 18 * 32 * 576 * 4  # the last share ends it
    assert schedule.share_address(1000, 1, 2, 384, 128 * 576) == 1000 + 192 * 128 * 576 * 4
    assert schedule.share_address(1000, 0, 2, 4, 32 * 64) == 1000
    column = np.zeros(1, np.int64)
    layers = walk.Layers(*([column] * 11))._replace(
        wq=np.array([10**6]), wk=np.array([2 * 10**6]), wv=np.array([3 * 10**6])
    )
    # SmolLM2-135M: 576 q rows, 192 k, 192 v = 30 chunks of 32; thread 1 of 2 starts at row 480 (in q),
    # thread 2 of 3 at row 640 (k's row 64), thread 4 of 5 at row 768 (v's row 0)
    dims = walk.Dims(576, 576, 192, 1536, 64, 3)
    assert walk.qkv_share(layers, 0, dims, 1, 2, 30) == 10**6 + 480 * 576 * 4
    assert walk.qkv_share(layers, 0, dims, 2, 3, 30) == 2 * 10**6 + 64 * 576 * 4
    assert walk.qkv_share(layers, 0, dims, 4, 5, 30) == 3 * 10**6


def test_a_decoder_not_yet_compiled_is_announced(tiny_lm, monkeypatch, caplog):
    """The first use after install compiles for about a minute: one line says so, instead of a silent wait."""
    CompiledDecoder(tiny_lm).add(tiny_lm.encode("To be"))
    assert walk.compiled_on_disk()  # compiled now if no test before did, and cached on disk by numba
    with caplog.at_level("WARNING", logger="nexttok.cpu.decoder"):
        caplog.clear()
        CompiledDecoder(tiny_lm)
        assert not caplog.records
        monkeypatch.setattr(walk, "compiled_on_disk", lambda: False)
        CompiledDecoder(tiny_lm)
    assert [r.getMessage() for r in caplog.records] == [
        "nexttok: compiling the decoder for this CPU (once after install: about a minute on 2 cores)"
    ]


def test_exact_prefill_gives_the_distributions_logits_and_the_walk_goes_on_from_them(tiny_lm):
    """make_decoder(exact_prefill=True) reads a short prompt with the model's forward pass (the server's
    decoder): its first logits are lm.distribution's exactly, and the steps after still match the forward."""
    from nexttok.decoders import make_decoder

    ids = tiny_lm.encode("To be, or not")
    decoder = make_decoder(tiny_lm, exact_prefill=True)
    assert "compiled" in decoder.reason
    row, first = decoder.add(ids)
    assert torch.equal(first, tiny_lm.last_logits(ids))
    nxt = int(first.argmax())
    stepped = decoder.step([row], [nxt])[0]
    assert torch.allclose(stepped, tiny_lm.last_logits([*ids, nxt]), atol=1e-4)
