"""The comparison's band plot: validation reward and KL to base against RL steps, one band (mean ± std over
seeds) per method, from the report `compare_report` builds."""

from __future__ import annotations

import textwrap

import numpy as np

from fst_jax.analysis.compare_report import LABELS, PLASTICITY_SOURCES

__all__ = ["band_plot", "section_plot"]


def band_plot(report: dict, path: str) -> None:
    """Validation reward and KL to base (seed prompt) against RL steps: mean over seeds, a band of ± std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, color in zip(("fst", "rl", "gepa", "fst_nondominated", "fst_dominated", "fst_reuse"), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        if key not in report["methods"]:
            continue
        curves = report["methods"][key]["curves"]
        for ax, metric in zip(axes, ("reward", "kl_to_base")):
            rows = [c for c in curves if c[metric] is not None and c["steps"]]
            if not rows:
                continue
            steps = sorted(set.intersection(*(set(c["steps"]) for c in rows)))
            ys = np.array([[dict(zip(c["steps"], c[metric]))[s] for s in steps] for c in rows])
            mean, std = ys.mean(axis=0), ys.std(axis=0)
            ax.plot(steps, mean, color=color, label=f"{LABELS[key]} (n={len(rows)})")
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
    xlabel = "RL step"
    if report.get("rl_steps", report["steps"]) > 4 * report["steps"]:  # RL alone ran far longer: keep both legible
        last = max(report.get("rl_steps", 0), report["steps"])
        ticks = [0] + [8 * 2 ** i for i in range(int(np.log2(last / 8)) + 1)]
        for ax in axes:
            ax.set_xscale("symlog", linthresh=8)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        xlabel = "RL step (linear to 8, logarithmic after)"
    axes[0].set(xlabel=xlabel, ylabel="validation reward (mean@k, best prompt)", title=report["task"])
    axes[1].set(xlabel=xlabel, ylabel="KL(π_θ ‖ π_base), seed prompt")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(5, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section_plot(key: str, section: dict, path: str) -> None:
    """The ceiling or plasticity section's validation reward against RL steps: mean over seeds ± std, one band per
    method (ceiling) or per starting checkpoint (plasticity)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = section["methods"] if key == "ceiling" else section["from"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, group), color in zip(groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        rows = [c for c in group["curves"] if c["steps"]]
        if not rows:
            continue
        steps = sorted(set.intersection(*(set(c["steps"]) for c in rows)))
        ys = np.array([[dict(zip(c["steps"], c["reward"]))[s] for s in steps] for c in rows])
        mean, std = ys.mean(axis=0), ys.std(axis=0)
        label = PLASTICITY_SOURCES.get(name, name) if key == "plasticity" else LABELS.get(name, name)
        ax.plot(steps, mean, color=color, label=f"from {label}" if key == "plasticity" else f"{label} (n={len(rows)})")
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
    if key == "plasticity":
        ax.axhline(section["threshold"], color="gray", lw=0.8, ls="--")
    ax.set(xlabel="RL step", ylabel="validation reward (mean@k, best prompt)")
    ax.set_title(textwrap.fill(section["task"], 80), fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
