"""An evaluation's per-token records: a JSONL or parquet file, and a self-contained HTML page of the text
coloured by surprisal with each token's top alternatives on hover."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from nexttok.distribution import show_token
from nexttok.errors import NexttokError
from nexttok.evaluation.pipeline import EvalResult

LN2 = math.log(2)
SURPRISAL_SCALE = 12.0  # bits at which the colour is fully red


def rows(result: EvalResult, lm) -> list[dict]:
    """One record per scored position, in text order."""
    pos, out, i = result.positions, [], 0
    for job in result.jobs:
        for p in range(job.window.scored_from, job.window.stop):
            tid = int(pos.token[i])
            out.append({
                "doc": job.doc, "position": p, "id": tid, "text": lm.token_text(tid),
                "logprob": float(pos.logprob[i]), "rank": int(pos.rank[i]), "entropy": float(pos.entropy[i]),
                "context": int(pos.context[i]),
            })  # fmt: skip
            i += 1
    return out


def write_tokens(result: EvalResult, lm, path: str | Path) -> Path:
    out = Path(path)
    if out.suffix not in (".jsonl", ".parquet"):
        raise NexttokError(f"--tokens must end in .jsonl or .parquet (got '{out.name}')", param="tokens")
    out.parent.mkdir(parents=True, exist_ok=True)
    records = rows(result, lm)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), tmp)
    else:
        with tmp.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out


PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>nexttok eval: {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>
body{{font-family:system-ui,sans-serif;margin:1.5rem;max-width:60rem}}
.text{{white-space:pre-wrap;line-height:1.7;font-family:ui-monospace,monospace;font-size:0.95rem}}
span.t{{border-radius:2px}} span.t:hover,span.t:focus{{outline:2px solid #333}}
.legend span{{display:inline-block;padding:0 .4rem;margin-right:.2rem}}
.doc{{border-top:1px solid #ccc;margin-top:1rem}}
</style></head><body><h1>{title}</h1><p>{summary}</p><p class="legend">surprisal (bits): {legend}</p>
<p>Hover or focus a token: its probability, rank and the model's top alternatives. Grey text was context only.</p>
{docs}</body></html>"""


def _colour(bits: float) -> str:
    x = min(1.0, bits / SURPRISAL_SCALE)
    return f"hsl({120 * (1 - x):.0f}, 75%, {88 - 18 * x:.0f}%)"


def write_html(result: EvalResult, lm, path: str | Path) -> Path:
    pos = result.positions
    if pos.top_ids is None:
        raise NexttokError("the result holds no alternatives; evaluate with top=5", param="html")
    scored: dict[tuple[int, int], int] = {}
    i = 0
    for job in result.jobs:
        for p in range(job.window.scored_from, job.window.stop):
            scored[(job.doc, p)] = i
            i += 1
    docs = []
    for d, ids in enumerate(result.text.ids):
        spans = [_span(lm, int(t), scored.get((d, p)), pos) for p, t in enumerate(ids.tolist())]
        docs.append(f'<div class="doc text">{"".join(spans)}</div>')
    m = result.metrics
    summary = f"{m.tokens:,} tokens scored · loss {m.loss:.4f} nats/token · perplexity {m.perplexity:.3f}"
    legend = "".join(f'<span style="background:{_colour(b)}">{b:g}</span>' for b in (0, 2, 4, 6, 8, 10, 12))
    title = html.escape(f"{result.model} on {result.source}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(PAGE.format(title=title, summary=summary, legend=legend, docs="\n".join(docs)), encoding="utf-8")
    return out


def _span(lm, tid: int, i: int | None, pos) -> str:
    text = html.escape(lm.token_text(tid))
    if i is None:
        return f'<span style="color:#888">{text}</span>'
    bits = -float(pos.logprob[i]) / LN2
    alts = ", ".join(
        f"{show_token(lm.token_text(int(a)))} {float(p):.3f}"
        for a, p in zip(pos.top_ids[i], pos.top_probs[i], strict=True)
    )
    tip = html.escape(f"p={math.exp(pos.logprob[i]):.4f} rank {int(pos.rank[i])} ({bits:.1f} bits); top: {alts}")
    return f'<span class="t" tabindex="0" title="{tip}" style="background:{_colour(bits)}">{text}</span>'
