"""results.png: the end-to-end speed-up of each contender over the baseline per case (the absolute
times are in RESULTS.md), and where the time goes in the two caption cases the targets are about."""

from __future__ import annotations

from pathlib import Path

import numpy as np

STAGE_COLORS = {"preprocess": "#bbbbbb", "vision": "#4c72b0", "text_encoder": "#8172b2", "cross_kv": "#ccb974",
                "decoder_step": "#dd8452", "other": "#55a868"}


def plot(results: dict, table: dict, order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["baseline"]
    cases = [c["name"] for c in results["cases"] if c["name"] in table and base in table[c["name"]]]
    others = [c for c in order if c != base]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(others), 1)
    for i, c in enumerate(others):
        x = np.arange(len(cases)) + (i - (len(others) - 1) / 2) * width
        speedup = [table[k][base]["median"] / table[k][c]["median"] if c in table[k] else np.nan for k in cases]
        ax1.bar(x, speedup, width, label=c)
        for xi, v in zip(x, speedup):
            if np.isfinite(v):
                ax1.text(xi, v, f" {v:.1f}×", ha="center", va="bottom", rotation=90, fontsize=7)
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_xticks(np.arange(len(cases)), cases, rotation=15)
    ax1.set_ylabel(f"speed-up over {base} (its median / ours)")
    ax1.set_title(f"End to end, higher is better ({base} = 1)")
    ax1.margins(y=0.15)
    ax1.legend(fontsize=8)

    rows = [(k, c) for k in ("caption-greedy", "caption-batch8") if k in table for c in order if c in table[k]]
    for y, (k, c) in enumerate(rows):
        s, left = table[k][c], 0.0
        parts = {**s["stages"], "other": s["other"]}
        for stage, color in STAGE_COLORS.items():
            w = max(parts.get(stage, 0.0), 0.0)
            ax2.barh(y, w, left=left, color=color, label=stage if y == 0 else None)
            left += w
    ax2.set_yticks(range(len(rows)), [f"{c}\n{k}" for k, c in rows], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("seconds (median per stage)")
    ax2.set_title("Where the time goes")
    ax2.legend(fontsize=8, loc="lower right")
    m = results["machine"]
    fig.suptitle(f"BLIP {results['scale']} on {m['cpu']}, {m['threads_used']} threads ({results['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
