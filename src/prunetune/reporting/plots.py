"""PNG plots for reports (matplotlib, Agg backend: no display needed).

Each function takes plain data (what run directories store as JSON) and a path, so a report can be
re-drawn from a finished run without loading any model.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from prunetune.rundir import atomic_write_bytes

DPI = 110


def _save(fig, path: Path) -> Path:
    """Render to memory, then publish atomically: a report killed mid-plot leaves the previous PNG or none,
    never a truncated one (the report is redrawn whole on `--resume`)."""
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def metric_vs_sparsity(series: dict[str, list[tuple[float, float, str]]], metric: str, path: Path,
                       title: str | None = None, log_y: bool = False) -> Path:
    """One line per series (a run or an ordering): points (sparsity, value, label) in the order they happened."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in series.items():
        if not pts:
            continue
        xs = [100 * p[0] for p in pts]
        ys = [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", label=name)
        for x, y, lab in pts:
            if lab:
                ax.annotate(lab, (100 * x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("sparsity of prunable linears (%)")
    ax.set_ylabel(metric)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{metric} vs sparsity")
    if len(series) > 1 or any(series.values()):
        ax.legend(fontsize=8)
    return _save(fig, path)


def layer_sparsity_bars(layers: dict[str, dict], path: Path, title: str = "per-layer sparsity (real zeros)") -> Path:
    """One bar per prunable linear, coloured by role, in model order."""
    names = list(layers)
    roles = [layers[n]["role"] for n in names]
    palette = plt.get_cmap("tab10")
    role_ids = {r: i for i, r in enumerate(dict.fromkeys(roles))}
    fig, ax = plt.subplots(figsize=(max(7, len(names) * 0.06 + 3), 4))
    ax.bar(range(len(names)), [100 * layers[n]["sparsity"] for n in names],
           color=[palette(role_ids[r] % 10) for r in roles], width=0.85)
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette(i % 10)) for i in role_ids.values()]
    ax.legend(handles, list(role_ids), fontsize=7, ncol=min(7, len(role_ids)), loc="lower right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("sparsity (%)")
    ax.set_xlabel(f"prunable linear layers in model order ({len(names)})")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def weight_histograms(hist: dict, path: Path) -> Path:
    """|w| histograms of chosen layers, before (dense) vs after pruning; exact zeros reported in the legend."""
    dense, pruned = hist["dense"], hist["pruned"]
    names = list(dense)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.8), squeeze=False)
    for ax, n in zip(axes[0], names):
        d, p = dense[n], pruned[n]
        edges = d["edges"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        width = edges[1] - edges[0]
        ax.bar(centers, d["counts"], width=width, alpha=0.5,
               label=f"{hist.get('label_before', 'dense')} (zeros {d['zeros'] / d['numel']:.1%})")
        ax.bar(centers, p["counts"], width=width, alpha=0.6,
               label=f"{hist.get('label_after', 'pruned')} (zeros {p['zeros'] / p['numel']:.1%})")
        ax.set_yscale("log")
        ax.set_xlabel("|w| (non-zero weights)")
        ax.set_ylabel("count")
        ax.set_title(n, fontsize=8)
        ax.legend(fontsize=7)
    return _save(fig, path)


def curves(series: dict[str, list[list[float]]], path: Path, title: str = "training / eval curves") -> Path:
    """Loss (and accuracy when present) against optimizer step; one line per series."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax2 = None
    for name, pts in series.items():
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if "accuracy" in name or "f1" in name:
            ax2 = ax2 or ax.twinx()
            ax2.plot(xs, ys, marker="s", linestyle="--", label=name)
            ax2.set_ylabel("accuracy / F1")
        else:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    lines, labels = ax.get_legend_handles_labels()
    if ax2 is not None:
        l2, lab2 = ax2.get_legend_handles_labels()
        lines, labels = lines + l2, labels + lab2
    if lines:
        ax.legend(lines, labels, fontsize=8)
    return _save(fig, path)
