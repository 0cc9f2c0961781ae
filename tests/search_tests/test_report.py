"""The report: files, tables that match the study, and the trial classes behind the plots."""

from __future__ import annotations

import logging

import re

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

try:
    from ._tiny_study import tiny_study
except ImportError:  # tests/search_tests is not a package
    from _tiny_study import tiny_study

import objectives
import run_study
from search._figures import StudyView, hypervolume_history
from search._notes import md_table, ranges
from search._report_plots import param_importances
from search.evaluate import evaluate_study
from search.report import build_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_study(tmp_path_factory)


def _table_after(markdown: str, heading: str) -> list[list[str]]:
    """Rows (cells) of the first markdown table after ``heading``."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return table


def test_report_files_and_pareto_table(tiny, tmp_path):
    path, config, study = tiny
    evaluate_study(config, study, [study.best_trials[0]], progress=False)  # so the report has its test tables
    out = tmp_path / "report"
    assert run_study.main(["-q", "report", "--study", str(path), "--out", str(out)]) == 0

    for name in ("pareto_front", "hypervolume", "blur_lambda"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # self-contained: the PNGs are embedded
    assert "http://" not in page and "https://" not in page

    markdown = (out / "report.md").read_text()
    rows = _table_after(markdown, "## Pareto trials")
    assert [int(r[0].split()[0]) for r in rows] == sorted(t.number for t in study.best_trials)
    for row, trial in zip(rows, sorted(study.best_trials, key=lambda t: t.number)):
        assert row[1] == f"{trial.user_attrs['val_auc']:.4f}"
        assert row[8] == f"{100 * trial.user_attrs['val_f_meo']:.2f}%"
    csv = pd.read_csv(out / "pareto_trials.csv")
    assert sorted(csv["trial"]) == sorted(t.number for t in study.best_trials)
    for heading in ("### Detection metrics", "### Fairness metrics", "### Hyperparameters", "### Gate and fair term",
                    "## Test sets: AUC per dataset", "### Threshold tuned on validation"):
        assert heading in markdown, heading
    test_rows = _table_after(markdown, "## Test sets: AUC per dataset")
    assert str(study.best_trials[0].number) in test_rows[0][0]
    assert all(re.fullmatch(r"\d\.\d{4}", cell) for cell in test_rows[0][1:])


def _synthetic_study(*, constraints: bool = True) -> optuna.Study:
    """Five trials, no training: two on the front, one dominated, two infeasible (degenerate)
    of which one would dominate everything if it counted. ``constraints=False``: only the
    ``degenerate`` attribute says so (a study from a sampler that wrote no constraint)."""
    from search.samplers import degenerate_constraint

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_metric_names(["auc", "f_meo", "f_fpr"])
    dists = {"lambda_fair": FloatDistribution(0.01, 1, log=True), "sinkhorn_blur": FloatDistribution(1e-5, 1e-2, log=True)}
    rows = [  # auc, f_meo, f_fpr, degenerate
        (0.80, 0.60, 1.2, False), (0.75, 0.40, 1.0, False), (0.70, 0.70, 1.5, False), (0.90, 0.0, 0.0, True), (0.50, 0.0, 0.0, True),
    ]
    for i, (auc, meo, fpr, degenerate) in enumerate(rows):
        attrs = {"degenerate": degenerate, "val_auc": auc, "val_f_meo": meo, "val_f_fpr": fpr, "fair_share": 0.01 * (i + 1),
                 "best_epoch": 2, "epochs_run": 3, "gate_min": 0.5, "gate_max": 0.7, "gate_mean": 0.6,
                 "curve": [{"epoch": e, "degenerate": degenerate or e == 1} for e in (1, 2, 3)]}
        trial = create_trial(state=TrialState.COMPLETE, values=[auc, meo, fpr], params={"lambda_fair": 0.05 * (i + 1), "sinkhorn_blur": 1e-4 * (i + 1)},
                             distributions=dists, user_attrs=attrs)
        # what the samplers' constraints_func stores for a finished trial
        if constraints:
            trial.system_attrs["constraints"] = list(degenerate_constraint(trial))
        study.add_trial(trial)
    return study


def test_the_report_masks_the_storage_password(tiny, tmp_path, monkeypatch):
    import dataclasses

    from search.report import build_report

    _, config, study = tiny
    with_password = dataclasses.replace(config, storage="postgresql+psycopg://fairfront:s3cretpw@db.internal:5432/fairfront")
    build_report(study, with_password, tmp_path / "report")
    for name in ("report.md", "report.html"):
        text = (tmp_path / "report" / name).read_text()
        assert "s3cretpw" not in text and "fairfront:***@db.internal" in text, name



def test_a_report_folder_that_cannot_be_one_is_named_as_out(tiny, tmp_path, capsys):
    path, _, _ = tiny
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run_study.main(["-q", "report", "--study", str(path), "--out", str(blocker)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out: cannot create the report folder {blocker} (")
    assert blocker.read_text() == "not a folder"


def test_a_report_replaces_an_earlier_report_but_not_other_files_of_its_names(tiny, tmp_path, capsys):
    path, _, _ = tiny
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.md").write_text("my own notes\n")
    (notes / "trials.csv").write_text("mine\n")
    assert run_study.main(["-q", "report", "--study", str(path), "--out", str(notes)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out: {notes} holds report.md, trials.csv, not from an earlier fairfront report")
    assert (notes / "report.md").read_text() == "my own notes\n" and sorted(p.name for p in notes.iterdir()) == ["report.md", "trials.csv"]
    out = tmp_path / "report"
    for _ in range(2):  # the second replaces the first
        assert run_study.main(["-q", "report", "--study", str(path), "--out", str(out)]) == 0
    assert (out / "report.md").read_text().startswith("# Trade-off report: study ")

def test_a_report_cut_short_leaves_the_earlier_report_as_it_was_and_no_partial_file(tiny, tmp_path, monkeypatch):
    """A full disk while writing trials.csv, after this report's plots were drawn (and differ from
    the earlier ones, as a study that moved on draws them): every file is the earlier report's."""
    import errno

    from search import _report_plots

    _, config, study = tiny
    out = tmp_path / "report"
    build_report(study, config, out)
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    real_to_csv = pd.DataFrame.to_csv

    def moved_on(view, path):
        path.write_bytes(b"a newer hypervolume plot")
        return path

    def disk_full(frame, path, **kwargs):
        real_to_csv(frame.head(1), path, **kwargs)  # part of it is on disk when the space runs out
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(_report_plots, "hypervolume_png", moved_on)
    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build_report(study, config, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier  # (no staging folder left either)
    monkeypatch.undo()
    monkeypatch.setattr(_report_plots, "hypervolume_png", moved_on)
    report = build_report(study, config, out)
    assert report.images["hypervolume"] == out / "hypervolume.png" and report.images["hypervolume"].read_bytes() == b"a newer hypervolume plot"
    assert "](hypervolume.png)" in report.markdown.read_text() and sorted(p.name for p in out.iterdir()) == sorted(earlier)


def test_an_earlier_reports_plot_that_this_report_cannot_draw_is_removed(tiny, tmp_path, monkeypatch):
    from search import _report_plots

    _, config, study = tiny
    out = tmp_path / "report"
    assert "blur_lambda" in build_report(study, config, out).images
    monkeypatch.setattr(_report_plots, "blur_lambda_png", lambda view, path: None)  # e.g. lambda_fair fixed in this study
    report = build_report(study, config, out)
    assert "blur_lambda" not in report.images and not (out / "blur_lambda.png").exists()
    assert "blur_lambda.png" not in report.markdown.read_text() and (out / "pareto_front.png").exists()


def test_infeasible_trials_are_greyed_and_off_the_front(tiny, tmp_path):
    _, config, _ = tiny
    study = _synthetic_study()
    view = StudyView.of(study, config.metric_names)
    assert view.pareto == {0, 1} == {t.number for t in study.best_trials}
    assert [view.kind(t) for t in study.trials] == ["pareto", "pareto", "feasible", "infeasible", "infeasible"]
    numbers, values = hypervolume_history(view)
    assert numbers == [0, 1, 2, 3, 4]
    assert values[0] > 0 and values[1] > values[0] and values[1] == values[2] == values[3] == values[4]

    report = build_report(study, config, tmp_path)
    assert report.pareto_numbers == [0, 1]
    assert {"pareto_front", "hypervolume", "blur_lambda"} <= set(report.images)
    markdown = report.markdown.read_text()
    assert [int(r[0]) for r in _table_after(markdown, "## Pareto trials")] == [0, 1]
    assert "Not evaluated yet" in markdown
    kinds = dict(pd.read_csv(report.tables["trials"])[["trial", "kind"]].values)
    assert kinds[3] == kinds[4] == "infeasible"


def test_degenerate_trials_stay_off_the_front_without_the_samplers_constraint(tiny):
    from search import pareto_trials

    _, config, _ = tiny
    study = _synthetic_study(constraints=False)
    assert {t.number for t in study.best_trials} == {3}  # Optuna alone: the one-class trial dominates all
    assert [t.number for t in pareto_trials(study)] == [0, 1]
    view = StudyView.of(study, config.metric_names)
    assert [view.kind(t) for t in study.trials] == ["pareto", "pareto", "feasible", "infeasible", "infeasible"]


def test_a_front_below_the_reference_point_has_an_empty_history_without_optunas_no_feasible_warning(caplog):
    import optuna

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.45, 0.2, 0.3]))  # feasible, AUC below the reference 0.5
    optuna_logger = logging.getLogger("optuna")  # (it does not propagate to the root logger caplog listens on)
    optuna_logger.addHandler(caplog.handler)
    try:
        assert hypervolume_history(StudyView.of(study, ["auc", "f_meo", "f_fpr"])) == ([0], [0.0])
    finally:
        optuna_logger.removeHandler(caplog.handler)
    assert "feasible" not in caplog.text
    assert logging.getLogger("optuna.visualization").level == logging.NOTSET  # left as it was


def test_importances_need_feasible_trials():
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(create_trial(values=[0.7, 0.3], params={"lr": 1e-3}, distributions={"lr": FloatDistribution(1e-5, 1e-2, log=True)}))
    reasons = param_importances(study, ["auc", "f_meo"])
    assert all(isinstance(v, str) and "at least 2" in v for v in reasons.values())



def test_a_failed_trial_is_described_by_its_failure_not_by_an_earlier_stop():
    """A trial that stopped early, then failed to upload its outputs, failed because of the upload."""
    from search._notes import end_reason
    from search.study import describe_trial

    attrs = {"stop_reason": "degenerate: every validation prediction was one class", "fail_reason": "PermissionError: artifacts"}
    failed = create_trial(state=TrialState.FAIL, user_attrs=attrs)
    pruned = create_trial(state=TrialState.PRUNED, user_attrs=attrs)
    assert end_reason(failed) == "PermissionError: artifacts" and "(PermissionError: artifacts)" in describe_trial(failed, ["auc"])
    assert end_reason(pruned).startswith("degenerate")

def test_small_formatters():
    assert ranges([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8"
    assert ranges([]) == "none"
    assert md_table(["a", "b"], [[1, "x|y"]]).splitlines() == ["| a | b |", "| :--- | ---: |", "| 1 | x\\|y |"]


def test_degenerate_trials_are_marked_in_the_test_tables_and_the_evaluate_frame():
    from search.evaluate import results_frame
    from search.report import _test_sections

    study = _synthetic_study()  # trials 3 and 4 are infeasible (degenerate)
    view = StudyView.of(study, ["auc", "f_meo", "f_fpr"])
    results = {n: {"datasets": ["a"], "test_a_auc": 0.7, "test_mean_auc": 0.7, "test_a_f_meo": 0.0, "test_mean_f_meo": 0.0}
               for n in (0, 3)}
    auc = _test_sections(view, results)[0]
    assert [row[0] for row in auc.rows] == ["0 (Pareto)", "3 (degenerate)"]
    assert "Trials 3 are degenerate on validation" in auc.text
    frame = results_frame(results, infeasible=frozenset({3, 4}))
    assert list(frame["trial"]) == [0, "3 (degenerate)"]


def test_test_tables_follow_the_studys_objectives():
    """A study that optimises F_DP sees F_DP at the tuned threshold, in the report and in
    evaluate's table, not the default objectives' F_MEO and F_FPR."""
    from search.evaluate import results_frame
    from search.report import _test_sections

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(create_trial(values=[0.8, 0.1], user_attrs={"val_auc": 0.8, "val_f_dp": 0.1, "val_acc": 0.7}))
    metrics = ["auc", "f_dp"]
    result = {"datasets": ["a"], "threshold": 0.5, "tuned_threshold": 0.4, "tuned_val_acc": 0.75}
    for prefix, shift in (("test_", 0.0), ("tuned_test_", 0.01)):
        result.update({f"{prefix}{d}_{m}": 0.1 * (i + 1) + shift for d in ("a", "mean") for i, m in enumerate(objectives.METRIC_NAMES)})
    tuned = next(s for s in _test_sections(StudyView.of(study, metrics), {0: result}) if s.title.startswith("Threshold tuned"))
    assert tuned.header == ["trial", "trial threshold", "val ACC", "test ACC", "test F_DP", "tuned threshold", "val ACC (tuned)",
                             "test ACC (tuned)", "test F_DP (tuned)"]
    dp = 0.1 * (objectives.METRIC_NAMES.index("f_dp") + 1)
    assert tuned.rows[0][4] == f"{100 * dp:.2f}%" and tuned.rows[0][8] == f"{100 * (dp + 0.01):.2f}%"
    frame = results_frame({0: result}, tuple(metrics))
    assert list(frame.columns) == ["trial", "a auc", "mean acc", "mean auc", "mean f_dp", "tuned thr", "tuned mean acc", "tuned mean f_dp"]
    assert frame["tuned mean f_dp"][0] == pytest.approx(dp + 0.01)


FRONT = [  # (auc, f_meo, f_fpr, ap, degenerate): 0-4 the feasible front, 5 dominated, 6 degenerate
    (0.95, 0.40, 0.50, 0.90, False),  # best AUC
    (0.70, 0.05, 0.45, 0.70, False),  # best F_MEO
    (0.72, 0.30, 0.05, 0.95, False),  # best F_FPR and AP
    (0.88, 0.15, 0.20, 0.80, False),  # the compromise: best of none, closest to the ideal point
    (0.80, 0.10, 0.35, 0.75, False),
    (0.70, 0.45, 0.55, 0.60, False),
    (0.99, 0.00, 0.00, 0.99, True),   # would dominate everything if it counted
]


@pytest.mark.parametrize("pick, expected", [
    ("knee", 3), ("max-auc", 0), ("min-f_meo", 1), ("min-f_fpr", 2), ("max-ap", 2), ("max-f_fpr", 0),
    ("f_meo <= 0.12", 4), ("auc > 0.9", 0), ("f_fpr<0.3", 3), (" MAX-AUC ", 0), ("trial:5", 5),
])
def test_each_pick_form_picks_its_trial_on_a_five_point_front(pick, expected):
    from sklearn.preprocessing import MinMaxScaler

    from search.pareto import pareto_trials, pick_trial

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for auc, meo, fpr, ap, degenerate in FRONT:
        study.add_trial(create_trial(values=[auc, meo, fpr], user_attrs={
            "degenerate": degenerate, "val_auc": auc, "val_f_meo": meo, "val_f_fpr": fpr, "val_ap": ap}))
    assert [t.number for t in pareto_trials(study)] == [0, 1, 2, 3, 4]
    # the knee by an independent route: each objective min-max scaled over the front, nearest the origin
    costs = np.array([[-auc, meo, fpr] for auc, meo, fpr, *_ in FRONT[:5]])
    assert int(np.argmin(np.linalg.norm(MinMaxScaler().fit_transform(costs), axis=1))) == 3
    assert pick_trial(study, pick).number == expected


@pytest.mark.parametrize("pick, expected", [("min-f_meo", 1), ("max-f_meo", 1), ("min-f_fpr", 2), ("max-auc", 1)])
def test_a_tie_on_the_picked_metric_goes_to_the_best_auc_then_the_first_trial(pick, expected):
    from search.pareto import pick_trial

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    # trial 0 is dominated by 2; 1, 2 and 3 tie on f_meo, 1 and 3 on everything
    for auc, meo, fpr in ((0.70, 0.4, 0.2), (0.80, 0.4, 0.9), (0.75, 0.4, 0.2), (0.80, 0.4, 0.9)):
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[auc, meo, fpr],
                                     user_attrs={"degenerate": False, "val_auc": auc, "val_f_meo": meo, "val_f_fpr": fpr}))
    assert pick_trial(study, pick).number == expected
