"""fit(): the loop learns, resumes exactly, stops on NaN, respects max_seconds; TrainConfig validation."""

from __future__ import annotations

import json

import pytest
import torch

from nexttok.errors import NexttokError
from nexttok.loss import token_loss_sum
from nexttok.train import TrainConfig, fit


class ToySource:
    """Blocks at pseudo-random offsets, a pure function of the index (as the contract requires)."""

    def __init__(self, ids: torch.Tensor, block: int = 32, hook=None):
        self.ids, self.block, self.hook = ids, block, hook

    def batch(self, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        if self.hook:
            self.hook(index)
        g = torch.Generator().manual_seed(index)
        off = torch.randint(0, len(self.ids) - self.block, (batch_size,), generator=g)
        x = torch.stack([self.ids[o : o + self.block] for o in off.tolist()])  # (B, T)
        return {"input_ids": x, "labels": x.clone()}

    def eval_batches(self, batch_size: int, limit: int):
        n = batch_size * self.block
        for i in range(limit):
            x = self.ids[i * n : (i + 1) * n].view(batch_size, self.block)  # (B, T)
            yield {"input_ids": x, "labels": x.clone(), "n_bytes": torch.tensor(4 * x.numel())}


def tiny_model(tok, dropout: float = 0.1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, attention_dropout=dropout,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def config(out, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(out), max_steps=12, batch_size=4, grad_accum=2, lr=3e-3, min_lr=3e-4, warmup_steps=3,
        eval_every=6, eval_batches=2, save_every=4, log_every=2,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_fit_learns_and_writes_a_model_folder(tmp_path, tok, ids):
    from transformers import AutoModelForCausalLM

    model = tiny_model(tok)
    with torch.no_grad():
        loss_sum, n = token_loss_sum(model.eval(), next(ToySource(ids).eval_batches(4, 1)))
    res = fit(model, tok, ToySource(ids), ToySource(ids), config(tmp_path, sample_every=6, sample_prompt="ROMEO:"))
    assert res.step == 12 and res.eval["loss"] < float(loss_sum) / n - 0.3  # learned something
    assert 0 < res.eval["bits_per_byte"] < 10
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records) and any(r.get("sample", "").startswith("ROMEO:") for r in records)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # out_dir itself is a standard HF folder
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_after_a_crash_gives_the_same_final_loss(tmp_path, tok, ids, optimizer):
    whole = fit(tiny_model(tok), tok, ToySource(ids), None, config(tmp_path / "a", optimizer=optimizer))

    def crash(index: int) -> None:
        if index == 2 * 10:  # the first micro-batch of step 10; the last checkpoint is step 8
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(tok), tok, ToySource(ids, hook=crash), None, config(tmp_path / "b", optimizer=optimizer))
    state = json.loads((tmp_path / "b/checkpoint/trainer_state.json").read_text())
    assert state["step"] == 8
    # A fresh model object (different init) proves the weights come from the checkpoint.
    torch.manual_seed(123)
    resumed = fit(tiny_model(tok), tok, ToySource(ids), None, config(tmp_path / "b", optimizer=optimizer), resume=True)
    assert resumed.step == 12
    assert resumed.train_loss == pytest.approx(whole.train_loss, abs=1e-6)
    # The log records of the lost steps 9-10 were dropped, so each step is logged once.
    records = [json.loads(x) for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == sorted(set(logged))


def test_a_second_run_into_the_same_folder_needs_resume(tmp_path, tok, ids):
    fit(tiny_model(tok), tok, ToySource(ids), None, config(tmp_path, max_steps=2, warmup_steps=1))
    with pytest.raises(NexttokError, match="--resume"):
        fit(tiny_model(tok), tok, ToySource(ids), None, config(tmp_path, max_steps=2, warmup_steps=1))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, tok, ids):
    model = tiny_model(tok)

    def poison(index: int) -> None:
        if index == 2 * 6:  # step 6 (0-based): after the checkpoint of step 4
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")

    with pytest.raises(NexttokError, match=r"loss became nan at step 7.*last good checkpoint \(step 4\)"):
        fit(model, tok, ToySource(ids, hook=poison), None, config(tmp_path))
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "checkpoint/model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_max_seconds_stops_cleanly_with_a_checkpoint(tmp_path, tok, ids):
    res = fit(tiny_model(tok), tok, ToySource(ids), None, config(tmp_path, max_steps=10_000, max_seconds=0.5))
    assert res.stopped_early and 0 < res.step < 10_000
    assert json.loads((tmp_path / "checkpoint/trainer_state.json").read_text())["step"] == res.step
    # Resuming a run whose time is spent takes no further step (rerunning `make shakespeare` is idempotent).
    again = fit(tiny_model(tok), tok, ToySource(ids), None, config(tmp_path, max_steps=10_000, max_seconds=0.5), True)
    assert again.step == res.step and again.stopped_early


def test_grad_accum_matches_one_big_batch(tmp_path, tok, ids):
    """The loss is the mean over every trained token of the step, however it is split."""
    a = fit(tiny_model(tok, 0.0), tok, ToySource(ids), None, config(tmp_path / "a", batch_size=8, grad_accum=1))

    class Halves(ToySource):
        def batch(self, index, batch_size):
            full = super().batch(index // 2, 2 * batch_size)
            half = slice(0, batch_size) if index % 2 == 0 else slice(batch_size, None)
            return {k: v[half] for k, v in full.items()}

    b = fit(tiny_model(tok, 0.0), tok, Halves(ids), None, config(tmp_path / "b", batch_size=4, grad_accum=2))
    assert b.train_loss == pytest.approx(a.train_loss, abs=1e-4)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [("lr", 0.0, "in (0, 1]"), ("max_steps", 0, ">= 1"), ("warmup_steps", 99, "in [0, max_steps=12]")],
)
def test_config_errors_name_the_field_and_range(tmp_path, field, value, allowed):
    with pytest.raises(NexttokError, match=rf"train\.{field} must be {__import__('re').escape(allowed)}"):
        config(tmp_path, **{field: value})


def test_lr_schedule_warms_up_then_decays_to_min_lr(tmp_path):
    c = config(tmp_path, max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert c.lr_at(0) == pytest.approx(1e-4) and c.lr_at(9) == pytest.approx(1e-3)
    assert c.lr_at(55) == pytest.approx(5.5e-4) and c.lr_at(100) == pytest.approx(1e-4)


def test_time_schedule_anneals_over_max_seconds(tmp_path):
    c = config(tmp_path, max_steps=1000, warmup_steps=10, lr=1e-3, min_lr=1e-4, max_seconds=60, schedule="time")
    assert c.lr_at(500, seconds=30) == pytest.approx(5.5e-4) and c.lr_at(20, seconds=60) == pytest.approx(1e-4)
    with pytest.raises(NexttokError, match="train.schedule must be"):
        config(tmp_path, schedule="time")  # no max_seconds to anneal over


def test_param_groups_decay_only_matrices_and_scale_the_embedding_lr(tok):
    from nexttok.optim import param_groups

    model = tiny_model(tok)
    decay, no_decay, embed = param_groups(model, 0.1, embedding_lr_scale=5.0)
    assert {id(p) for p in embed["params"]} == {id(model.model.embed_tokens.weight)} and embed["lr_scale"] == 5.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == embed["weight_decay"] == 0.0


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tmp_path, tok, ids):
    from nexttok.optim import Muon, make_optimizer

    model = tiny_model(tok)
    muon, adamw = make_optimizer(model, config(tmp_path, optimizer="muon")).optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    on_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    hidden = {id(p) for p in model.parameters() if p.ndim == 2} - {id(head), id(embed)}
    assert on_muon == hidden and len(hidden) == 7  # q, k, v, o, gate, up, down
    on_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert on_adamw == {id(p) for p in model.parameters()} - hidden
    with torch.no_grad():
        loss_sum, n = token_loss_sum(model.eval(), next(ToySource(ids).eval_batches(4, 1)))
    res = fit(model, tok, ToySource(ids), ToySource(ids), config(tmp_path, optimizer="muon"))
    assert res.eval["loss"] < float(loss_sum) / n - 0.2  # learned something
    with pytest.raises(NexttokError, match='train.optimizer must be "adamw" or "muon"'):
        config(tmp_path, optimizer="sgd")
    with pytest.raises(NexttokError, match="different optimizer"):  # a muon checkpoint resumed with adamw
        fit(tiny_model(tok), tok, ToySource(ids), None, config(tmp_path, max_steps=14), resume=True)
    fit(tiny_model(tok), tok, ToySource(ids), None, config(tmp_path / "a", max_steps=2, warmup_steps=1))
    again = config(tmp_path / "a", max_steps=4, warmup_steps=1, optimizer="muon")
    with pytest.raises(NexttokError, match="different optimizer"):  # an adamw checkpoint resumed with muon
        fit(tiny_model(tok), tok, ToySource(ids), None, again, resume=True)


def test_bf16_autocast_trains_in_bfloat16(tmp_path, tok, ids, monkeypatch):
    monkeypatch.setenv("NEXTTOK_BF16", "fast")  # as on a CPU with native bf16 (the tiny model is cheap either way)
    kw = dict(max_steps=4, warmup_steps=1, eval_every=0, save_every=0)
    fp32 = fit(tiny_model(tok, 0.0), tok, ToySource(ids), None, config(tmp_path / "a", **kw))
    bf16 = fit(tiny_model(tok, 0.0), tok, ToySource(ids), None, config(tmp_path / "b", bf16=True, **kw))
    # Same batches and init: the losses differ only by bfloat16 rounding (equal would mean no autocast).
    assert bf16.train_loss != fp32.train_loss and abs(bf16.train_loss - fp32.train_loss) < 0.1


def test_bf16_where_it_is_slow_trains_in_float32_with_a_one_line_notice(tmp_path, tok, ids, monkeypatch):
    from nexttok.errors import NexttokNotice

    monkeypatch.setenv("NEXTTOK_BF16", "slow")  # as on a CPU without native bf16
    kw = dict(max_steps=3, warmup_steps=1, eval_every=0, save_every=0)
    fp32 = fit(tiny_model(tok, 0.0), tok, ToySource(ids), None, config(tmp_path / "a", **kw))
    with pytest.warns(NexttokNotice, match=r"^train.bf16 \(--bf16\): .* so this runs in float32 instead$"):
        asked = fit(tiny_model(tok, 0.0), tok, ToySource(ids), None, config(tmp_path / "b", bf16=True, **kw))
    assert asked.train_loss == fp32.train_loss  # the very same float32 computation


def test_only_trained_positions_reach_the_output_layer_and_the_loss_is_unchanged(tok, ids):
    model = tiny_model(tok, dropout=0.0).eval()
    x = ids[:64].view(2, 32)  # (B, T)
    labels = x.clone()
    labels[0, :20] = -100  # a prompt
    labels[1, :5] = labels[1, 25:] = -100
    seen = []
    model.lm_head.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    loss, n = token_loss_sum(model, {"input_ids": x, "labels": labels})
    logits = model(input_ids=x).logits[:, :-1]  # (B, T-1, V): the reference projects every position
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    n_trained = int((labels[:, 1:] != -100).sum())
    assert n == n_trained and seen[0] == (n_trained, 32)  # (N, H), not (B, T, H)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert not model.lm_head._forward_pre_hooks  # the selection hook is gone afterwards
