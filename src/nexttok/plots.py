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


def plot_reliability(bins, title: str, path: str | Path, ece: float | None = None) -> Path:
    """The reliability diagram: accuracy of the top-1 token against its confidence, per equal-width bin,
    with each bin's count written on its bar; the diagonal is perfect calibration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    width = bins[0].hi - bins[0].lo
    mids = [(b.lo + b.hi) / 2 for b in bins]
    ax.bar(mids, [b.accuracy for b in bins], width * 0.92, color="tab:blue", alpha=0.8, label="accuracy")
    ax.plot([b.confidence if b.count else None for b in bins], [b.accuracy if b.count else None for b in bins],
            "o", color="tab:orange", label="mean confidence")  # fmt: skip
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    for m, b in zip(mids, bins, strict=True):
        ax.text(m, min(b.accuracy, 0.93) + 0.02, f"{b.count:,}", ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("top-1 accuracy")
    import textwrap

    full = title + (f" · ECE {ece:.4f}" if ece is not None else "")
    ax.set_title("\n".join(textwrap.wrap(full, 60)), fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    return _save(plt, fig, path)
