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


def _printable(text: str) -> str:
    """Control characters have no glyph: show them escaped."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def plot_lens(lens, path: str | Path) -> Path:
    """The logit lens as a heatmap (``nexttok predict --layers --plot``): one row per layer, embeddings at
    the bottom; one column per token of the final layer's top; each cell that token's probability there.
    ``lens``: a :class:`nexttok.lens.Lens`, its :func:`nexttok.lens.lens_report`, or a predict report with it."""
    from nexttok.lens import lens_report

    report = lens if isinstance(lens, dict) else lens_report(lens)
    report = report.get("layers", report)
    rows, tokens = report["rows"], report["tokens"]
    grid = [r["probs"] for r in rows]  # (L+1, top)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(tokens) + 2.5), max(3.0, 0.38 * len(rows) + 1.6)))
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for y, row in enumerate(grid):
        for x, p in enumerate(row):
            ax.text(x, y, f"{p:.2f}", ha="center", va="center", fontsize=7, color="black" if p > 0.6 else "white")
    ax.set_xticks(range(len(tokens)), [_printable(t["shown"]) for t in tokens], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
    ax.set_xlabel("the last layer's top tokens")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="probability")
    ax.set_title(f"logit lens: next token after {report['context_tail']!r}", fontsize=10)
    return _save(plt, fig, path)


def plot_patterns(result, path: str | Path) -> Path:
    """Agreement of the model's top-1 with the corpus's (the infinity-gram's) against the length of the
    suffix the corpus matched, with each bucket's share of the positions."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    buckets = [b for b in result.buckets if b.positions]
    x = range(len(buckets))
    ax.bar(x, [b.agreement for b in buckets], color="tab:blue", alpha=0.85, label="model top-1 = corpus top-1")
    ax.plot(x, [b.model_accuracy for b in buckets], "o-", color="tab:green", label="model top-1 correct")
    ax.plot(x, [b.corpus_accuracy for b in buckets], "s--", color="tab:orange", label="corpus top-1 correct")
    for i, b in enumerate(buckets):
        ax.text(i, min(b.agreement, 0.92) + 0.02, f"{b.share:.0%}\nof positions", ha="center", fontsize=7)
    ax.set_xticks(list(x), [b.label for b in buckets])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("length of the longest suffix of the context found in the corpus (tokens)")
    ax.set_ylabel("share of positions")
    ax.set_title(f"{result.model} vs its corpus on {result.source}: agreement {result.agreement:.1%}", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    return _save(plt, fig, path)


def plot_memorization(sides: list, path: str | Path) -> Path:
    """The extractable share of windows against how often each window occurs in the corpus, per model
    and set of windows."""
    from nexttok.corpus.memorization import DUP_BUCKETS

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    present = {r["occurrences"] for s in sides for r in s.by_duplicates}
    order = {lab: i for i, lab in enumerate(lab for _, _, lab in DUP_BUCKETS if lab in present)}
    width = 0.8 / max(len(sides), 1)
    for j, s in enumerate(sides):
        xs = [order[r["occurrences"]] + (j - (len(sides) - 1) / 2) * width for r in s.by_duplicates]
        ax.bar(xs, [r["extractable"] for r in s.by_duplicates], width, label=f"{s.model}, {s.windows} windows")
        for xi, r in zip(xs, s.by_duplicates, strict=True):
            ax.text(xi, r["extractable"] + 0.02, f"n={r['windows']}", ha="center", fontsize=6)
    ax.set_xticks(list(order.values()), list(order))
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("occurrences of the whole window in the corpus")
    ax.set_ylabel("extractable share (greedy reproduces the suffix)")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)
