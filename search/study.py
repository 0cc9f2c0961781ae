"""Create or continue a study and run trials on it."""

from __future__ import annotations

import json
import logging
import time
import warnings

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from model import prepare
from model.manifest import reuse_loaded
from model.prepare import inputs_identity, inputs_settings
from model.runtime import compile_sinkhorn, make_folder, resolve_device
from model.typed_config import to_dict
from search.config import StudyConfig
from search._notes import end_reason
from search.dashboard import TrialAnnotator
from search.objective import TrialDiverged, TrialObjective
from search.samplers import build_sampler
from search.space import enqueue_reference_configs
from search.credentials import mask_url
from search.storage import make_storage, require_write_access, sqlite_file, storage_of
from search.study_lock import study_lock
from search.study_args import remember_study_args
from search.workers import TrialBudget

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Trials a new definition would be compared with: finished, running or queued. A study whose
# trials all failed (a model setting that broke every one) may still take a corrected definition.
_COMPARED = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)


DEFINITION_ATTR = "fairfront_definition"
EARLY_STOP_RULE = "degenerate epochs skipped"
# Settings of where and how fast a trial runs, not of what it computes: they may differ between
# the nodes of one study (and between invocations) without making trials incomparable.
_RUN_SETTINGS = ("device", "compile_sinkhorn", "feature_mode")
# Definition keys that came after studies were stored without them, with the value those studies'
# trials ran with: such a study adopts the key, and a YAML that keeps that value continues it.
_ADDED_LATER = {"augment": {"views": 0}, "training": {"early_stop_patience": None}}
# Identity keys that came later with no value to assume (added 2026-12-03): a study stored without
# one cannot tell, and takes the YAML's; from then on a change is refused.
_IDENTIFIED_LATER = {"data": ("image_sizes_sha256",)}


def study_definition(config: StudyConfig) -> dict:
    """What makes the trials of one study comparable: the settings (settings_definition) and the
    inputs by content (model.prepare.inputs_identity: the train/val manifest's sha256 or the synthetic
    settings, the attributes, the backbone weights' sha256 and layers, the Stage 1 adapter). Paths,
    budget and workers are left out: they may differ between nodes. Stored on the study when it is
    created."""
    return json.loads(json.dumps({**settings_definition(config), **inputs_identity(config.base_run_config())}))


def settings_definition(config: StudyConfig) -> dict:
    """The part of the definition that the YAML alone gives (no data or weights read): objectives,
    search space, the fixed training values, the model, the stopping rule, the augmentation."""
    base = config.base_run_config()
    training = to_dict(base.training)
    for key in (*_RUN_SETTINGS, *config.search_space):
        training.pop(key, None)
    if base.training.early_stop_patience is not None:
        # Patience skips degenerate epochs (until 2026-12-03 one restarted the count): a study
        # stored under the older rule must not mix trials stopped by both.
        training["early_stop_rule"] = EARLY_STOP_RULE
    definition = {
        "objectives": [[metric, direction] for metric, direction in zip(config.metric_names, config.directions)],
        "search_space": {name: {k: v for k, v in to_dict(spec).items() if v is not None and v is not False}
                         for name, spec in config.search_space.items()},
        "training": training, "model": to_dict(config.model), "stopping": to_dict(config.stopping),
        "augment": base.augment.identity(),
    }
    return json.loads(json.dumps(definition))  # as the storage gives it back


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {key: value for name, sub in tree.items() for key, value in _flat(sub, f"{prefix}.{name}" if prefix else name).items()}


def check_definition(study: optuna.Study, config: StudyConfig, wanted: dict) -> None:
    """Refuse to continue a study with a YAML (or data) that defines other trials: their values
    would mix with the stored ones on one Pareto front, and a changed range silently makes the GP
    sample that parameter at random. A study without trials has nothing to mix with and takes the
    new definition (a first attempt that failed in ``prepare`` may be corrected); one from before
    a section was stored adopts that section. ``wanted``: study_definition(config)."""
    stored = current = study.user_attrs.get(DEFINITION_ATTR)
    if stored is None and study.metric_names is not None and study.metric_names != config.metric_names:
        stored = {**wanted, "objectives": [[m, d] for m, d in zip(study.metric_names, config.directions)]}
    elif stored is None or not study.get_trials(deepcopy=False, states=_COMPARED):
        stored = {}
    else:
        stored = _with_added_later(stored)
        for section, keys in _IDENTIFIED_LATER.items():
            if section in stored and section in wanted:
                stored[section] = {**{k: wanted[section][k] for k in keys if k in wanted[section]}, **stored[section]}
    adopted = {**wanted, **stored}
    if changes := _changes(adopted, wanted):
        raise ValueError(f"study {config.name!r} in {mask_url(config.storage_url)} was created with another definition ("
                         + "; ".join(changes) + "): its trials would not be comparable with new ones; "
                         "use another --study-name, or restore the YAML and the data")
    if adopted != current:
        study.set_user_attr(DEFINITION_ATTR, adopted)


def check_read_definition(study: optuna.Study, config: StudyConfig) -> None:
    """Refuse to read a study (show, export, report, evaluate) with a YAML whose settings differ
    from its stored definition: an export would carry the YAML's model or training values, not
    those its trial ran with, and a table would label values with the YAML's objectives. Only the
    settings and the inputs' settings are compared (model.prepare.inputs_settings: no data or
    weights are read here, `optimize` compares their hashes): an `evaluate` with another synthetic
    seed regenerated the study's data and replaced its stored results with other data's."""
    stored = study.user_attrs.get(DEFINITION_ATTR)
    if stored is None or not study.get_trials(deepcopy=False, states=_COMPARED):
        return
    wanted = settings_definition(config)
    stored = _with_added_later(stored)
    was = _flat({**wanted, **{k: v for k, v in stored.items() if k in wanted}})
    now = _flat(wanted)
    # the inputs' settings only where the study holds them: its identity also has hashes, not read here
    stored_flat = _flat(stored)
    inputs = {k: v for k, v in _flat(json.loads(json.dumps(inputs_settings(config.base_run_config())))).items() if k in stored_flat}
    if changes := _flat_changes(was | {k: stored_flat[k] for k in inputs}, now | inputs):
        raise ValueError(f"study {config.name!r} in {mask_url(config.storage_url)} was created with another definition ("
                         + "; ".join(changes) + "): its trials did not run with this YAML's settings; "
                         "restore the YAML the study ran with")


def _with_added_later(stored: dict) -> dict:
    return {**stored, **{section: {**keys, **stored.get(section, {})} for section, keys in _ADDED_LATER.items()}}


def _changes(stored: dict, wanted: dict) -> list[str]:
    return _flat_changes(_flat(stored), _flat(wanted))


def _flat_changes(was: dict, now: dict) -> list[str]:
    return [f"{key}: {json.dumps(was.get(key, 'unset'))} in the study, {json.dumps(now.get(key, 'unset'))} in the YAML"
            for key in sorted(set(was) | set(now)) if was.get(key, "unset") != now.get(key, "unset")]


def open_study(config: StudyConfig, *, create: bool = True) -> optuna.Study:
    """The study named in ``config`` on its storage; created (with metric names) if absent.

    The storage has heartbeats and dead-worker retry (``distributed:``); an unreachable one raises
    search.storage.StorageError, one line with the password masked.
    """
    sampler = build_sampler(config.sampler)
    if not create:
        if database := sqlite_file(config.storage_url):  # reading must not leave an empty database behind
            if not database.is_file():
                raise ValueError(f"no study database at {database}; run `optimize` first (or give --storage)")
        storage = make_storage(config.storage_url, config.distributed)
        try:
            study = optuna.load_study(study_name=config.name, storage=storage, sampler=sampler)
        except KeyError:
            raise ValueError(f"no study named {config.name!r} in {mask_url(config.storage_url)}; run `optimize` first") from None
        check_read_definition(study, config)
        return study
    definition = study_definition(config)  # before the study exists: a missing manifest creates nothing
    # The folders every trial writes to, before the study exists and minutes of preparation: a
    # path that cannot be a folder fails now, naming its key.
    make_folder(config.workdir, "workdir")
    make_folder(config.artifact_dir, "artifacts")
    storage = make_storage(config.storage_url, config.distributed)
    study = optuna.create_study(
        study_name=config.name, storage=storage, sampler=sampler,
        directions=config.directions, load_if_exists=True,
    )
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in config.directions]:
        raise ValueError(f"study {config.name!r} exists with directions {[d.name.lower() for d in study.directions]}, "
                         f"the YAML asks for {config.directions}; use another --study-name")
    # Under the study lock: the tasks of a SLURM array start together, and two first writes of one
    # study attribute would collide on its unique key.
    with study_lock(storage_of(study), config.name, fallback_dir=config.workdir):
        check_definition(study, config, definition)
        if study.metric_names is None:
            with warnings.catch_warnings():  # "experimental since v3.2": the API the dashboard reads names from
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(config.metric_names)
    return study


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def describe_trial(trial: FrozenTrial, metric_names: list[str]) -> str:
    if trial.state == TrialState.COMPLETE:
        values = "  ".join(f"{m} {v:.4f}" for m, v in zip(metric_names, trial.values))
        note = "  INFEASIBLE (degenerate)" if trial.user_attrs.get("degenerate") else ""
    else:
        values, note = trial.state.name, f"  ({end_reason(trial)})"
    params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return f"trial {trial.number:3d}: {values}{note}  epochs {trial.user_attrs.get('epochs_run', '?')}  [{params}]"


class _Progress:
    """A tqdm bar over the study's finished trials plus one summary line per trial; stops the
    worker when the study has its budget of finished trials or too many failures."""

    def __init__(self, config: StudyConfig, start_finished: int, target: int, show: bool) -> None:
        self.config, self.target, self.failed = config, target, 0
        self.bar = tqdm(total=target, initial=min(start_finished, target), desc=f"study {config.name}", unit="trial", disable=not show)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        tqdm.write(describe_trial(trial, self.config.metric_names))
        if trial.state == TrialState.FAIL:
            self.failed += 1
        done = finished_count(study)
        self.bar.n = min(done, self.target)
        self.bar.refresh()
        if done >= self.target:
            study.stop()
        elif self.failed >= self.config.budget.max_failed_trials:
            log.error("stopping: %d trials failed in this run (budget.max_failed_trials)", self.failed)
            study.stop()


def warm_start(study: optuna.Study, config: StudyConfig) -> None:
    """With ``warm_start: true``, queue the report's Exp1-3 once per study (under the study lock:
    workers on other nodes may start at the same moment)."""
    if not config.warm_start:
        return
    with study_lock(storage_of(study), config.name, fallback_dir=config.workdir):
        queued = enqueue_reference_configs(study, config.search_space)
    if queued:
        log.info("warm start: queued %d reference configurations (report Exp1-3)", queued)


def start_worker(config: StudyConfig, *, n_trials: int | None, timeout: float | None, progress: bool,
                 prepared=None, study_args: str | None = None) -> tuple[optuna.Study, object, TrialBudget | None]:
    """What every worker (``optimize``, a ``--fuse`` worker) does before its first trial: open the
    study, check that ``compile_sinkhorn`` can compile here, prepare, warm-start, and join the
    shared budget of ``n_trials`` (default: the budget's), with ``timeout`` (default: the budget's).
    ``study_args``: the command-line arguments that named the study (search/study_args.py).
    Returns (study, prepared data, budget); the budget is None when the study already has its trials."""
    target = n_trials or config.budget.n_trials
    with reuse_loaded():  # the study's identity and prepare read the same manifest
        study = open_study(config)  # first: an unreachable storage fails before minutes of preparation
        require_write_access(study)  # and so does a read-only one
        if study_args:
            remember_study_args(study, study_args)
        base = config.base_run_config()
        compile_sinkhorn(base.training.compile_sinkhorn, resolve_device(base.training.device))  # and a machine that cannot compile
        prepared = prepared or prepare(base, progress=progress, with_test_caches=False)
    warm_start(study, config)
    done = finished_count(study)
    if done >= target:
        log.info("study %s already has %d finished trials (budget %d); raise --n-trials to continue", config.name, done, target)
        return study, prepared, None
    budget = TrialBudget(study, config, target, timeout=timeout if timeout is not None else config.budget.timeout)
    budget.join()
    return study, prepared, budget


def optimize(config: StudyConfig, *, n_trials: int | None = None, timeout: float | None = None,
             progress: bool = True, prepared=None, study_args: str | None = None) -> optuna.Study:
    """Run trials until the study has ``n_trials`` finished ones (default: the budget), counted
    over every worker sharing the study (see search/workers.py for how the last slots are shared).

    Re-running on an existing study continues it; it never overwrites trials.
    """
    study, prepared, budget = start_worker(config, n_trials=n_trials, timeout=timeout, progress=progress, prepared=prepared,
                                           study_args=study_args)
    if budget is None:
        return study
    objective = TrialObjective(config, prepared)
    tracker = _Progress(config, finished_count(study), budget.target, progress)
    start = time.perf_counter()
    try:
        # One trial per study.optimize call (heartbeats need study.optimize): the budget decides
        # before each one whether the study still needs it.
        while tracker.failed < config.budget.max_failed_trials and budget.next_trial():
            try:
                study.optimize(
                    budget.wrap(objective),
                    n_trials=1,
                    callbacks=[tracker, TrialAnnotator(config)],  # TrialAnnotator: dashboard note + plots
                    # A trial never blocks the study: a crash or divergence ends that trial FAIL and logs why.
                    catch=(Exception,),
                )
            except (UpdateFinishedTrialError, ValueError) as err:
                # Our heartbeat was late and another worker failed the trial: Optuna's tell raises
                # UpdateFinishedTrialError, or "Cannot tell a FAIL trial." when it sees it first.
                if isinstance(err, ValueError) and not str(err).startswith("Cannot tell a"):
                    raise
                if budget.interrupted:  # raised instead of the interrupt: the stop must not be lost
                    raise KeyboardInterrupt from err
                log.warning("trial finished elsewhere (%s); its retry runs on another worker", err)
                tracker.failed += 1  # a failure of this run: heartbeats that never arrive must not loop forever
            finally:
                budget.release()
    except KeyboardInterrupt:
        budget.abandon()
        raise
    finally:
        tracker.bar.close()
    log.info("study %s: %d finished trials, %.1f s in this run", config.name, finished_count(study), time.perf_counter() - start)
    return study


__all__ = ["open_study", "optimize", "warm_start", "finished_count", "describe_trial", "FINISHED", "TrialDiverged"]
