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


def plot_zoo(rows: list[dict], path: Path, x: str = "gmacs") -> Path:
    """Latency against GMACs (or params) for every model, unfused -> fused arrows.

    `rows` items: name, gmacs, params_m, unfused_ms, fused_ms.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    label = {"gmacs": "GMACs per image", "params_m": "parameters, millions"}[x]
    for row in rows:
        ax.annotate(
            "",
            xy=(row[x], row["fused_ms"]),
            xytext=(row[x], row["unfused_ms"]),
            arrowprops={"arrowstyle": "->", "color": "grey"},
        )
        ax.annotate(
            row["name"],
            (row[x], row["fused_ms"]),
            fontsize=7,
            xytext=(4, -2),
            textcoords="offset points",
        )
    ax.scatter(
        [r[x] for r in rows],
        [r["unfused_ms"] for r in rows],
        label="unfused (plain export)",
        color="#dd8452",
    )
    ax.scatter(
        [r[x] for r in rows], [r["fused_ms"] for r in rows], label="fused (mvd)", color="#4c72b0"
    )
    ax.set_xscale("log")  # the zoo spans 0.3 to several hundred GMACs
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("onnxruntime CPU latency, ms (median)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = _save(fig, path)
    plt.close(fig)
    return path
