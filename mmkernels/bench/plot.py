"""Speed-up plots from benchmark rows (matplotlib, optional)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ._args import replace_file
from .results import Row

__all__ = ["plot_name", "plot_speedups"]


def plot_name(op: str) -> str:
    """The file name of ``op``'s speed-up plot in the output folder."""
    return f"speedup_{op}.png"


def plot_speedups(rows: list[Row], out_dir: str | Path) -> list[Path]:
    """One horizontal bar chart per op: each provider's speed-up over the case's baseline, per case and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("mmkernels-bench --plot needs matplotlib: pip install 'mmkernels[bench]'") from exc
    by_op: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.speedup is not None:
            by_op[r.op].append(r)
    paths = []
    for op, op_rows in by_op.items():
        labels = [f"{r.case} [{r.mode}] {r.provider}" for r in op_rows]
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(op_rows) + 1.5))
        colors = ["tab:green" if r.provider.startswith("mmkernels") else "tab:gray" for r in op_rows]
        ax.barh(range(len(op_rows)), [r.speedup for r in op_rows], color=colors)
        ax.set_yticks(range(len(op_rows)), labels, fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("speed-up over the case's baseline (higher is better)")
        ax.set_title(f"{op} on {op_rows[0].device}")
        fig.tight_layout()
        path = Path(out_dir) / plot_name(op)
        replace_file(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=120, format="png"))
        plt.close(fig)
        paths.append(path)
    return paths
