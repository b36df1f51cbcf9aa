"""results.png: the end-to-end speed-up of each contender over the baseline per case (the absolute
times are in RESULTS.md; a diamond marks the paired caption ratio where the run measured one), and
where the time goes in the two caption cases the targets are about, one panel each."""

from __future__ import annotations

from pathlib import Path

import numpy as np

STAGE_COLORS = {"preprocess": "#bbbbbb", "vision": "#4c72b0", "text_encoder": "#8172b2", "cross_kv": "#ccb974",
                "decoder_step": "#dd8452", "other": "#55a868"}
STAGE_CASES = ("caption-greedy", "caption-batch8")


def plot(results: dict, table: dict, order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["baseline"]
    cases = [c["name"] for c in results["cases"] if c["name"] in table and base in table[c["name"]]]
    others = [c for c in order if c != base]
    staged = [k for k in STAGE_CASES if k in table]
    rows = max([sum(c in table[k] for c in order) for k in staged] or [1])
    fig = plt.figure(figsize=(16, 6 + 0.28 * rows))
    grid = fig.add_gridspec(2, max(len(staged), 1), height_ratios=[6, 0.3 * rows + 1])
    ax1 = fig.add_subplot(grid[0, :])
    colors = plt.get_cmap("tab20").colors
    width = 0.84 / max(len(others), 1)
    paired = (results.get("paired_transformers") or {}).get("ratios", {})
    marked = False  # the paired diamonds' legend entry is given once
    for i, c in enumerate(others):
        x = np.arange(len(cases)) + (i - (len(others) - 1) / 2) * width
        speedup = [table[k][base]["median"] / table[k][c]["median"] if c in table[k] else np.nan for k in cases]
        ax1.bar(x, speedup, width, label=c, color=colors[i % len(colors)])
        for xi, v in zip(x, speedup):
            if np.isfinite(v):
                ax1.text(xi, v, f" {v:.1f}×", ha="center", va="bottom", rotation=90, fontsize=6.5)
        pr = paired.get(f"{base}/{c}")
        if pr and "caption-greedy" in cases:
            xi = x[cases.index("caption-greedy")]
            ax1.plot([xi], [pr["median"]], marker="D", linestyle="none", color="black", markersize=4, zorder=3,
                     label=None if marked else "paired, own processes")
            marked = True
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_xticks(np.arange(len(cases)), cases)
    ax1.set_ylabel(f"speed-up over {base} (its median / ours)")
    ax1.set_title(f"End to end, higher is better ({base} = 1)")
    ax1.margins(y=0.18)
    ax1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)

    for j, k in enumerate(staged):
        ax = fig.add_subplot(grid[1, j])
        names = [c for c in order if c in table[k]]
        for y, c in enumerate(names):
            s, left = table[k][c], 0.0
            parts = {**s["stages"], "other": s["other"]}
            for stage, color in STAGE_COLORS.items():
                w = max(parts.get(stage, 0.0), 0.0)
                ax.barh(y, w, left=left, color=color, label=stage if y == 0 else None)
                left += w
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median per stage)")
        ax.set_title(f"Where the time goes: {k}")
        if j == 0:
            fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=len(STAGE_COLORS), fontsize=8)
    m = results["machine"]
    blip2 = " and BLIP-2 at real size" if any(k.startswith("blip2") for k in cases) else ""
    fig.suptitle(f"BLIP {results['scale']}{blip2} on {m['cpu']}, {m['threads_used']} threads ({results['date']})")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
