"""Markdown for one trial (its dashboard note) and the number formats the report shares with it.

Fairness gaps are shown in % as in the reference report (F_FPR can exceed 100 %: it sums over groups).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from optuna.trial import FrozenTrial, TrialState

import objectives
from search._figures import label
from search.config import StudyConfig
from search.study_args import UNKNOWN

DETECTION = ("auc", "acc", "eer", "ap")
FAIRNESS = ("f_fpr", "f_oae", "f_dp", "f_meo")
ARROWS = {"maximize": "↑", "minimize": "↓"}
STALE = ("evaluated with a different frozen Stage 1 adapter than the trial trained with: the data, backbone or Stage 1 "
         "settings changed since it ran, so these numbers are not comparable with its validation metrics.")


def end_reason(trial: FrozenTrial) -> str:
    """Why a trial ended as it did: a FAIL's own reason first (a trial that trained, stopped early
    and then failed to upload keeps its stop_reason too, which is not why it failed)."""
    attrs = trial.user_attrs
    if trial.state == TrialState.FAIL:
        return str(attrs.get("fail_reason") or attrs.get("stop_reason") or "")
    return str(attrs.get("stop_reason") or attrs.get("fail_reason") or "")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt_metric(metric: str, value) -> str:
    """Detection metrics as 0.xxxx, fairness gaps in %."""
    if not is_number(value):
        return "–"
    return f"{100 * value:.2f}%" if metric in FAIRNESS else f"{value:.4f}"


def fmt_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if (value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4)) else f"{value:.4g}"
    return str(value)


def ranges(numbers: Iterable[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    numbers = sorted(numbers)
    if not numbers:
        return "none"
    parts, start, prev = [], numbers[0], numbers[0]
    for n in numbers[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


def degenerate_epochs(trial: FrozenTrial) -> list[int]:
    return [r["epoch"] for r in trial.user_attrs.get("curve") or [] if r.get("degenerate")]


def gate_range(trial: FrozenTrial, over: str = "") -> str:
    """The gate's range at the best epoch; ``over="_run"``: over every epoch of the run."""
    low, high = trial.user_attrs.get(f"gate_min{over}"), trial.user_attrs.get(f"gate_max{over}")
    return f"{low:.2f}-{high:.2f}" if is_number(low) and is_number(high) else "–"


def md_table(header: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table (first column left-aligned, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    clean = lambda cell: str(cell).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(clean(h) for h in header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def status_line(trial: FrozenTrial) -> str:
    attrs = trial.user_attrs
    if trial.state == TrialState.FAIL:
        return f"**Failed**: {attrs.get('fail_reason', 'no reason recorded')}"
    if attrs.get("stop_reason"):
        kind = "infeasible, " if attrs.get("degenerate") else ""
        return f"**Stopped** ({kind}after epoch {attrs.get('stopped_epoch', '?')}): {attrs['stop_reason']}"
    if trial.state == TrialState.PRUNED:
        return "**Pruned**"
    return f"Ran all {attrs.get('epochs_run', '?')} epochs."


def test_table(test: dict, metrics: Sequence[str] = objectives.METRIC_NAMES) -> str:
    """Rows: each test set and the mean; with the tuned-threshold rows when present."""
    datasets = [*test.get("datasets", []), "mean"]
    rows = []
    for prefix, tag in (("test_", f"@{test.get('threshold', 0.5):g}"), ("tuned_test_", f"@{test.get('tuned_threshold', float('nan')):.3f} (tuned)")):
        for name in datasets:
            if f"{prefix}{name}_auc" in test:
                rows.append([f"{name} {tag}", *(fmt_metric(m, test.get(f"{prefix}{name}_{m}")) for m in metrics)])
    return md_table(["test set", *(label(m) for m in metrics)], rows)


def trial_note(trial: FrozenTrial, config: StudyConfig, *, test: dict | None = None, curves_url: str | None = None,
               study_args: str = UNKNOWN) -> str:
    attrs = trial.user_attrs
    out = [f"## Trial {trial.number} · {trial.state.name}" + (f" · reference config {attrs['reference_config']}" if attrs.get("reference_config") else "")]
    if trial.state == TrialState.COMPLETE and trial.values:
        objs = " · ".join(f"{label(m)} {ARROWS.get(d, '')} **{fmt_metric(m, v)}**" for m, d, v in zip(config.metric_names, config.directions, trial.values))
        feasible = " — *infeasible (degenerate): left out of the Pareto front*" if attrs.get("degenerate") else ""
        out.append(f"Objectives (validation, best epoch {attrs.get('best_epoch', '?')} of {attrs.get('epochs_run', '?')}): {objs}{feasible}")
    out.append(status_line(trial))
    if attrs.get("best_epoch") is not None:
        out.append("### Validation metrics at the best epoch")
        out.append(md_table([label(m) for m in objectives.METRIC_NAMES], [[fmt_metric(m, attrs.get(f"val_{m}")) for m in objectives.METRIC_NAMES]],
                            align="r" * len(objectives.METRIC_NAMES)))
        gate_mean = attrs.get("gate_mean")
        warn = " — **saturated**: cross-attention contributes under 5 %" if is_number(gate_mean) and gate_mean >= 0.95 else ""
        share = attrs.get("fair_share")
        out.append("  \n".join([
            f"**Gate** (weight of the Stage 1 feature; 1 - gate is the cross-attention share): {gate_range(trial)}, "
            f"mean {fmt_value(gate_mean)} at the best epoch{warn}; {gate_range(trial, '_run')} over the run.",
            f"**Fair-term share** of the loss at the best epoch: {f'{100 * share:.2f} %' if is_number(share) else '–'}.",
            f"**Degenerate epochs** (every val prediction one class): {ranges(degenerate_epochs(trial))}.",
            *(f"**Validation groups without {kind} samples**, left out of the {rate} terms of F_FPR / F_MEO: {', '.join(names)}."
              for kind, rate, names in (("real", "FPR", attrs.get("val_groups_without_real")), ("fake", "TPR", attrs.get("val_groups_without_fake")))
              if names),
        ]))
    if test:
        out.append("### Test sets (from `run_study.py evaluate`)")
        if test.get("stage1_matches") is False:
            out.append(f"**Warning:** {STALE}")
        out.append(test_table(test))
    if trial.params:
        out.append("### Hyperparameters")
        out.append(md_table(["sampled", *trial.params], [["value", *(fmt_value(v) for v in trial.params.values())]]))
        fixed = {k: v for k, v in (attrs.get("training") or {}).items() if k not in trial.params}
        if fixed:
            out.append("Fixed: " + ", ".join(f"{k} {fmt_value(v)}" for k, v in fixed.items()) + ".")
    curve = attrs.get("curve") or []
    if curve:
        out.append("### Per-epoch curve")
        if curves_url:
            out.append(f"![per-epoch curves of trial {trial.number}]({curves_url})")
        rows = [[r["epoch"], fmt_value(r.get("lr")), f"{r.get('train_loss', float('nan')):.4f}", f"{100 * r.get('fair_share', float('nan')):.2f}",
                 *(fmt_metric(m, r.get(f"val_{m}")) for m in ("auc", "f_meo", "f_fpr")),
                 f"{r.get('gate_mean', float('nan')):.2f} [{r.get('gate_min', float('nan')):.2f}, {r.get('gate_max', float('nan')):.2f}]",
                 "yes" if r.get("degenerate") else ""] for r in curve]
        out.append(md_table(["epoch", "lr", "loss", "fair %", "AUC", "F_MEO", "F_FPR", "gate mean [min, max]", "degenerate"], rows))
    out.append(f"Seed {attrs.get('seed', '?')} · code {attrs.get('code_version', 'unknown')} · export: "
               f"`python run_study.py export {study_args} --pick trial:{trial.number} --out trial-{trial.number}.yaml`")
    return "\n\n".join(part for part in out if part)
