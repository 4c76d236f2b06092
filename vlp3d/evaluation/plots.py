"""Figures of a sweep (scaling laws, the compute frontier, each configuration's zero-shot AUROC)
and of one model (ROC curves, reliability of zero-shot probabilities, linear-probe label
efficiency). Each function returns a matplotlib Figure (no pyplot state,
no display needed); the caller saves or logs it."""

from __future__ import annotations

import numpy as np

from vlp3d.evaluation.scaling import AXES, METRICS, ScalingSeries

_MARKERS = "osD^v<>ph*"


def _figure(panels: int, width: float = 5.2, height: float = 4.2):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * panels, height), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    return figure, axes


def _colours(count: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(count)]


def _fit_label(series: ScalingSeries) -> str:
    fit = series.fit
    if not fit.ok:
        return f"{series.group}: no fit ({fit.n} pts)"
    return (f"{series.group}: $\\alpha$={fit.alpha:.2f} [{fit.alpha_ci[0]:.2f}, {fit.alpha_ci[1]:.2f}], "
            f"c={fit.c:.3g}, $R^2$={fit.r2:.2f}")


def _draw_series(ax, series: ScalingSeries, colour, marker: str, jitter: bool = True) -> None:
    x = series.x.astype(float)
    if jitter and len(x) > len(np.unique(x)):  # replicates (seeds) side by side, not on top of each other
        x = x * (1 + 0.03 * (np.arange(len(x)) % 3 - 1))
    has_bars = np.isfinite(series.y_low) & np.isfinite(series.y_high)
    ax.scatter(x, series.y, color=colour, marker=marker, s=28, zorder=3,
               label=None if series.fit.ok else _fit_label(series))  # no curve: the markers carry the legend
    if has_bars.any():
        lower = np.clip(series.y[has_bars] - series.y_low[has_bars], 0, None)
        upper = np.clip(series.y_high[has_bars] - series.y[has_bars], 0, None)
        ax.errorbar(x[has_bars], series.y[has_bars], yerr=[lower, upper], fmt="none", ecolor=colour,
                    alpha=0.6, capsize=2, zorder=2)
    if series.fit.ok:
        grid = np.geomspace(series.x.min(), series.x.max(), 100)
        ax.plot(grid, series.fit.predict(grid), "--", color=colour, marker=marker, markevery=[0], lw=1.4,
                label=_fit_label(series))


def _finish(ax, xlabel: str, ylabel: str, title: str) -> None:
    from matplotlib.ticker import NullFormatter

    if ax.has_data() and ax.dataLim.x0 > 0 and ax.dataLim.y0 > 0:  # log axes need positive data
        ax.set_xscale("log")
        ax.set_yscale("log")
        if ax.dataLim.x1 / ax.dataLim.x0 > 10:  # minor labels overlap over a decade; keep them on a narrow axis
            ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="best")


def scaling_figure(series: list[ScalingSeries], axis: str):
    """Each metric (one panel each) over `axis` ('data' or 'params'): points with their intervals,
    one dashed power-law fit per group, exponent and its 95% interval in the legend."""
    _, xlabel, _ = AXES[axis]
    figure, axes = _figure(len(METRICS))
    for ax, (metric, ylabel) in zip(axes, METRICS.items(), strict=True):
        chosen = [s for s in series if s.axis == axis and s.metric == metric]
        for i, (one, colour) in enumerate(zip(chosen, _colours(len(chosen)), strict=True)):
            _draw_series(ax, one, colour, _MARKERS[i % len(_MARKERS)])
        _finish(ax, xlabel, ylabel, f"{ylabel} vs {xlabel}: y = a x^-alpha + c")
    return figure


def frontier_figure(series: list[ScalingSeries]):
    """Left: every trial's validation-loss curve over cumulative FLOPs (one colour per model) and
    the compute-optimal frontier with its fit. Right: final 1 - AUROC over total FLOPs."""
    figure, axes = _figure(2)
    loss_series = [s for s in series if s.axis == "compute" and s.metric == "val_loss"]
    auroc_series = [s for s in series if s.axis == "compute" and s.metric == "1-auroc"]
    ax = axes[0]
    for one in loss_series:
        curves = one.curves
        models = sorted(curves["model"].unique())
        colours = dict(zip(models, _colours(len(models)), strict=True))
        for model in models:
            ax.plot([], [], color=colours[model], lw=1, label=model)
        for _, curve in curves.groupby("trial_id"):
            curve = curve.sort_values("flops")
            ax.plot(curve["flops"], curve["val_loss"], color=colours[curve["model"].iloc[0]], lw=0.8, alpha=0.55)
        _draw_series(ax, one, "black", "o", jitter=False)
    _finish(ax, "training FLOPs (cumulative)", METRICS["val_loss"], "validation curves and compute-optimal frontier")
    for i, (one, colour) in enumerate(zip(auroc_series, _colours(len(auroc_series)), strict=True)):
        _draw_series(axes[1], one, colour, _MARKERS[i % len(_MARKERS)], jitter=False)
    _finish(axes[1], "training FLOPs (total)", METRICS["1-auroc"], "final 1 - AUROC frontier")
    return figure


def _labelled_intervals(ax, labels: list[str], centre, low, high, colours, chance: float | None) -> None:
    rows = np.arange(len(labels))
    ax.errorbar(centre, rows, xerr=[np.clip(centre - low, 0, None), np.clip(high - centre, 0, None)],
                fmt="none", ecolor="grey", capsize=2)
    ax.scatter(centre, rows, c=colours, zorder=3, s=30)
    ax.set_yticks(rows, labels, fontsize=7)
    if chance is not None:
        ax.axvline(chance, color="grey", ls=":", lw=1)


def configurations_figure(table, label_column: str = "label"):
    """Zero-shot macro AUROC with its 95% interval for every evaluated trial, best at the top
    (hollow grey: trials stopped early, evaluated at their last checkpoint)."""
    rows = table[np.isfinite(table["macro_auroc"].to_numpy(dtype=float))].sort_values("macro_auroc")
    figure, axes = _figure(1, width=8.0, height=max(2.5, 0.32 * len(rows) + 1.2))
    ax = axes[0]
    colours = ["tab:blue" if s == "finished" else "lightgrey" for s in rows["status"]]
    _labelled_intervals(ax, [f"{t} {lbl}" for t, lbl in zip(rows["trial_id"], rows[label_column], strict=True)],
                        rows["macro_auroc"].to_numpy(dtype=float), rows["macro_auroc_ci_low"].to_numpy(dtype=float),
                        rows["macro_auroc_ci_high"].to_numpy(dtype=float), colours, chance=0.5)
    ax.set_xlabel("zero-shot macro AUROC (95% CI); dotted: chance")
    ax.set_title("every trial", fontsize=10)
    ax.grid(True, axis="x", alpha=0.25)
    return figure


def loss_weights_figure(table, weight_keys: list[str]):
    """One panel per varied loss weight: each finished trial's zero-shot AUROC (95% CI) at the
    weight it trained with, and the mean per weight value; shows which terms help."""
    figure, axes = _figure(len(weight_keys), width=3.6)
    for ax, key in zip(axes, weight_keys, strict=True):
        finished = table[(table["status"] == "finished") & table[key].notna()]  # NaN: the method lacks the term
        values = sorted(finished[key].unique())
        position = {v: i for i, v in enumerate(values)}
        x = np.array([position[v] for v in finished[key]], dtype=float)
        x += 0.12 * (np.arange(len(x)) % 5 - 2) / 2
        auroc = finished["macro_auroc"].to_numpy(dtype=float)
        low = finished["macro_auroc_ci_low"].to_numpy(dtype=float)
        high = finished["macro_auroc_ci_high"].to_numpy(dtype=float)
        ax.errorbar(x, auroc, yerr=[np.clip(auroc - low, 0, None), np.clip(high - auroc, 0, None)], fmt="o",
                    ms=4, alpha=0.7, capsize=2)
        means = [finished.loc[finished[key] == v, "macro_auroc"].mean() for v in values]
        ax.plot(range(len(values)), means, "k_", ms=22, mew=2, label="mean")
        ax.set_xticks(range(len(values)), [f"{v:g}" for v in values])
        ax.set_xlabel(key.removeprefix("objective."))
        ax.set_ylabel("zero-shot macro AUROC")
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.grid(True, axis="y", alpha=0.25)
        ax.legend(fontsize=7)
    figure.suptitle("loss-term weights against held-out AUROC", fontsize=10)
    return figure


def roc_figure(targets: np.ndarray, probabilities: np.ndarray, names: list[str], title: str = ""):
    """Zero-shot ROC curve of every evaluated label ([N, L] 0/1 targets and probabilities), AUROC
    in the legend; dotted diagonal: chance."""
    from sklearn.metrics import roc_curve

    from vlp3d.evaluation.metrics import auroc

    figure, axes = _figure(1, width=5.6, height=5.0)
    ax = axes[0]
    for k, (name, colour) in enumerate(zip(names, _colours(len(names)), strict=True)):
        fpr, tpr, _ = roc_curve(targets[:, k], probabilities[:, k])
        ax.plot(fpr, tpr, color=colour, lw=1.4, label=f"{name} ({auroc(targets[:, k], probabilities[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "zero-shot ROC per finding (AUROC)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, alpha=0.25)
    return figure


def reliability_figure(targets: np.ndarray, probabilities: np.ndarray, names: list[str], bins: int = 10,
                       title: str = ""):
    """Reliability of the zero-shot probabilities: observed frequency of the finding per bin of
    predicted probability (uniform bins, empty ones left out), per label; the diagonal is a
    calibrated model. Below it: how the probabilities are spread."""
    from matplotlib.figure import Figure
    from sklearn.calibration import calibration_curve

    figure = Figure(figsize=(5.6, 6.2), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    for k, (name, colour) in enumerate(zip(names, _colours(len(names)), strict=True)):
        observed, predicted = calibration_curve(targets[:, k], probabilities[:, k], n_bins=bins, strategy="uniform")
        top.plot(predicted, observed, "o-", color=colour, ms=3, lw=1.2, label=name)
        bottom.hist(probabilities[:, k], bins=bins, range=(0, 1), histtype="step", color=colour)
    top.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    top.set_ylabel("observed frequency")
    top.set_title(title or "reliability of zero-shot probabilities", fontsize=10)
    top.legend(fontsize=7, loc="upper left")
    top.grid(True, alpha=0.25)
    bottom.set_xlabel("predicted P(finding)")
    bottom.set_ylabel("volumes")
    return figure


def label_efficiency_figure(table, title: str = "", value: str = "auroc", ylabel: str = "",
                            chance: float | None = 0.5):
    """A score (95% CI) over the share of training labels, one line per feature source: by default
    linear-probe macro AUROC (`vlp3d.evaluation.probe.compare_probes`' table: columns features, fraction,
    auroc, auroc_ci_low, auroc_ci_high); `value` names another score column (with its `_ci_low`/`_ci_high`,
    e.g. fine-tuning Dice per initialisation from a label-efficiency sweep). Dotted: `chance` (None: no line)."""
    figure, axes = _figure(1, width=5.6, height=4.2)
    ax = axes[0]
    sources = list(dict.fromkeys(table["features"]))
    for source, colour, marker in zip(sources, _colours(len(sources)), _MARKERS, strict=False):
        rows = table[(table["features"] == source) & np.isfinite(table[value].to_numpy(dtype=float))]
        x, y = rows["fraction"].to_numpy(dtype=float), rows[value].to_numpy(dtype=float)
        low, high = rows[f"{value}_ci_low"].to_numpy(dtype=float), rows[f"{value}_ci_high"].to_numpy(dtype=float)
        ax.errorbar(x, y, yerr=[np.clip(y - np.nan_to_num(low, nan=y), 0, None),
                                np.clip(np.nan_to_num(high, nan=y) - y, 0, None)],
                    fmt=marker + "-", color=colour, capsize=3, lw=1.4, ms=5, label=source)
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    fractions = sorted(table["fraction"].unique())
    ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("share of training labels (nested subsets of patients)")
    ax.set_ylabel(ylabel or "linear-probe macro AUROC (95% CI)")
    ax.set_title(title or "label efficiency: frozen features + logistic regression", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.25)
    return figure
