"""mIoU-vs-clicks curves as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from segany.errors import require


def plot_miou_vs_clicks(summary: dict[str, Any], path: str | os.PathLike[str], title: str = "",
                        baseline: dict[str, Any] | None = None) -> Path:
    """One curve per dataset from :func:`segany.eval.interactive.summarize`, the model's box-prompt mIoU as a
    star at x = "box" and the baseline's box mIoU as dashes, so the box comparison reads off one figure."""
    require("matplotlib", "train")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    last = 1
    for i, (name, s) in enumerate(sorted(summary.items())):
        curve = s.get("miou_by_clicks")
        if not curve:
            continue
        color = f"C{i}"
        ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, color=color,
                label=f"{name} (n={s['objects']})")
        if s.get("box_miou") is not None:
            ax.plot([0], [s["box_miou"]], marker="*", ms=10, color=color, ls="none")
        if baseline and name in baseline and baseline[name].get("box_miou") is not None:
            ax.axhline(baseline[name]["box_miou"], color=color, ls="--", lw=1)
        last = max(last, len(curve))
    ticks = [t for t in (1, 5, 10, 15, 20, 30, 50) if t <= last]
    ax.set_xticks([0, *ticks], ["box", *map(str, ticks)])
    ax.set_xlim(-0.7, last + 0.7)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title or "mIoU vs clicks (★ box prompt; dashed: GrabCut from box)")
    ax.legend(fontsize=8, loc="lower right")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    from segany.atomic import atomic_path

    with atomic_path(out) as tmp:  # the temp name has no suffix: say the format
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out
