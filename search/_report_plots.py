"""Matplotlib figures (PNG) of a study and of one trial. Uses Figure + the Agg canvas directly,
never pyplot, so it changes no global state and works in worker processes without a display."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from model.files import replace_whole
from search._figures import StudyView, hypervolume_history, label, reference_point
from search.pareto import is_feasible
from search._notes import FAIRNESS

log = logging.getLogger(__name__)

PARETO, FEASIBLE, INFEASIBLE = "#d62728", "#7f9fbf", "#c8c8c8"


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, *, layout: str | None = "constrained", dpi: int = 110):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, axes


def _save(figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return replace_whole(path, figure.savefig)


def _scale(metric: str) -> float:
    return 100.0 if metric in FAIRNESS else 1.0


def _axis_label(metric: str, direction: str | None = None) -> str:
    arrow = {"maximize": " (higher is better)", "minimize": " (lower is better)"}.get(direction or "", "")
    return f"val {label(metric)}{' %' if metric in FAIRNESS else ''}{arrow}"


def pareto_pairs_png(view: StudyView, directions: list[str], path: Path) -> Path | None:
    """The first objective against each other one; Pareto trials red and numbered, other feasible
    trials blue, infeasible (degenerate) trials grey crosses. When infeasible trials stretch the
    axes (a degenerate model has F_MEO 0 and AUC near 0.5), a second row zooms on the feasible ones."""
    metrics = view.metric_names
    if len(metrics) < 2 or not view.complete:
        return None
    pairs = [(metrics[0], m) for m in metrics[1:]]
    groups = {kind: [t for t in view.complete if view.kind(t) == kind] for kind in ("infeasible", "feasible", "pareto")}
    feasible = groups["feasible"] + groups["pareto"]
    zoom = bool(groups["infeasible"]) and len(feasible) >= 2
    figure, axes = _figure(5.2 * len(pairs), 4.4 * (2 if zoom else 1), 2 if zoom else 1, len(pairs))
    for row in range(2 if zoom else 1):
        for ax, (mx, my) in zip(axes[row], pairs):
            ix, iy = metrics.index(mx), metrics.index(my)
            _pareto_axes(ax, groups, (ix, mx), (iy, my), directions, include_infeasible=row == 0)
            if row == 1:
                ax.set_title("feasible trials only", fontsize=9)
    axes[0][0].legend(loc="best", fontsize=8)
    # (on two lines when one panel is all the width there is: one line was cut off)
    gap = "\n" if len(pairs) == 1 else " "
    figure.suptitle(f"Study {view.study.study_name}: {len(view.complete)} complete trials ({len(groups['infeasible'])} infeasible),"
                    f"{gap}{len(groups['pareto'])} on the feasible Pareto front", fontsize=11 if len(pairs) == 1 else None)
    return _save(figure, path)


def _pareto_axes(ax, groups, x, y, directions, *, include_infeasible: bool) -> None:
    (ix, mx), (iy, my) = x, y
    for kind, style in (("infeasible", dict(c=INFEASIBLE, marker="x", s=30, label="infeasible (degenerate)")),
                        ("feasible", dict(c=FEASIBLE, marker="o", s=28, alpha=0.8, label="feasible")),
                        ("pareto", dict(c=PARETO, marker="o", s=55, edgecolors="black", linewidths=0.6, label="Pareto front", zorder=3))):
        trials = groups[kind]
        if trials and (include_infeasible or kind != "infeasible"):
            ax.scatter([t.values[ix] * _scale(mx) for t in trials], [t.values[iy] * _scale(my) for t in trials], **style)
    labels: dict[tuple[float, float], list[str]] = {}  # trials on the same spot share one label
    for t in groups["pareto"]:
        labels.setdefault((round(t.values[ix] * _scale(mx), 6), round(t.values[iy] * _scale(my), 6)), []).append(str(t.number))
    for (px, py), numbers in labels.items():
        ax.annotate(",".join(numbers), (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(_axis_label(mx, directions[ix]))
    ax.set_ylabel(_axis_label(my, directions[iy]))
    ax.grid(alpha=0.3)


def hypervolume_png(view: StudyView, path: Path) -> Path | None:
    numbers, values = hypervolume_history(view)
    if not numbers:
        return None
    figure, axes = _figure(6.4, 3.6)
    ax = axes[0][0]
    ax.step(numbers, values, where="post", color=PARETO)
    ax.plot(numbers, values, "o", color=PARETO, markersize=3)
    point = ", ".join(f"{label(m)} {v:g}" for m, v in zip(view.metric_names, reference_point(view.metric_names)))
    ax.set_title(f"Hypervolume of the feasible front (reference {point})", fontsize=10)
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume")
    ax.grid(alpha=0.3)
    return _save(figure, path)


def param_importances(study: optuna.Study, metric_names: list[str]) -> dict[str, dict[str, float] | str]:
    """metric -> {param: importance}, or the reason it could not be computed. Feasible trials only:
    degenerate trials (F_MEO 0 because every prediction is one class) would make importance a
    question of what causes degeneration."""
    feasible = [t for t in study.get_trials(deepcopy=False) if is_feasible(t)]
    result: dict[str, dict[str, float] | str] = {}
    if len(feasible) < 2:
        return {m: f"needs at least 2 feasible complete trials, the study has {len(feasible)}" for m in metric_names}
    quiet = logging.getLogger("optuna.storages._in_memory")  # no "A new study created in memory" line
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        copy = optuna.create_study(directions=study.directions)
    finally:
        quiet.setLevel(level)
    copy.add_trials(feasible)
    for i, (metric, direction) in enumerate(zip(metric_names, study.directions)):
        # The default evaluator (PED-ANOVA) asks what makes the target *low*: negate maximised metrics.
        sign = -1.0 if direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result[metric] = optuna.importance.get_param_importances(copy, target=lambda t, i=i, s=sign: s * t.values[i])
        except Exception as err:  # noqa: BLE001 - few or identical trials make the evaluators raise
            result[metric] = f"{type(err).__name__}: {err}"
    return result


def importances_png(importances: dict[str, dict[str, float] | str], path: Path) -> Path | None:
    computed = {m: v for m, v in importances.items() if isinstance(v, dict) and v}
    if not computed:
        return None
    figure, axes = _figure(4.0 * len(computed), 3.2, 1, len(computed))
    for ax, (metric, values) in zip(axes[0], computed.items()):
        names = list(values)[::-1]
        ax.barh(names, [values[n] for n in names], color=FEASIBLE)
        ax.set_title(f"importance for val {label(metric)}", fontsize=10)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3, axis="x")
    return _save(figure, path)


def blur_lambda_png(view: StudyView, path: Path) -> Path | None:
    """lambda_fair x sinkhorn_blur (log axes), coloured by val F_MEO and by the fair-term share."""
    trials = [t for t in view.complete if {"lambda_fair", "sinkhorn_blur"} <= t.params.keys()]
    if not trials:
        return None
    feasible = [t for t in trials if is_feasible(t)]
    infeasible = [t for t in trials if not is_feasible(t)]
    figure, axes = _figure(11.5, 4.4, 1, 2)
    for ax, key, title, cmap in ((axes[0][0], "val_f_meo", "val F_MEO %", "viridis_r"), (axes[0][1], "fair_share", "fair-term share of the loss %", "magma")):
        if infeasible:
            ax.scatter([t.params["sinkhorn_blur"] for t in infeasible], [t.params["lambda_fair"] for t in infeasible],
                       c=INFEASIBLE, marker="x", s=30, label="infeasible (degenerate)")
        values = np.array([100 * t.user_attrs.get(key, math.nan) for t in feasible], dtype=float)
        if feasible:
            points = ax.scatter([t.params["sinkhorn_blur"] for t in feasible], [t.params["lambda_fair"] for t in feasible], c=values, cmap=cmap,
                                s=[70 if t.number in view.pareto else 40 for t in feasible],
                                edgecolors=["black" if t.number in view.pareto else "none" for t in feasible], linewidths=1.0)
            figure.colorbar(points, ax=ax, label=title)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sinkhorn_blur")
        ax.set_ylabel("lambda_fair")
        ax.set_title(f"coloured by {title} (black edge: Pareto)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if infeasible:
            ax.legend(loc="best", fontsize=8)
    figure.suptitle("lambda_fair x sinkhorn_blur: the coupling of the reference report (blur up 10x shrank the fair loss ~8x)", fontsize=10)
    return _save(figure, path)


def trial_curves_png(trial: FrozenTrial, path: Path) -> Path:
    """One trial's per-epoch curves: AUC; F_MEO and F_FPR; gate mean with its min-max band; loss
    and fair-term share. Degenerate epochs are shaded, the best epoch is a dashed line."""
    from matplotlib.ticker import MaxNLocator

    curve = trial.user_attrs.get("curve") or []
    epochs = np.array([r["epoch"] for r in curve])
    get = lambda key, scale=1.0: np.array([scale * r.get(key, math.nan) for r in curve], dtype=float)  # noqa: E731
    # A fixed layout: constrained layout would double the cost of this per-trial (callback) figure.
    figure, axes = _figure(9.0, 5.6, 2, 2, layout=None, dpi=90)
    figure.subplots_adjust(left=0.08, right=0.92, bottom=0.09, top=0.92, wspace=0.32, hspace=0.35)
    (a, b), (c, d) = axes
    a.plot(epochs, get("val_auc"), "o-", color="#1f77b4")
    a.set_ylabel("val AUC")
    b.plot(epochs, get("val_f_meo", 100), "o-", color="#d62728", label="F_MEO")
    b.plot(epochs, get("val_f_fpr", 100), "s-", color="#ff7f0e", label="F_FPR")
    b.set_ylabel("val fairness gap %")
    b.legend(fontsize=8)
    c.fill_between(epochs, get("gate_min"), get("gate_max"), color="#2ca02c", alpha=0.2, label="min-max")
    c.plot(epochs, get("gate_mean"), "o-", color="#2ca02c", label="mean")
    c.set_ylabel("gate (Stage 1 weight)")
    c.set_ylim(0, 1)
    c.legend(fontsize=8)
    d.plot(epochs, get("train_loss"), "o-", color="#555555", label="train loss")
    d.set_ylabel("train loss")
    twin = d.twinx()
    twin.plot(epochs, get("fair_share", 100), "^--", color="#9467bd", label="fair share %")
    twin.set_ylabel("fair-term share %", color="#9467bd")
    best = trial.user_attrs.get("best_epoch")
    for ax in (a, b, c, d):
        for r in curve:
            if r.get("degenerate"):
                ax.axvspan(r["epoch"] - 0.5, r["epoch"] + 0.5, color="#999999", alpha=0.15, linewidth=0)
        if best is not None:
            ax.axvline(best, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    stop = f", stopped: {trial.user_attrs['stop_reason'][:60]}" if trial.user_attrs.get("stop_reason") else ""
    figure.suptitle(f"trial {trial.number} (best epoch {best}; grey: degenerate epochs{stop})", fontsize=10)
    return _save(figure, path)
