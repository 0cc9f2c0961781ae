"""What the dashboard and the report draw, computed once from a study: trial classes (Pareto,
feasible, infeasible), the hypervolume history, the per-epoch curves; and the plotly figures the
dashboard shows beside its own plots (``optuna_dashboard.save_plotly_graph_object``).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.pareto import is_feasible, pareto_trials

# Hypervolume reference point: a value no useful detector is worse than, per metric. The default
# objectives use AUC 0.5 (chance), F_MEO 1.0 (its maximum), F_FPR 2.0 (F_FPR can exceed 1: it sums
# |FPR_g - FPR| over groups, up to the group count; points beyond 2.0 add no volume).
REFERENCE_POINT = {"auc": 0.5, "acc": 0.5, "eer": 0.5, "ap": 0.0, "f_fpr": 2.0, "f_oae": 1.0, "f_dp": 1.0, "f_meo": 1.0}
LABELS = {"auc": "AUC", "acc": "ACC", "eer": "EER", "ap": "AP", "f_fpr": "F_FPR", "f_oae": "F_OAE", "f_dp": "F_DP", "f_meo": "F_MEO"}
MAX_CURVE_TRIALS = 30  # the epoch-curves figure shows the Pareto trials, then the most recent others


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def reference_point(metric_names: list[str]) -> list[float]:
    return [REFERENCE_POINT[m] for m in metric_names]


@dataclass
class StudyView:
    """The study's trials sorted by number, with the feasible Pareto front marked."""

    study: optuna.Study
    metric_names: list[str]
    trials: list[FrozenTrial]
    pareto: set[int]

    @classmethod
    def of(cls, study: optuna.Study, metric_names: list[str] | None = None) -> "StudyView":
        metric_names = metric_names or list(study.metric_names or [f"objective {i}" for i in range(len(study.directions))])
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        pareto = {t.number for t in pareto_trials(study)} if len(study.directions) > 1 else set()
        if len(study.directions) == 1:
            feasible = [t for t in trials if is_feasible(t)]
            if feasible:
                pareto = {study.best_trial.number}
        return cls(study, metric_names, trials, pareto)

    @property
    def complete(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state == TrialState.COMPLETE]

    @property
    def front(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.number in self.pareto]

    def kind(self, trial: FrozenTrial) -> str:
        if trial.number in self.pareto:
            return "pareto"
        return "feasible" if is_feasible(trial) else "infeasible"


def hypervolume_history(view: StudyView) -> tuple[list[int], list[float]]:
    """(trial numbers, hypervolume of the feasible front after each COMPLETE trial)."""
    if len(view.study.directions) < 2 or not view.complete:
        return [], []
    point = reference_point(view.metric_names)
    # Optuna logs "Your study does not have any feasible trials" when no trial improves on the
    # reference point (every AUC below 0.5), which beside a report's feasible front misleads; an
    # empty history is the answer, and the report says what the front holds.
    quiet = logging.getLogger("optuna.visualization")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning
            figure = optuna.visualization.plot_hypervolume_history(view.study, point)
    finally:
        quiet.setLevel(level)
    trace = figure.data[0]
    return [int(x) for x in trace.x], [float(y) for y in trace.y]


def curve_trials(view: StudyView, limit: int = MAX_CURVE_TRIALS) -> list[FrozenTrial]:
    with_curve = [t for t in view.trials if t.user_attrs.get("curve")]
    front = [t for t in with_curve if t.number in view.pareto]
    others = [t for t in with_curve if t.number not in view.pareto][::-1]
    return sorted(front + others[: max(0, limit - len(front))], key=lambda t: t.number)


def _r(value, digits: int = 4):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else round(float(value), digits)


def hypervolume_figure(view: StudyView):
    import plotly.graph_objects as go

    numbers, values = hypervolume_history(view)
    point = ", ".join(f"{label(m)} {v:g}" for m, v in zip(view.metric_names, reference_point(view.metric_names)))
    figure = go.Figure(go.Scatter(x=numbers, y=[_r(v, 6) for v in values], mode="lines+markers", name="hypervolume"))
    figure.update_layout(title="Hypervolume of the feasible front", xaxis_title=f"trial (reference point: {point})",
                         yaxis_title="hypervolume", margin=dict(l=60, r=20, t=60, b=50))
    return figure


def epoch_curves_figure(view: StudyView):
    """Per-epoch validation AUC, F_MEO, F_FPR or gate (buttons) of each trial, one legend entry per
    trial (click to show or hide it; Pareto trials are shown, the others start hidden). One panel,
    because optuna-dashboard draws custom figures in a half-width card of fixed height."""
    import plotly.graph_objects as go

    panels = {"auc": "val AUC", "f_meo": "val F_MEO", "f_fpr": "val F_FPR", "gate": "gate mean (band: min-max)"}
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
    figure, owner = go.Figure(), []  # owner[i]: the panel trace i belongs to
    trials = curve_trials(view)
    longest = max((len(t.user_attrs["curve"]) for t in trials), default=1)
    for i, trial in enumerate(trials):
        curve = trial.user_attrs["curve"]
        epochs = [r["epoch"] for r in curve]
        colour = palette[i % len(palette)]
        shown = True if trial.number in view.pareto else "legendonly"
        name = f"trial {trial.number}" + (" (Pareto)" if trial.number in view.pareto else "")
        for panel in panels:
            key = "gate_mean" if panel == "gate" else f"val_{panel}"
            if panel == "gate":
                figure.add_trace(go.Scatter(
                    x=epochs + epochs[::-1], y=[_r(r.get("gate_max")) for r in curve] + [_r(r.get("gate_min")) for r in curve][::-1],
                    fill="toself", fillcolor=colour, opacity=0.15, line=dict(width=0), hoverinfo="skip", legendgroup=name,
                    showlegend=False, visible=False))
                owner.append(panel)
            figure.add_trace(go.Scatter(
                x=epochs, y=[_r(r.get(key)) for r in curve], mode="lines+markers", name=name, legendgroup=name,
                showlegend=panel == "auc", visible=shown if panel == "auc" else False, line=dict(color=colour), marker=dict(size=5),
                hovertemplate=f"trial {trial.number}<br>epoch %{{x}}<br>%{{y:.4f}}<extra></extra>"))
            owner.append(panel)
    pareto_of = [trace.legendgroup.endswith("(Pareto)") for trace in figure.data]
    buttons = [dict(label=label(panel) if panel != "gate" else "gate", method="update", args=[
        {"visible": [(True if pareto else "legendonly") if own == panel else False for own, pareto in zip(owner, pareto_of)],
         "showlegend": [own == panel and not trace.fill for own, trace in zip(owner, figure.data)]},
        {"yaxis.title.text": title}]) for panel, title in panels.items()]
    figure.update_xaxes(dtick=max(1, math.ceil(longest / 10)))
    figure.update_layout(title="Per-epoch curves (legend: show/hide a trial)", xaxis_title="epoch", yaxis_title=panels["auc"],
                         updatemenus=[dict(type="buttons", direction="right", buttons=buttons, x=0, xanchor="left", y=1.13, yanchor="top")],
                         margin=dict(l=60, r=20, t=90, b=50))
    return figure


def blur_lambda_figure(view: StudyView, colour_metric: str = "f_meo"):
    """lambda_fair x sinkhorn_blur (log axes) coloured by a validation metric: the coupling the
    reference report found (blur 1e-4 -> 1e-3 cancelled a 10x raise of lambda_fair)."""
    import plotly.graph_objects as go

    points = [t for t in view.complete if {"lambda_fair", "sinkhorn_blur"} <= t.params.keys()]
    feasible = [t for t in points if is_feasible(t)]
    infeasible = [t for t in points if not is_feasible(t)]
    figure = go.Figure()
    figure.add_trace(go.Scatter(
        x=[t.params["sinkhorn_blur"] for t in infeasible], y=[t.params["lambda_fair"] for t in infeasible], mode="markers",
        name="infeasible (degenerate)", marker=dict(color="#bbbbbb", symbol="x", size=8),
        text=[f"trial {t.number}" for t in infeasible], hovertemplate="%{text}<extra>infeasible</extra>",
    ))
    figure.add_trace(go.Scatter(
        x=[t.params["sinkhorn_blur"] for t in feasible], y=[t.params["lambda_fair"] for t in feasible], mode="markers",
        name="feasible", marker=dict(
            color=[_r(t.user_attrs.get(f"val_{colour_metric}")) for t in feasible], colorscale="Viridis_r", size=11,
            colorbar=dict(title=f"val {label(colour_metric)}"), line=dict(width=[2 if t.number in view.pareto else 0 for t in feasible], color="black"),
        ),
        text=[f"trial {t.number}" + (" (Pareto)" if t.number in view.pareto else "") for t in feasible],
        hovertemplate="%{text}<br>blur %{x:.2e}<br>lambda %{y:.3g}<br>" + label(colour_metric) + " %{marker.color:.4f}<extra></extra>",
    ))
    figure.update_xaxes(type="log", title_text="sinkhorn_blur (black ring: Pareto trial)")
    figure.update_yaxes(type="log", title_text="lambda_fair")
    figure.update_layout(title=f"lambda_fair x sinkhorn_blur: val {label(colour_metric)}",
                         legend=dict(orientation="h", y=-0.2), margin=dict(l=60, r=20, t=60, b=50))
    return figure
