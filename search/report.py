"""The study report: the reference report's tables and the trade-off plots, made from the study.

    python run_study.py report --study studies/demo.yaml --out report/

Writes into ``out``: ``report.md`` (markdown tables), ``report.html`` (self-contained: the same
tables, the PNGs embedded), the PNGs (``pareto_front.png``, ``hypervolume.png``,
``importances.png``, ``blur_lambda.png``) and ``pareto_trials.csv`` / ``trials.csv``.

Tables, one row per feasible Pareto trial (``search.pareto.pareto_trials``), as in the reference report:
validation detection metrics, fairness gaps in %, hyperparameters, gate range / fair-term share /
degenerate epochs, and, once ``run_study.py evaluate`` ran, test AUC per dataset with the mean
and test fairness per dataset (at the trial's threshold and at the tuned one).
"""

from __future__ import annotations

import base64
import datetime
import html
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

import objectives
from model.runtime import make_folder
from model.staging import staging_folder
from search import _report_plots as plots
from search._figures import StudyView, hypervolume_history, label
from search._notes import DETECTION, FAIRNESS, STALE, degenerate_epochs, end_reason, fmt_metric, fmt_value, gate_range, is_number, md_table, ranges
from search.config import StudyConfig
from search.credentials import mask_url
from search.evaluate import load_test_results, threshold_dependent
from search.study_args import UNKNOWN, study_args

log = logging.getLogger(__name__)


@dataclass
class Section:
    title: str
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    image: Path | None = None
    level: int = 2


@dataclass
class Report:
    markdown: Path
    html: Path
    images: dict[str, Path]
    tables: dict[str, Path]
    pareto_numbers: list[int]


def _row_head(trial: FrozenTrial) -> str:
    ref = trial.user_attrs.get("reference_config")
    return f"{trial.number}" + (f" ({ref})" if ref else "")


def _final(trial: FrozenTrial, key: str) -> str:
    curve = trial.user_attrs.get("curve") or []
    return f"{curve[-1][key]:.4f}" if curve and is_number(curve[-1].get(key)) else "–"


def _minutes(trial: FrozenTrial) -> str:
    seconds = sum(r.get("seconds", 0.0) for r in trial.user_attrs.get("curve") or [])
    return f"{seconds / 60:.1f} min" if seconds else "–"


def _pareto_sections(view: StudyView, config: StudyConfig) -> list[Section]:
    front = view.front
    if not front:
        return [Section("Pareto trials", "No feasible complete trial yet: nothing on the Pareto front.")]
    objective_cols = [f"{label(m)} {'↑' if d == 'maximize' else '↓'}" for m, d in zip(config.metric_names, config.directions)]
    main = Section(
        "Pareto trials",
        f"{len(front)} trials on the feasible Pareto front of {', '.join(objective_cols)} (validation, best epoch; fairness gaps in %). "
        "Every validation metric, the best epoch, gate range, fair-term share and degenerate epochs.",
        ["trial", *(label(m) for m in objectives.METRIC_NAMES), "best epoch", "epochs", "gate range", "fair share %", "degenerate epochs"],
        [[_row_head(t), *(fmt_metric(m, t.user_attrs.get(f"val_{m}")) for m in objectives.METRIC_NAMES),
          t.user_attrs.get("best_epoch", "–"), t.user_attrs.get("epochs_run", "–"), gate_range(t),
          f"{100 * t.user_attrs['fair_share']:.2f}" if is_number(t.user_attrs.get("fair_share")) else "–",
          ranges(degenerate_epochs(t))] for t in front],
    )
    detection = Section("Detection metrics (validation, best epoch)", "", ["trial", "best val AUC (epoch)", "ACC", "EER", "AP",
                                                                           "train loss (final)", "degenerate phase", "training time"],
                        [[_row_head(t), f"{fmt_metric('auc', t.user_attrs.get('val_auc'))} (ep {t.user_attrs.get('best_epoch', '?')})",
                          *(fmt_metric(m, t.user_attrs.get(f"val_{m}")) for m in DETECTION[1:]), _final(t, "train_loss"),
                          ranges(degenerate_epochs(t)), _minutes(t)] for t in front], level=3)
    fairness = Section("Fairness metrics (validation, best epoch, %; lower is fairer)", "", ["trial", *(label(m) for m in FAIRNESS)],
                       [[_row_head(t), *(fmt_metric(m, t.user_attrs.get(f"val_{m}")) for m in FAIRNESS)] for t in front], level=3)
    params = list(config.search_space)
    hyper = Section("Hyperparameters", "Sampled values; the fixed training values are in each trial's note and export.", ["trial", *params],
                    [[_row_head(t), *(fmt_value(t.params.get(p)) for p in params)] for t in front], level=3)
    gate = Section("Gate and fair term",
                   "Gate = weight of the Stage 1 feature (the reference run saturated at 0.96-0.99 with gate_init_bias 1.0); "
                   "fair-term share = lambda_fair * fair loss / total loss at the best epoch.",
                   ["trial", "gate_init_bias", "gate range", "gate mean", "cross-attn share", "lambda_fair", "sinkhorn_blur", "fair share %"],
                   [[_row_head(t), fmt_value(t.params.get("gate_init_bias", (t.user_attrs.get("training") or {}).get("gate_init_bias"))),
                     gate_range(t), fmt_value(t.user_attrs.get("gate_mean")),
                     f"{100 * (1 - t.user_attrs['gate_mean']):.0f}%" if is_number(t.user_attrs.get("gate_mean")) else "–",
                     *(fmt_value(t.params.get(p, (t.user_attrs.get("training") or {}).get(p))) for p in ("lambda_fair", "sinkhorn_blur")),
                     f"{100 * t.user_attrs['fair_share']:.2f}" if is_number(t.user_attrs.get("fair_share")) else "–"] for t in front], level=3)
    return [main, detection, fairness, hyper, gate]


def _test_sections(view: StudyView, results: dict[int, dict], args: str = UNKNOWN) -> list[Section]:
    if not results:
        return [Section("Test sets", f"Not evaluated yet: `python run_study.py evaluate {args} --trials pareto`.")]
    numbers = [n for n in sorted(results)]
    datasets = sorted({d for r in results.values() for d in r.get("datasets", [])})
    kinds = {t.number: view.kind(t) for t in view.trials}
    tags = {"pareto": " (Pareto)", "infeasible": " (degenerate)"}
    head = lambda n: f"{n}{tags.get(kinds.get(n), '')}"  # noqa: E731
    stale = [n for n in numbers if results[n].get("stage1_matches") is False]
    warning = f" **Warning: trials {', '.join(map(str, stale))} were {STALE}**" if stale else ""
    if degenerate := [n for n in numbers if kinds.get(n) == "infeasible"]:
        warning += (f" Trials {', '.join(map(str, degenerate))} are degenerate on validation (every prediction one class): "
                    "their test fairness gaps are ~0 by construction, not fairness.")
    auc = Section("Test sets: AUC per dataset (best checkpoint)", "Cross-dataset generalisation, as the reference report's table 3.2." + warning,
                  ["trial", *datasets, "mean"], [[head(n), *(fmt_metric("auc", results[n].get(f"test_{d}_auc")) for d in [*datasets, "mean"])] for n in numbers])
    sections = [auc]
    for d in datasets:
        sections.append(Section(f"Test fairness on {d} (%)", "", ["trial", *(label(m) for m in FAIRNESS), "ACC", "EER", "AP"],
                                [[head(n), *(fmt_metric(m, results[n].get(f"test_{d}_{m}")) for m in (*FAIRNESS, "acc", "eer", "ap"))] for n in numbers], level=3))
    if any("tuned_threshold" in r for r in results.values()):
        moved = threshold_dependent(view.metric_names)
        sections.append(Section(
            "Threshold tuned on validation", "Threshold maximising validation balanced accuracy, beside the trial's own threshold "
            "(AUC, EER and AP do not depend on it). Mean over the test sets.",
            ["trial", "trial threshold", "val ACC", *(f"test {label(m)}" for m in moved), "tuned threshold", "val ACC (tuned)",
             *(f"test {label(m)} (tuned)" for m in moved)],
            [[head(n), fmt_value(r.get("threshold")), fmt_metric("acc", _val(view, n, "acc")),
              *(fmt_metric(m, r.get(f"test_mean_{m}")) for m in moved), fmt_value(r.get("tuned_threshold")),
              fmt_metric("acc", r.get("tuned_val_acc")), *(fmt_metric(m, r.get(f"tuned_test_mean_{m}")) for m in moved)]
             for n, r in ((n, results[n]) for n in numbers)], level=3))
    return sections


def _val(view: StudyView, number: int, metric: str):
    trial = next((t for t in view.trials if t.number == number), None)
    return None if trial is None else trial.user_attrs.get(f"val_{metric}")


def _all_trials_section(view: StudyView, config: StudyConfig) -> Section:
    rows = []
    for t in view.trials:
        values = [fmt_metric(m, v) for m, v in zip(config.metric_names, t.values)] if t.values else ["–"] * len(config.metric_names)
        reason = end_reason(t)
        rows.append([_row_head(t), t.state.name, view.kind(t) if t.state == TrialState.COMPLETE else "", *values,
                     t.user_attrs.get("epochs_run", "–"), reason[:80]])
    return Section("All trials", "", ["trial", "state", "kind", *(label(m) for m in config.metric_names), "epochs", "stopped / failed because"], rows)


def _summary(view: StudyView, config: StudyConfig) -> str:
    states = [t.state.name.lower() for t in view.trials]
    counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))) or "no trials"
    infeasible = sum(1 for t in view.complete if view.kind(t) == "infeasible")
    objs = ", ".join(f"val {label(m)} ({d})" for m, d in zip(config.metric_names, config.directions))
    numbers, values = hypervolume_history(view)
    hv = f" Hypervolume of the front: {values[-1]:.4g} after trial {numbers[-1]}." if values else ""
    return (f"Study **{config.name}** in `{mask_url(config.storage_url)}`: {counts} ({infeasible} infeasible: stopped as degenerate). "
            f"Objectives: {objs}. Sampler: {config.sampler.name}. Feasible Pareto front: {len(view.pareto)} trials.{hv}  \n"
            f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `run_study.py report`.")


def _importance_section(importances: dict, image: Path | None) -> Section:
    computed = {m: v for m, v in importances.items() if isinstance(v, dict)}
    failed = {m: v for m, v in importances.items() if isinstance(v, str)}
    text = "Parameter importances per objective (optuna.importance, feasible trials only)."
    if failed:
        text += " Not computed: " + "; ".join(f"{label(m)}: {why}" for m, why in failed.items()) + "."
    params = sorted({p for v in computed.values() for p in v})
    rows = [[p, *(f"{computed[m].get(p, 0.0):.3f}" for m in computed)] for p in params]
    return Section("Parameter importances", text, ["parameter", *(label(m) for m in computed)] if computed else [], rows, image)


def build_sections(study: optuna.Study, config: StudyConfig, out: Path) -> tuple[list[Section], dict[str, Path], StudyView]:
    view = StudyView.of(study, config.metric_names)
    images: dict[str, Path] = {}

    def draw(name: str, make) -> Path | None:
        try:
            path = make(out / f"{name}.png")
        except Exception:  # noqa: BLE001 - one failed plot must not cost the whole report
            log.warning("report plot %s failed", name, exc_info=True)
            return None
        if path is not None:
            images[name] = path
        return path

    front_png = draw("pareto_front", lambda p: plots.pareto_pairs_png(view, config.directions, p))
    hv_png = draw("hypervolume", lambda p: plots.hypervolume_png(view, p))
    importances = plots.param_importances(study, config.metric_names)
    imp_png = draw("importances", lambda p: plots.importances_png(importances, p))
    blur_png = draw("blur_lambda", lambda p: plots.blur_lambda_png(view, p))
    sections = [Section(f"Trade-off report: study {config.name}", _summary(view, config), level=1),
                Section("Pareto front", "Validation objectives of every complete trial; red: feasible Pareto front (numbered), "
                        "blue: other feasible trials, grey crosses: infeasible (stopped as degenerate).", image=front_png)]
    sections += _pareto_sections(view, config)
    sections += _test_sections(view, load_test_results(study), study_args(study))
    sections.append(Section("Hypervolume over trials", "", image=hv_png))
    sections.append(_importance_section(importances, imp_png))
    if blur_png is not None:
        sections.append(Section("lambda_fair x sinkhorn_blur",
                                "The reference report found these two coupled (raising the blur shrank the fair loss and cancelled a 10x raise "
                                "of lambda_fair): the left panel shows what that did to F_MEO, the right panel the fair term's actual share of the loss.",
                                image=blur_png))
    sections.append(_all_trials_section(view, config))
    return sections, images, view


def _to_markdown(sections: list[Section], out: Path) -> str:
    parts = []
    for s in sections:
        parts.append(f"{'#' * s.level} {s.title}")
        if s.text:
            parts.append(s.text)
        if s.image is not None:
            parts.append(f"![{s.title}]({s.image.relative_to(out).as_posix()})")
        if s.header:
            parts.append(md_table(s.header, s.rows))
    return "\n\n".join(parts) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1250px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
code{background:#f5f5f5;padding:0 3px}"""


def _inline(text: str) -> str:
    """The little markdown the section texts use: **bold**, `code`, line breaks."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return text.replace("  \n", "<br>")


def _to_html(sections: list[Section]) -> str:
    body = []
    for s in sections:
        body.append(f"<h{s.level}>{html.escape(s.title)}</h{s.level}>")
        if s.text:
            body.append(f"<p>{_inline(s.text)}</p>")
        if s.image is not None:
            data = base64.b64encode(s.image.read_bytes()).decode()
            body.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{data}">')
        if s.header:
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in s.header)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in s.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    title = html.escape(sections[0].title if sections else "report")
    return f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style></head><body>{"".join(body)}</body></html>\n'


def trials_frame(view: StudyView, results: dict[int, dict]) -> pd.DataFrame:
    rows = []
    for t in view.trials:
        row = {"trial": t.number, "state": t.state.name, "kind": view.kind(t) if t.state == TrialState.COMPLETE else ""}
        row.update({f"val_{m}": t.user_attrs.get(f"val_{m}") for m in objectives.METRIC_NAMES})
        row.update({k: t.user_attrs.get(k) for k in ("best_epoch", "epochs_run", "gate_min", "gate_max", "gate_mean", "fair_share", "stop_reason")})
        row["degenerate_epochs"] = ranges(degenerate_epochs(t))
        row.update(t.params)
        row.update({k: v for k, v in results.get(t.number, {}).items() if k.startswith(("test_", "tuned_"))})
        rows.append(row)
    return pd.DataFrame(rows)


_TITLE = "# Trade-off report: "  # report.md's first line: an earlier report, which a new one replaces
_PLOTS = ("pareto_front", "hypervolume", "importances", "blur_lambda")
_WRITTEN = ("report.md", "report.html", "trials.csv", "pareto_trials.csv", *(f"{name}.png" for name in _PLOTS))


def check_report_target(out: Path) -> None:
    """A report replaces an earlier report's files, never other files of those names (``--out``
    pointed at a folder of one's own notes)."""
    taken = sorted(name for name in _WRITTEN if (out / name).exists())
    if not taken:
        return
    try:
        earlier = (out / "report.md").read_text(errors="replace").startswith(_TITLE)
    except OSError:
        earlier = False
    if not earlier:
        raise ValueError(f"--out: {out} holds {', '.join(taken)}, not from an earlier fairfront report; "
                         "they are left as they are (give another folder)")


def build_report(study: optuna.Study, config: StudyConfig, out: str | Path) -> Report:
    """Write the report into ``out``. It is drawn and written whole in a hidden staging folder
    inside ``out`` first, then moved into place file by file (renames: a full disk or Ctrl-C
    before them leaves the earlier report as it was, plots included), report.md last: it is
    what marks the folder as a fairfront report's."""
    out = Path(out)
    if out.is_dir():
        check_report_target(out)
    make_folder(out, "--out", "the report folder")
    with staging_folder(out / "report", hidden=True, what="a report") as staging:
        sections, drawn, view = build_sections(study, config, staging)
        # (image links relative to the staging folder are the same relative to ``out``)
        (staging / "report.md").write_text(_to_markdown(sections, staging))
        (staging / "report.html").write_text(_to_html(sections))
        frame = trials_frame(view, load_test_results(study))
        frame.to_csv(staging / "trials.csv", index=False)
        (frame[frame["kind"] == "pareto"] if not frame.empty else frame).to_csv(staging / "pareto_trials.csv", index=False)
        for stale in set(_PLOTS) - set(drawn):  # an earlier report's plot this study cannot draw (yet) would pass for this one's
            (out / f"{stale}.png").unlink(missing_ok=True)
        for name in [*(path.name for path in drawn.values()), "trials.csv", "pareto_trials.csv", "report.html", "report.md"]:
            os.replace(staging / name, out / name)
    tables = {"trials": out / "trials.csv", "pareto_trials": out / "pareto_trials.csv"}
    images = {name: out / path.name for name, path in drawn.items()}
    return Report(out / "report.md", out / "report.html", images, tables, sorted(view.pareto))


__all__ = ["Report", "build_report", "trials_frame"]
