"""What the playground asks for: the sampling stages re-applied to a prompt's cached scores (no new forward
pass), a seeded draw from them with where its uniform number fell, and every token of a text by rank.

The stages are nexttok's own processors (:func:`nexttok.processors.apply`), so no view can disagree with the CLI.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from nexttok import compare
from nexttok.distribution import Distribution, show_token
from nexttok.errors import NexttokError
from nexttok.processors import apply_traced, build_processors
from nexttok.samples import resolve_bias
from nexttok.sampling import SamplingConfig, draw, make_generators
from nexttok.server import translate as tr

if TYPE_CHECKING:
    from nexttok.lm import LM
    from nexttok.server.scheduler import Scheduler
    from nexttok.server.schemas import CompareRequest, RanksRequest, StagesRequest

# Rank buckets of the colour view (GLTR's): top 10, top 100, top 1000, beyond.
BUCKETS = (10, 100, 1000)


class ScoreCache:
    """The last-position logits (V,) of recent prompts, by their ids: a slider moved on the page re-applies the
    stages to these, with no forward pass. ``forwards`` counts the model calls it made."""

    def __init__(self, size: int = 64):
        self.size, self.forwards = size, 0
        self._items: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def get(self, lm: LM, ids: list[int]) -> tuple[torch.Tensor, bool]:
        """The logits after ``ids`` and whether they were cached (call on the model's thread)."""
        key = tuple(ids)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], True
        logits = lm.last_logits(ids).float()  # (V,)
        self.forwards += 1
        self._items[key] = logits
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return logits, False


def _token(lm: LM, i: int, prob: float) -> dict[str, Any]:
    text = lm.token_text(i)
    return {"id": i, "text": text, "shown": show_token(text), "prob": prob}


def stages(lm: LM, cache: ScoreCache, req: StagesRequest) -> dict[str, Any]:
    """The stage records of ``req``'s settings over its prompt's cached scores (on the model's thread)."""
    ids = tr.request_ids(lm, req)
    bias = {int(k) if k.isdigit() else k: v for k, v in req.logit_bias.items()}
    names = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty")  # fmt: skip
    config = SamplingConfig(**{n: getattr(req, n) for n in names}, logit_bias=bias, seed=req.seed)
    logits, cached = cache.get(lm, ids)
    processors = build_processors(config, resolve_bias(lm, config.logit_bias))
    processed, records, _ = apply_traced(processors, torch.tensor([ids]), logits[None], trace=True)
    rows = []
    for r in records[0]:
        rows.append({"name": r.name, "survivors": r.survivors, "mass_removed": r.mass_removed, "entropy": r.entropy})
    final = torch.softmax(processed[0], -1)  # (V,): what a draw samples from
    kept = torch.isfinite(processed[0])
    dist = Distribution(logits, lm, ids)
    top = torch.topk(dist.probs, min(req.top, lm.vocab_size))
    candidates = [
        {**_token(lm, i, p), "rank": n + 1, "kept": bool(kept[i]), "final_prob": float(final[i])}
        for n, (i, p) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    ]
    out = {
        "prompt_ids": ids, "context": lm.tokenizer.decode(ids), "cached": cached, "entropy": dist.entropy,
        "cover_90": dist.mass_cover(0.9), "greedy": config.greedy, "stages": rows, "candidates": candidates,
    }  # fmt: skip
    if req.seed is not None:
        sample = _sample(lm, processed, req.seed, config.greedy)
        out["sample"] = sample | {"model_prob": float(dist.probs[sample["id"]])}  # before the stages
    return out


def _sample(lm: LM, processed: torch.Tensor, seed: int, greedy: bool) -> dict[str, Any]:
    """One token drawn from (1, V) ``processed`` with ``seed`` (generate's first draw with that seed), and
    where its uniform number fell: the cumulative probability before and after the token, best first."""
    chosen, uniform = draw(processed, None if greedy else make_generators([seed]))
    token = int(chosen[0])
    probs = torch.softmax(processed[0], -1)
    better = processed[0] > processed[0, token]  # ties come before by id, as the draw orders them
    tied_before = (processed[0] == processed[0, token]) & (torch.arange(len(probs)) < token)
    before = float(probs[better | tied_before].sum())
    return {**_token(lm, token, float(probs[token])), "seed": seed, "uniform": None if uniform is None else uniform[0],
            "cdf_before": before, "cdf_after": before + float(probs[token])}  # fmt: skip


def ranks(lm: LM, scheduler: Scheduler, req: RanksRequest) -> dict[str, Any]:
    """Each token of the text after the first: its probability and rank given those before, its bucket, and the
    ``top`` alternatives there (one forward pass, teacher forcing; on the model's thread)."""
    ids = tr.request_ids(lm, req)
    rows = [{**_token(lm, ids[0], 1.0), "prob": None, "rank": None, "bucket": None, "top": []}]
    if len(ids) > 1:
        logp = torch.log_softmax(scheduler.decoder.score(ids, range(len(ids) - 1)), -1)  # (T - 1, V)
        chosen = logp.gather(1, torch.tensor(ids[1:])[:, None])  # (T - 1, 1)
        rank = ((logp > chosen).sum(-1) + 1).tolist()
        alts = torch.topk(logp, min(req.top, lm.vocab_size), -1) if req.top else None
        for t, token in enumerate(ids[1:]):
            top = (
                []
                if alts is None
                else [_token(lm, int(i), float(v.exp())) for i, v in zip(alts.indices[t], alts.values[t], strict=True)]
            )  # noqa: E501
            bucket = next((f"top-{b}" for b in BUCKETS if rank[t] <= b), "beyond")
            rows.append({**_token(lm, token, float(chosen[t].exp())), "rank": rank[t], "bucket": bucket, "top": top})
    counts = {f"top-{b}": 0 for b in BUCKETS} | {"beyond": 0}
    for row in rows[1:]:
        counts[row["bucket"]] += 1
    return {"tokens": rows, "buckets": counts, "thresholds": list(BUCKETS)}


def compared(names: list[str], req: CompareRequest) -> tuple[str, str]:
    """The two models a compare request names: ``a`` (default: the first served) and ``b`` (default: the next)."""
    a = req.a or names[0]
    b = req.b or next((n for n in names if n != a), None)
    if b is None:
        raise NexttokError("compare needs two models: start the server with --model A --model B", param="b")
    return a, b


def same_ids(lm_a: LM, lm_b: LM, req: CompareRequest) -> list[int]:
    """The prompt's ids, which must be the same under both models' tokenizers."""
    return compare.same_ids(tr.request_ids(lm_a, req), tr.request_ids(lm_b, req), param="b")


def comparison(a: str, b: str, dist_a: Distribution, dist_b: Distribution, req: CompareRequest) -> dict[str, Any]:
    """``nexttok compare --json``'s numbers, with each token as shown and the two models' names."""
    out = compare.compare_distributions(dist_a, dist_b, req.top, req.moves).to_dict()
    for key in ("candidates", "gains", "losses"):
        for row in out[key]:
            row["shown"] = show_token(row["text"])
    return {"a": a, "b": b, **out}
