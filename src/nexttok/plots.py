"""Figures written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_candidates(report: dict, path: str | Path) -> Path:
    """Bars of the top candidates; grouped bars, one colour per temperature, when there are several."""
    plt = _pyplot()
    dists = report["distributions"]
    labels = [r["shown"] for r in dists[0]["top"]]
    n, width = len(dists), 0.8 / len(dists)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(labels) + 2), 4))
    for j, d in enumerate(dists):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [r["prob"] for r in d["top"]], width, label=f"T={d['temperature']:g} ({d['entropy_bits']:.2f} bits)")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_ylabel("probability")
    tail = "".join(t["text"] for t in report["prompt_tokens"])[-50:]
    ax.set_title(f"next token after {tail!r}", fontsize=10)
    if n > 1:
        ax.legend()
    return _save(plt, fig, path)


def plot_loss_curve(records: list[dict], path: str | Path) -> Path:
    """Training loss and held-out loss (nats per token) against the step, from ``metrics.jsonl`` records;
    held-out bits per character (or byte) on a second axis when they were measured."""
    plt = _pyplot()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    key = next((k for k in ("eval_bits_per_char", "eval_bits_per_byte") if any(k in r for r in records)), None)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", alpha=0.8)
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if key:
        bits = [(r["step"], r[key]) for r in records if key in r]
        ax2 = ax.twinx()
        ax2.plot(*zip(*bits, strict=True), "s--", color="tab:green", alpha=0.7, markersize=3)
        ax2.set_ylabel(key.removeprefix("eval_").replace("_", " "), color="tab:green")
    return _save(plt, fig, path)


def plot_compare(comparison, names: tuple[str, str], path: str | Path) -> Path:
    """Paired bars: each candidate's probability under model A and model B (``nexttok compare --plot``)."""
    plt = _pyplot()
    rows = comparison.rows
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 2), 4))
    ax.bar([x - 0.2 for x in xs], [r.prob_a for r in rows], 0.4, label=f"A: {names[0]}")
    ax.bar([x + 0.2 for x in xs], [r.prob_b for r in rows], 0.4, label=f"B: {names[1]}")
    # Control characters have no glyph: show them escaped.
    labels = ["".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in r.shown) for r in rows]
    ax.set_xticks(list(xs), labels, rotation=45, ha="right")
    ax.set_ylabel("probability")
    ax.set_title(f"KL(A‖B) {comparison.kl_ab_bits:.3f} bits · JS {comparison.js_bits:.3f} bits", fontsize=10)
    ax.legend()
    return _save(plt, fig, path)
