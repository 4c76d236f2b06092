"""Figures of a sweep (scaling laws with their bands, each configuration's zero-shot AUROC)
and of one model (ROC curves, reliability of zero-shot probabilities, linear-probe label
efficiency). Each function returns a matplotlib Figure (no pyplot state,
no display needed); the caller saves or logs it."""

from __future__ import annotations

import numpy as np

from vlp3d.evaluation.scaling import AXES, METRIC, ScalingResult
from vlp3d.evaluation.scaling_fit import Design, LawFit

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


def _fit_label(result: ScalingResult) -> str:
    fit = result.fit
    if not fit.ok:
        return f"{result.group}: no fit ({fit.reason.split(':')[0]})"
    exponents = ", ".join(f"$\\alpha_{{{a}}}$={_short(fit.params[f'alpha_{a}'])}" for a in fit.axes)
    return f"{result.group}: {exponents}"


def _short(estimate) -> str:
    if not estimate.identified:
        return "not identified"
    return f"{estimate.value:.2f} [{estimate.low:.2f}, {estimate.high:.2f}]"


def _draw_law(ax, result: ScalingResult, colour, marker: str, fixed: dict[int, float] | None = None,
              label: str | None = None) -> None:
    """Points of one law (replicates side by side), its fitted curve and 95% band over the first axis; `fixed`
    holds the other axes of a joint law at one value (only the points at that value are drawn)."""
    design, fit = result.design, result.fit
    rows = np.ones(len(design.y), dtype=bool)
    for j, value in (fixed or {}).items():
        rows &= design.x[:, j] == value
    x, y = design.x[rows, 0].astype(float), design.y[rows]
    if len(x) > len(np.unique(x)):  # seeds side by side, not on top of each other
        x = x * (1 + 0.03 * (np.arange(len(x)) % 3 - 1))
    label = label or _fit_label(result)
    ax.scatter(x, y, color=colour, marker=marker, s=28, zorder=3, label=None if fit.ok else label)
    if fit.ok and len(x):
        grid = np.geomspace(x.min() / 1.2, x.max() * 1.2, 80)
        points = np.zeros((len(grid), len(fit.axes)))
        points[:, 0] = grid
        for j, value in (fixed or {}).items():
            points[:, j] = value
        ax.plot(grid, fit.predict(points), "--", color=colour, lw=1.4, label=label)
        low, high = fit.band(points)
        if np.isfinite(low).all():
            ax.fill_between(grid, low, high, color=colour, alpha=0.15, lw=0)


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


def scaling_figures(results: list[ScalingResult], split: str = "test") -> dict:
    """One figure per law of a sweep (`scaling_N`, `scaling_D`, `scaling_C`, `scaling_N_D`): the trials'
    points, each fitted curve (dashed) and its 95% bootstrap band, exponents with intervals in the legend;
    the joint L(N, D) over D with one curve per N."""
    figures = {}
    for law in dict.fromkeys(r.law for r in results):
        chosen = [r for r in results if r.law == law]
        figure, axes = _figure(1, width=6.4, height=4.6)
        ax = axes[0]
        if law == "L(N, D)":
            for result in chosen:  # drawn over D, one curve per N: the law with its axes swapped
                swapped = ScalingResult(law, result.group, Design(("D", "N"), result.design.x[:, ::-1],
                                                                  result.design.y), _swap(result.fit))
                levels = np.unique(result.design.x[:, 0])
                for i, (level, colour) in enumerate(zip(levels, _colours(len(levels)), strict=True)):
                    _draw_law(ax, swapped, colour, _MARKERS[i % len(_MARKERS)], {1: level},
                              label=f"N={level:.3g}" + (f"; {_fit_label(result)}" if i == 0 else ""))
            xlabel = AXES["D"][1]
        else:
            for i, (result, colour) in enumerate(zip(chosen, _colours(len(chosen)), strict=True)):
                _draw_law(ax, result, colour, _MARKERS[i % len(_MARKERS)])
            xlabel = AXES[chosen[0].design.axes[0]][1]
        _finish(ax, xlabel, f"{METRIC} on {split}", f"{law}: points, fit (dashed), 95% bootstrap band")
        figures["scaling_" + "_".join(law[2:-1].split(", "))] = figure
    return figures


def _swap(fit: LawFit) -> LawFit:
    """A two-axis law with its axes in the other order (to draw it over its second axis)."""
    if not fit.ok:
        return fit
    order = [0, 3, 4, 1, 2]
    return LawFit(axes=fit.axes[::-1], n=fit.n, ok=True, params=fit.params, theta=fit.theta[order],
                  samples=None if fit.samples is None else fit.samples[:, order])


def _labelled_intervals(ax, labels: list[str], centre, low, high, colours, chance: float | None) -> None:
    rows = np.arange(len(labels))
    ax.errorbar(centre, rows, xerr=[np.clip(centre - low, 0, None), np.clip(high - centre, 0, None)],
                fmt="none", ecolor="grey", capsize=2)
    ax.scatter(centre, rows, c=colours, zorder=3, s=30)
    ax.set_yticks(rows, labels, fontsize=7)
    if chance is not None:
        ax.axvline(chance, color="grey", ls=":", lw=1)


def configurations_figure(table, label_column: str = "label", split: str = ""):
    """Zero-shot macro AUROC (on `split`) with its 95% interval for every evaluated trial, best at the top
    (hollow grey: trials stopped early, evaluated at their last checkpoint)."""
    rows = table[np.isfinite(table["macro_auroc"].to_numpy(dtype=float))].sort_values("macro_auroc")
    figure, axes = _figure(1, width=8.0, height=max(2.5, 0.32 * len(rows) + 1.2))
    ax = axes[0]
    colours = ["tab:blue" if s == "finished" else "lightgrey" for s in rows["status"]]
    _labelled_intervals(ax, [f"{t} {lbl}" for t, lbl in zip(rows["trial_id"], rows[label_column], strict=True)],
                        rows["macro_auroc"].to_numpy(dtype=float), rows["macro_auroc_ci_low"].to_numpy(dtype=float),
                        rows["macro_auroc_ci_high"].to_numpy(dtype=float), colours, chance=0.5)
    ax.set_xlabel(f"zero-shot macro AUROC{f' on {split}' if split else ''} (95% CI); dotted: chance")
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
