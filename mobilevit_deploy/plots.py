"""PNG plots of benchmark reports (matplotlib, the `plot` extra, imported lazily)."""

from __future__ import annotations

from pathlib import Path

from .errors import BackendUnavailable
from .files import atomic_path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BackendUnavailable(
            "plots need matplotlib: pip install 'mobilevit_deploy[plot]'"
        ) from None
    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_bench(report: dict, path: Path) -> Path:
    """Median latency of each candidate of one model, p90 as the error bar."""
    plt = _pyplot()
    results = report["results"]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(results) + 1.2))
    names = [r["runtime"] for r in results]
    medians = [r["median_ms"] for r in results]
    spread = [r["p90_ms"] - r["median_ms"] for r in results]
    ax.barh(names, medians, xerr=[[0] * len(results), spread], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel("latency, ms (median; bar to p90)")
    ax.set_title(f"{report['model']}: {report['machine_line'][:80]}", fontsize=8)
    path = _save(fig, path)
    plt.close(fig)
    return path


FAMILY_COLORS = {
    "fastvit": "#4c72b0",
    "levit": "#dd8452",
    "efficientvit": "#55a868",
    "seaformer": "#c44e52",
    "sepvit": "#8172b3",
}


def _short_label(row: dict) -> str:
    """The colour says the family, so a label only tells the variant apart:
    efficientvit_seg_b0_cityscapes at 512x1024 is "b0 City 512x1024"."""
    name = row["name"].split("_", 1)[-1].replace("seg_", "")
    name = name.replace("_cityscapes", " City").replace("_ade20k", " ADE")
    return f"{name} {row['input']}" if row.get("task") == "segmentation" else name


def plot_zoo(rows: list[dict], path: Path, x: str = "gmacs") -> Path:
    """Latency against GMACs (or params), one panel per task, a colour per family: a
    hollow marker for the plain export, a filled one for the fused model, joined.

    `rows` items: name, gmacs, params_m, unfused_ms, fused_ms; optional task ("classification"
    or "segmentation") and input ("HxW", shown for segmenters, which run at two sizes).
    """
    plt = _pyplot()
    tasks = sorted({r.get("task", "classification") for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 5.5), squeeze=False)
    label = {"gmacs": "GMACs per image", "params_m": "parameters, millions"}[x]
    for ax, task in zip(axes[0], tasks, strict=True):
        for row in (r for r in rows if r.get("task", "classification") == task):
            color = FAMILY_COLORS.get(row["name"].split("_")[0], "grey")
            ax.plot([row[x]] * 2, [row["unfused_ms"], row["fused_ms"]], color=color, lw=1)
            ax.scatter(row[x], row["unfused_ms"], facecolors="none", edgecolors=color, s=30)
            ax.scatter(row[x], row["fused_ms"], color=color, s=30)
            ax.annotate(
                _short_label(row),
                (row[x], row["fused_ms"]),
                fontsize=6.5,
                color=color,
                xytext=(4, -3),
                textcoords="offset points",
            )
        ax.set_xscale("log")  # the zoo spans 0.1 to 100 GMACs
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("onnxruntime CPU latency, ms (median)")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=c, label=f) for f, c in FAMILY_COLORS.items()
    ] + [
        plt.Line2D([], [], marker="o", ls="", mfc="none", mec="black", label="plain export"),
        plt.Line2D([], [], marker="o", ls="", color="black", label="fused (mvd)"),
    ]
    axes[0][0].legend(handles=handles, fontsize=8, loc="upper left")
    path = _save(fig, path)
    plt.close(fig)
    return path
