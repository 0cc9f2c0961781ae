"""Cross-dataset evaluation of chosen trials on the study's held-out test sets.

    python run_study.py evaluate --study studies/demo.yaml --trials pareto   # or all, or 3,7,12

Each trial's best checkpoint (the artifact it uploaded, else its run folder) is scored on every
test manifest (Celeb-DF, DFD, DFDC in the real study; the synthetic held-out sets in the demo)
with every metric of ``objectives.evaluate``, per dataset and averaged over datasets, at the
trial's own threshold (``training.threshold``, 0.5 unless searched) and at the threshold that
maximises balanced accuracy on the trial's own validation scores (the reference report's
"threshold tuning" recommendation; AUC, EER and AP do not depend on it; see ``best_threshold``
for ties).

Where the results go. Optuna refuses to change a finished trial (``set_trial_user_attr`` raises
UpdateFinishedTrialError), so they are stored as one *study* user attribute per trial,
``test:<trial number>`` -> {"test_<dataset>_<metric>": v, "test_mean_<metric>": v,
"tuned_test_<dataset>_<metric>": v, ...}, plus a section in the trial's dashboard note and an
``evaluation.json`` in its dashboard artifacts. ``load_test_results(study)`` reads them back;
``search.report`` puts them in the report.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

import objectives
from model import prepare
from model.prepare import PreparedData
from model.runtime import resolve_device
from model.scoring import CheckpointError, load_detector, score_cache
from model.train import SCORING_BATCH_SIZE
from search.artifacts import artifact_store
from search.config import StudyConfig
from search.pareto import pareto_trials

log = logging.getLogger(__name__)

TEST_ATTR_PREFIX = "test:"
# What shows that two evaluations scored the same checkpoint on the same sets.
_SAME_SCORING = ("threshold", "datasets", "val_auc_recomputed", "test_mean_auc")
MEAN = "mean"


class EvaluateError(ValueError):
    pass


def select_trials(study: optuna.Study, spec: str) -> list[FrozenTrial]:
    """``pareto`` (the feasible front), ``all`` (every COMPLETE trial) or ``3,7,12``."""
    spec = spec.strip()
    if spec == "pareto":
        trials = pareto_trials(study)
        if not trials:
            raise EvaluateError("the study has no feasible complete trial yet (--trials pareto)")
        return trials
    complete = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    if spec == "all":
        if not complete:
            raise EvaluateError("the study has no complete trial yet (--trials all)")
        return [complete[n] for n in sorted(complete)]
    try:
        numbers = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise EvaluateError(f"--trials {spec!r}: expected pareto, all, or trial numbers like 3,7,12") from None
    if not numbers:
        raise EvaluateError(f"--trials {spec!r}: no trial numbers given")
    missing = [n for n in numbers if n not in complete]
    if missing:
        raise EvaluateError(f"--trials {spec!r}: trial(s) {missing} are not COMPLETE trials of study {study.study_name!r}")
    return [complete[n] for n in dict.fromkeys(numbers)]


def trial_checkpoint(trial: FrozenTrial, artifact_dir: Path, scratch: Path) -> Path:
    """The trial's best.pt: the artifact it uploaded (its id is unique to this trial), else its
    run folder on this machine (a folder named by study name and trial number only, which another
    storage's study of the same name may have overwritten: evaluate_trial checks the val AUC)."""
    from optuna.artifacts import download_artifact
    from optuna.artifacts.exceptions import ArtifactNotFound

    artifact_id = (trial.user_attrs.get("artifacts") or {}).get("best.pt")
    if artifact_id is not None:
        path = scratch / f"trial-{trial.number:05d}-best.pt"
        try:
            download_artifact(artifact_store=artifact_store(artifact_dir), artifact_id=artifact_id, file_path=str(path))
            return path
        except (ArtifactNotFound, OSError) as err:
            log.warning("trial %d: best.pt not in the artifact store %s (%s); trying its run folder", trial.number, artifact_dir, err)
    output_dir = trial.user_attrs.get("output_dir")
    if output_dir and (Path(output_dir) / "best.pt").is_file():
        return Path(output_dir) / "best.pt"
    raise EvaluateError(f"trial {trial.number}: no best.pt (not in the artifact store {artifact_dir}, not in {output_dir})")


def trial_threshold(trial: FrozenTrial, config: StudyConfig) -> float:
    """The threshold the trial was trained and validated at (searchable, or edited in the YAML since)."""
    return float((trial.user_attrs.get("training") or {}).get("threshold", config.training.threshold))


# A checkpoint that scores the validation set more than this far from the trial's recorded AUC, on
# the kind of device the trial trained on, is not the trial's (there the scores are reproduced to
# float rounding). Across device kinds (bf16 on CUDA, fp32 on the CPU) it is only a warning.
_VAL_AUC_TOLERANCE = 1e-3


def _trained_on(trial: FrozenTrial) -> str | None:
    """"cpu" or "cuda": the kind of device the trial trained on, when it is known."""
    name = trial.user_attrs.get("device") or (trial.user_attrs.get("training") or {}).get("device")
    if not name or name == "auto":
        return None
    return "cuda" if name.startswith("cuda") else "cpu"


def best_threshold(labels: np.ndarray, scores: np.ndarray, current: float = 0.5) -> float:
    """The score threshold (predicted fake = score >= t) with the highest balanced accuracy.

    Balanced accuracies are compared in exact counts: in floats, (tpr + 1 - fpr) / 2 of two equal
    fractions can differ in the last bit, and argmax then picked among ties by rounding. Among
    equals, ``current`` (the trial's own threshold) is kept when it is one of them, so tuning
    moves a threshold only for a gain; otherwise the best threshold nearest to it is taken."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    candidates = np.unique(scores)  # predicted fake = score >= candidate; above them all, none is
    fakes, reals = np.sort(scores[labels]), np.sort(scores[~labels])
    n_fake, n_real = len(fakes), len(reals)
    if n_fake == 0 or n_real == 0:
        raise ValueError("best_threshold: the validation set needs real and fake samples")

    def counts(threshold: np.ndarray) -> np.ndarray:  # 2 * n_fake * n_real * balanced accuracy, an integer
        tp = n_fake - np.searchsorted(fakes, threshold, side="left")
        tn = np.searchsorted(reals, threshold, side="left")
        return tp * n_real + tn * n_fake

    value = counts(candidates)
    best = candidates[value == value.max()]
    if counts(np.array([current]))[0] == value.max():
        return float(current)
    # (not clipped into (0, 1): a confident detector's best score can be 1.0 in float32, and a
    # clipped threshold would classify the scores between the two otherwise)
    return float(best[np.argmin(np.abs(best - current))])


def _same_stage1(detector, prepared: PreparedData) -> bool:
    import torch

    saved = detector.stage1.state_dict()
    current = prepared.stage1_state
    return saved.keys() == current.keys() and all(
        torch.allclose(saved[k].float().cpu(), current[k].float().cpu(), atol=1e-6) for k in saved)


def _metrics(labels, scores, groups, threshold: float) -> dict[str, float]:
    values = objectives.evaluate(labels, scores, groups, threshold=threshold)
    return {k: float(v) for k, v in values.items()}


def _flat(prefix: str, per_dataset: dict[str, dict[str, float]]) -> dict[str, float]:
    flat = {}
    for dataset, values in per_dataset.items():
        flat.update({f"{prefix}{dataset}_{metric}": value for metric, value in values.items()})
    return flat


def evaluate_trial(trial: FrozenTrial, checkpoint: Path, prepared: PreparedData, *, threshold: float, device, batch_size: int,
                   tune_threshold: bool = True, bar=None) -> dict:
    """Test metrics of one trial: flat keys test_<dataset>_<metric>, test_mean_<metric> (and tuned_...)."""
    try:
        detector = load_detector(checkpoint, device=device)
    except CheckpointError as err:  # named by trial, not by a scratch copy that is gone by the time it is read
        raise EvaluateError(f"trial {trial.number}: its best.pt cannot be loaded ({err})") from None
    tuned = None
    result: dict = {"trial": trial.number, "threshold": threshold, "datasets": sorted(prepared.test_caches),
                    "stage1_matches": _same_stage1(detector, prepared)}
    if not result["stage1_matches"]:
        log.warning("trial %d: its checkpoint's frozen Stage 1 adapter differs from the one `prepare` has now: the data, "
                    "backbone or Stage 1 settings changed since the trial ran, so its test numbers may not be comparable", trial.number)
    frame = prepared.manifest.frame
    val = np.flatnonzero(frame["split"].to_numpy() == "val")
    val_scores = score_cache(detector, prepared.cache, val, device=device, batch_size=batch_size)
    val_labels, val_groups = frame["label"].to_numpy()[val], frame["group"].to_numpy()[val]
    result["val_auc_recomputed"] = float(roc_auc_score(val_labels, val_scores))
    recorded = trial.user_attrs.get("val_auc")
    if result["stage1_matches"] and recorded is not None and abs(result["val_auc_recomputed"] - recorded) > _VAL_AUC_TOLERANCE:
        message = (f"trial {trial.number}: {checkpoint} scores the validation set at AUC {result['val_auc_recomputed']:.4f}, "
                   f"the trial recorded {recorded:.4f}")
        if _trained_on(trial) == torch.device(device).type:
            raise EvaluateError(f"{message}: not this trial's checkpoint (another study of the same name in this workdir "
                                "may have overwritten its run folder)")
        log.warning("%s; it trained on %s, this runs on %s: rounding may explain it", message, _trained_on(trial) or "an unrecorded device",
                    torch.device(device).type)
    if tune_threshold:
        tuned = best_threshold(val_labels, val_scores, current=threshold)
        result["tuned_threshold"] = tuned
        result.update({f"tuned_val_{k}": v for k, v in _metrics(val_labels, val_scores, val_groups, tuned).items()})
    plain, at_tuned = {}, {}
    for name in sorted(prepared.test_caches):
        frame = prepared.test_manifests[name].frame
        rows = np.flatnonzero(frame["split"].to_numpy() == "test") if "split" in frame else np.arange(len(frame))
        labels, groups = frame["label"].to_numpy()[rows], frame["group"].to_numpy()[rows]
        scores = score_cache(detector, prepared.test_caches[name], rows, device=device, batch_size=batch_size)
        plain[name] = _metrics(labels, scores, groups, threshold)
        result[f"n_{name}"] = int(len(rows))
        if tuned is not None:
            at_tuned[name] = _metrics(labels, scores, groups, tuned)
        if bar is not None:
            bar.update(1)
    for per_dataset, prefix in ((plain, "test_"), (at_tuned, "tuned_test_")):
        if not per_dataset:
            continue
        metrics = next(iter(per_dataset.values())).keys()
        mean = {m: float(np.mean([v[m] for v in per_dataset.values()])) for m in metrics}
        result.update(_flat(prefix, {**per_dataset, MEAN: mean}))
    return result


def store_result(study: optuna.Study, result: dict) -> dict:
    """Store a trial's evaluation in place of an earlier one; returns what was stored. Run with
    --no-tune-threshold, it keeps the earlier tuned-threshold results when they scored the same
    checkpoint on the same sets (they would otherwise be lost)."""
    key = f"{TEST_ATTR_PREFIX}{result['trial']}"
    earlier = study.user_attrs.get(key)
    if "tuned_threshold" not in result and isinstance(earlier, dict) and "tuned_threshold" in earlier:
        if all(earlier.get(k) == result.get(k) for k in _SAME_SCORING):
            result = {**result, **{k: v for k, v in earlier.items() if k.startswith("tuned_")}}
        else:
            log.info("trial %d: its earlier tuned-threshold results scored another checkpoint or sets; dropped", result["trial"])
    study.set_user_attr(key, result)
    return result


def load_test_results(study: optuna.Study) -> dict[int, dict]:
    """trial number -> stored evaluation (see the module docstring for the keys)."""
    results = {}
    for key, value in study.user_attrs.items():
        if key.startswith(TEST_ATTR_PREFIX) and isinstance(value, dict):
            results[int(key[len(TEST_ATTR_PREFIX):])] = value
    return dict(sorted(results.items()))


def evaluate_study(config: StudyConfig, study: optuna.Study, trials: list[FrozenTrial], *, prepared: PreparedData | None = None,
                   tune_threshold: bool = True, batch_size: int = SCORING_BATCH_SIZE, progress: bool = True) -> dict[int, dict]:
    """Score ``trials`` on every test set, store the results in the study and return them."""
    prepared = prepared or prepare(config.base_run_config(), progress=progress, with_test_caches=True, with_views=False)
    if not prepared.test_caches:
        raise EvaluateError(f"study {config.name!r} has no test sets (data.test_manifests, or the synthetic generator's)")
    device = resolve_device(config.training.device)
    results = {}
    bar = tqdm(total=len(trials) * len(prepared.test_caches), desc="evaluate", unit="set", disable=not progress)
    skipped = []
    with tempfile.TemporaryDirectory(prefix="fairfront-eval-") as scratch:
        for trial in trials:
            try:  # a trial that cannot be scored is named at the end; the others are still stored
                checkpoint = trial_checkpoint(trial, config.artifact_dir, Path(scratch))
                result = evaluate_trial(trial, checkpoint, prepared, threshold=trial_threshold(trial, config), device=device,
                                        batch_size=batch_size, tune_threshold=tune_threshold, bar=bar)
            except EvaluateError as err:
                log.error("%s", err)
                skipped.append(str(err))
                continue
            result = store_result(study, result)
            _annotate(study, config, trial, result, Path(scratch))
            results[trial.number] = result
    bar.close()
    if skipped:
        raise EvaluateError(f"{len(skipped)} of {len(trials)} trials not evaluated (the others are stored): " + "; ".join(skipped))
    return results


def threshold_dependent(metrics) -> tuple[str, ...]:
    """ACC, then those of ``metrics`` that a decision threshold changes: what the tables show at
    the tuned threshold for a study's objectives."""
    return ("acc", *(m for m in metrics if m in objectives.METRIC_NAMES and m not in (*objectives.THRESHOLD_FREE, "acc")))


def results_frame(results: dict[int, dict], metrics: tuple[str, ...] = ("auc", "f_meo", "f_fpr"), *,
                  infeasible: frozenset[int] = frozenset()):
    """One row per trial: test AUC per dataset, then the mean of ACC and ``metrics`` (and those
    that depend on it at the tuned threshold). Trials in ``infeasible`` (degenerate on validation) are marked: a one-class model
    has fairness gaps of 0 on any test set, which is no fairness."""
    import pandas as pd

    tuned = threshold_dependent(metrics)
    metrics = ("acc", *(m for m in metrics if m != "acc"))  # what a tuned threshold is chosen for, always shown
    rows = []
    for number, r in sorted(results.items()):
        row = {"trial": f"{number} (degenerate)" if number in infeasible else number}
        row.update({f"{d} auc": r.get(f"test_{d}_auc") for d in r.get("datasets", [])})
        row.update({f"mean {m}": r.get(f"test_mean_{m}") for m in metrics})
        if "tuned_threshold" in r:
            row["tuned thr"] = r["tuned_threshold"]
            row.update({f"tuned mean {m}": r.get(f"tuned_test_mean_{m}") for m in tuned})
        rows.append(row)
    return pd.DataFrame(rows)


def _annotate(study: optuna.Study, config: StudyConfig, trial: FrozenTrial, result: dict, scratch: Path) -> None:
    """The results in the trial's dashboard note and artifacts; never fails the evaluation."""
    try:
        from search import dashboard

        path = scratch / "evaluation.json"
        path.write_text(json.dumps(result, indent=2, sort_keys=True))
        dashboard.attach_trial_file(study, config.artifact_dir, trial, path, mimetype="application/json")
        dashboard.write_trial_note(study, config, trial, test=result)
    except Exception:  # noqa: BLE001 - the dashboard is a view; the stored results are what counts
        log.warning("trial %d: could not update its dashboard note", trial.number, exc_info=True)


__all__ = ["EvaluateError", "best_threshold", "evaluate_study", "evaluate_trial", "select_trials", "load_test_results", "trial_checkpoint"]
