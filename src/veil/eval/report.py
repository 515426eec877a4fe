"""Printing and plotting a privacy evaluation report."""

from __future__ import annotations

from pathlib import Path

from veil.eval.privacy import Report

COLUMNS = (
    ("mechanism", "{:<17}"),
    ("eps", "{:>4}"),
    ("zero-shot", "{:>9.3f}"),
    ("±", "{:>5.3f}"),
    ("probe", "{:>6.3f}"),
    ("±", "{:>5.3f}"),
    ("knn@1", "{:>6.3f}"),
    ("knn@10", "{:>6.3f}"),
    ("changed", "{:>7.3f}"),
    ("sanitized", "{:>9.3f}"),
    ("exposed@1", "{:>9.3f}"),
    ("eps/sent", "{:>8.1f}"),
)


def table(report: Report) -> str:
    """A fixed-width table, one row per (mechanism, epsilon)."""
    header = " ".join(
        f"{name:>{len(fmt.format(0) if 'f' in fmt else name)}}" if i else f"{name:<17}"
        for i, (name, fmt) in enumerate(COLUMNS)
    )
    lines = [header]
    order = {name: i for i, name in enumerate(dict.fromkeys(r.mechanism for r in report.rows))}
    for r in sorted(report.rows, key=lambda r: (order[r.mechanism], r.epsilon or 0.0)):
        values = (
            r.mechanism,
            "-" if r.epsilon is None else f"{r.epsilon:g}",
            r.zero_shot_accuracy,
            r.zero_shot_stderr,
            r.probe_accuracy,
            r.probe_stderr,
            r.knn_top1,
            r.knn_top10,
            r.changed,
            r.sanitized,
            r.exposed_top1,
            r.epsilon_per_sentence,
        )
        lines.append(" ".join(fmt.format(v) for (_, fmt), v in zip(COLUMNS, values)))
    if report.cost:
        c = report.cost
        lines.append(
            f"sanitizer cost: {c['sanitize_ms']:.2f} ms for {c['num_tokens']:.0f} tokens vs a "
            f"{c['forward_ms']:.1f} ms forward pass = {c['ratio_percent']:.2f}%"
        )
    return "\n".join(lines)


def plot(report: Report, path: Path) -> None:
    """Accuracy vs epsilon and attack success vs epsilon, one line per mechanism."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    clean = next((r for r in report.rows if r.epsilon is None), None)
    names = list(dict.fromkeys(r.mechanism for r in report.rows if r.epsilon is not None))
    panels = (
        ("zero_shot_accuracy", "zero_shot_stderr", "zero-shot accuracy (SmolLM2; dashed: clean)"),
        ("probe_accuracy", "probe_stderr", "probe accuracy (MiniLM+LR; dashed: clean)"),
        ("knn_top10", None, "KNN inversion success @10"),
    )
    for ax, (attr, error, title) in zip(axes, panels):
        for name in names:
            rows = [r for r in report.rows if r.mechanism == name]
            errors = [getattr(r, error) for r in rows] if error else None
            x, y = [r.epsilon for r in rows], [getattr(r, attr) for r in rows]
            ax.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=name)
        if clean is not None and attr != "knn_top10":
            ax.axhline(getattr(clean, attr), color="gray", linestyle="--", label="no sanitizing")
        ax.set_xlabel("epsilon per token")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, loc="upper left")  # the accuracy panels have lines near the top
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
