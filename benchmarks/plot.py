"""Draw the benchmark CSVs as PNGs: prefill TFLOP/s vs sequence length, decode GB/s vs context
(with the copy bandwidth measured in the same run as a line).

    python benchmarks/plot.py [--out DIR]   # reads DIR/prefill.csv, DIR/decode.csv
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def num(x: str) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _series(ax, series: dict, min_points: int = 1) -> None:
    """One line per contender; ours drawn thicker."""
    for name, pts in sorted(series.items()):
        if len(pts) < min_points:
            continue  # contenders timed at one shape only stay in the table
        pts.sort()
        style = dict(linewidth=2.5) if "ours" in name else {}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, **style)


def _finish(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_prefill(rows: list[dict], out: Path) -> None:
    series = defaultdict(list)
    for r in rows:
        if r["causal"] == "True" and num(r["tflops"]):
            series[r["contender"]].append((int(r["seqlen"]), num(r["tflops"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _series(ax, series)
    ceiling = num(rows[0].get("matmul_tflops")) if rows else None
    if ceiling:
        ax.axhline(ceiling, linestyle="--", color="gray", label=f"bf16 matmul {ceiling:.0f}")
    _finish(ax, "sequence length (batch x length = 16384 tokens)", "TFLOP/s",
            f"prefill, causal, bf16, H=32 Hkv=8 D=128 ({rows[0]['device'] if rows else ''})")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_decode(rows: list[dict], out: Path) -> None:
    batches = sorted({int(r["batch"]) for r in rows if int(r["batch"]) in (1, 16)})
    fig, axes = plt.subplots(1, max(1, len(batches)), figsize=(6 * max(1, len(batches)), 4.5),
                             squeeze=False)
    copy = num(rows[0].get("copy_gbs")) if rows else None
    for ax, b in zip(axes[0], batches):
        series = defaultdict(list)
        for r in rows:
            if int(r["batch"]) == b and num(r["gbs"]):
                series[r["contender"]].append((int(r["ctx"]), num(r["gbs"])))
        _series(ax, series, min_points=2)
        if copy:
            ax.axhline(copy, linestyle="--", color="gray", label=f"device copy {copy:.0f}")
            ax.axhline(0.9 * copy, linestyle=":", color="gray", label="90% of copy")
        _finish(ax, "context length (tokens)", "GB/s of K+V read (CUDA-graph timing)",
                f"decode, B={b}, bf16, Hq=32 Hkv=8 D=128")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    out = Path(parser.parse_args().out)
    if (out / "prefill.csv").exists():
        plot_prefill(read(out / "prefill.csv"), out / "prefill.png")
    if (out / "decode.csv").exists():
        plot_decode(read(out / "decode.csv"), out / "decode.png")


if __name__ == "__main__":
    main()
