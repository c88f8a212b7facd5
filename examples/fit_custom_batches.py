"""fit() on your own batches: any object with batch(index, B) and eval_batches(B, limit) will do.

Run from the repository root after `nexttok tokenizer train ... --out runs/shakespeare-tokenizer` (docs/pretrain.md).
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from nexttok import TrainConfig, fit

tok = AutoTokenizer.from_pretrained("runs/shakespeare-tokenizer")
text = Path("README.md").read_text(encoding="utf-8")
ids = torch.tensor(tok.encode(text, add_special_tokens=False))  # (N,)


class Blocks:
    """A BatchSource: batch `index` is always the same rows (so resume and DDP are exact)."""

    def batch(self, index, batch_size, T=64):
        g = torch.Generator().manual_seed(index)
        starts = torch.randint(0, len(ids) - T, (batch_size,), generator=g)
        x = torch.stack([ids[s : s + T] for s in starts.tolist()])  # (B, T)
        return {"input_ids": x, "labels": x.clone()}  # labels not shifted: fit() shifts

    def eval_batches(self, batch_size, limit):
        for i in range(limit):
            yield self.batch(10**6 + i, batch_size)


model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
)
config = TrainConfig(
    out_dir="runs/fit-example",
    max_steps=40,
    batch_size=8,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=5,
    eval_every=20,
    eval_batches=2,
    save_every=20,
    log_every=10,
)
result = fit(model, tok, Blocks(), Blocks(), config, resume=True)  # a second run continues (or just re-evaluates)
print(result.step, round(result.train_loss, 3), round(result.eval["loss"], 3))
