"""Figures written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
