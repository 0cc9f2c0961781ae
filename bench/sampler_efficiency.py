"""Target 5: sampler efficiency, hypervolume of the feasible Pareto front vs number of trials.

The benchmark function is a SURROGATE of the demo study (studies/demo.yaml), fitted to real demo
trainings collected by ``python -m bench.collect_surrogate`` (runs/bench/surrogate/trials.csv):

- one Gaussian-process regressor per objective (val AUC, F_MEO, F_FPR of the best epoch) on the
  search space's coordinates (log10 for log ranges), fitted to every collected trial, degenerate
  ones included (their real values: AUC ~0.5 and zero unfairness);
- one Gaussian-process classifier for "degenerate" (stopped by the demo's degenerate rule); a point is
  degenerate when its probability is >= 0.5. Deterministic: the same parameters, the same result.

Each sampler is the study's own (``search.samplers.build_sampler`` with the demo's
``SamplerConfig``, name replaced), suggestions go through ``search.space.suggest``, the reference
configurations are enqueued as ``warm_start: true`` does, and a degenerate trial is recorded the way
``search/objective.py`` records it (user attr ``degenerate`` -> the violated constraint).
Hypervolume: feasible (non-degenerate) complete trials, objectives as minimised (-AUC, F_MEO,
F_FPR), fixed reference point AUC 0.5, F_MEO 1.0, F_FPR 2.0.

    python -m bench.sampler_efficiency [--seeds 8] [--trials 100] [--batch 8] [--n-startup 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings

import numpy as np
import pandas as pd

from bench._common import REPO, WORK, machine, markdown_table, write_result

DATA = WORK / "surrogate" / "trials.csv"
REFERENCE = {"auc": 0.5, "f_meo": 1.0, "f_fpr": 2.0}
CHECKPOINTS = (10, 20, 30, 50, 100)


class Surrogate:
    def __init__(self, frame: pd.DataFrame, space: dict, metrics: list[str]) -> None:
        from sklearn.gaussian_process import GaussianProcessClassifier, GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, Matern, WhiteKernel

        self.space, self.metrics = space, metrics
        x = self.features(frame)
        self.regressors = {}
        for metric in metrics:
            kernel = ConstantKernel() * Matern(length_scale=np.ones(x.shape[1]), nu=2.5) + WhiteKernel(1e-3)
            model = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=3, random_state=0)
            self.regressors[metric] = model.fit(x, frame[metric].to_numpy(float))
        labels = frame["degenerate"].astype(bool).to_numpy()
        self.classifier = None
        if labels.any() and not labels.all():
            self.classifier = GaussianProcessClassifier(ConstantKernel() * RBF(np.ones(x.shape[1])), random_state=0).fit(x, labels)
        self.constant_degenerate = bool(labels.all())

    def features(self, params) -> np.ndarray:
        frame = params if isinstance(params, pd.DataFrame) else pd.DataFrame([params])
        columns = []
        for name, spec in self.space.items():
            values = frame[name].to_numpy(float)
            low, high = (math.log10(spec.low), math.log10(spec.high)) if spec.log else (spec.low, spec.high)
            values = np.log10(values) if spec.log else values
            columns.append((values - low) / (high - low))
        return np.stack(columns, axis=1)

    def __call__(self, params: dict) -> tuple[list[float], bool]:
        x = self.features(params)
        values = [float(self.regressors[m].predict(x)[0]) for m in self.metrics]
        values[0] = min(max(values[0], 0.0), 1.0)  # AUC
        values[1:] = [max(v, 0.0) for v in values[1:]]
        degenerate = self.constant_degenerate if self.classifier is None else bool(self.classifier.predict_proba(x)[0, 1] >= 0.5)
        return values, degenerate


def hypervolume_curve(points: list[tuple[list[float], bool]], directions: list[str], metrics: list[str]) -> list[float]:
    from optuna._hypervolume import compute_hypervolume

    reference = np.array([REFERENCE[m] * (-1 if d == "maximize" else 1) for m, d in zip(metrics, directions)])
    curve, front = [], []
    for values, degenerate in points:
        if not degenerate:
            loss = np.array([v * (-1 if d == "maximize" else 1) for v, d in zip(values, directions)])
            if np.all(loss < reference):
                front.append(loss)
        curve.append(compute_hypervolume(np.array(front), reference) if front else 0.0)
    return curve


def run_sampler(name: str, seed: int, trials: int, study_config, surrogate: Surrogate, batch: int = 1,
                n_startup: int | None = None) -> tuple[list, list[float]]:
    """``batch`` K > 1: K trials are asked (each one sampled while the batch's earlier ones are
    RUNNING with their parameters, as a fused worker's claim leaves them), then all K are told.
    ``n_startup``: the sampler's ``n_startup_trials`` instead of the demo's."""
    import optuna

    from search.samplers import DEGENERATE_ATTR, build_sampler
    from search.space import enqueue_reference_configs, suggest

    sampler_config = dataclasses.replace(study_config.sampler, name=name, seed=seed)
    if n_startup is not None:
        sampler_config = dataclasses.replace(sampler_config, n_startup_trials=n_startup)
    sampler = build_sampler(sampler_config)
    study = optuna.create_study(directions=study_config.directions, sampler=sampler)
    if study_config.warm_start:
        enqueue_reference_configs(study, study_config.search_space)
    defaults = dataclasses.asdict(study_config.training)
    points, overhead = [], []
    while len(points) < trials:
        asked = []
        for _ in range(min(batch, trials - len(points))):
            start = time.perf_counter()
            trial = study.ask()
            asked.append((trial, suggest(trial, study_config.search_space, defaults)))
            overhead.append(time.perf_counter() - start)
        for i, (trial, params) in enumerate(asked, start=len(overhead) - len(asked)):
            values, degenerate = surrogate(params)
            trial.set_user_attr(DEGENERATE_ATTR, degenerate)
            told = time.perf_counter()
            study.tell(trial, values)
            overhead[i] += time.perf_counter() - told
            points.append((values, degenerate))
    return points, overhead


_STATE: dict = {}  # per process: the study config and the fitted surrogate


def _load() -> tuple:
    import optuna

    from search.config import load_study_config

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", module="sklearn")
    study_config = load_study_config(REPO / "studies" / "demo.yaml")
    frame = pd.read_csv(DATA).dropna(subset=study_config.metric_names)
    return study_config, frame, Surrogate(frame, study_config.search_space, study_config.metric_names)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    config, _, surrogate = _load()
    _STATE.update(config=config, surrogate=surrogate)


def _run_one(name: str, seed: int, trials: int, batch: int, n_startup: int | None) -> tuple[list, list[float]]:
    return run_sampler(name, seed, trials, _STATE["config"], _STATE["surrogate"], batch, n_startup)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--samplers", default="gp,tpe,nsga2,random")
    parser.add_argument("--name", default="sampler_efficiency", help="results file name (bench/results/<name>.md)")
    parser.add_argument("--limit", default="", help="fewer trials for slow samplers, e.g. gp=50 (GP's own cost "
                        "grows with the trials; the target only needs its first 30)")
    parser.add_argument("--batch", type=int, default=1, help="trials asked before any is told: K fused trials "
                        "(--fuse K) or K workers (default 1: one at a time)")
    parser.add_argument("--n-startup", type=int, default=None, help="the samplers' n_startup_trials (default: "
                        "the demo's); 10 is the FF++ study's")
    parser.add_argument("--jobs", type=int, default=1, help="(sampler, seed) runs in parallel processes, one core each; "
                        "overheads stay per-core only while jobs <= free cores")
    args = parser.parse_args(argv)
    info = machine()
    study_config, frame, surrogate = _load()

    limits = {k: int(v) for k, v in (item.split("=") for item in args.limit.split(",") if item)}
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    runs = [(name, seed, min(args.trials, limits.get(name, args.trials)), args.batch, args.n_startup)
            for name in args.samplers.split(",") for seed in range(args.seeds)]
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_init_worker) as pool:
            results = pool.starmap(_run_one, runs, chunksize=1)
    else:
        _STATE.update(config=study_config, surrogate=surrogate)
        results = [_run_one(*run) for run in runs]
    curves, overheads = {}, {}
    for (name, seed, trials, *_), (points, overhead) in zip(runs, results):
        curves.setdefault(name, []).append(hypervolume_curve(points, study_config.directions, study_config.metric_names))
        overheads.setdefault(name, []).append(overhead)
        print(f"{name} seed {seed}: hypervolume at {trials} = {curves[name][-1][-1]:.4f}", flush=True)
    checkpoints = [n for n in CHECKPOINTS if n <= args.trials]
    rows = []
    random_final = float(np.median([c[-1] for c in curves["random"]])) if "random" in curves else None
    for name, runs in curves.items():
        array = np.array(runs)  # [seeds, trials]
        row = {"sampler": name}
        for n in checkpoints:
            if n > array.shape[1]:
                row[f"HV@{n} median [IQR]"] = f"not run (limit {array.shape[1]})"
                continue
            q1, med, q3 = np.percentile(array[:, n - 1], [25, 50, 75])
            row[f"HV@{n} median [IQR]"] = f"{med:.4f} [{q1:.4f}, {q3:.4f}]"
        if random_final is not None:
            medians = np.median(array, axis=0)
            reached = np.flatnonzero(medians >= random_final)
            row["trials to random's median HV@100"] = int(reached[0]) + 1 if reached.size else f"> {array.shape[1]}"
        over = np.array(overheads[name])
        for n in (30, 100):
            row[f"overhead s/trial @{n}"] = float(np.median(over[:, max(0, n - 10):n])) if n <= over.shape[1] else "not run"
        rows.append(row)
    n_degenerate = int(frame["degenerate"].astype(bool).sum())
    notes = [
        f"Surrogate of the demo: GP regressors + GP classifier fitted to {len(frame)} real demo trainings "
        f"({n_degenerate} degenerate) from bench/collect_surrogate.py (random configurations of demo.yaml's space, "
        f"{study_config.training.num_epochs} epochs, degenerate stop after {study_config.stopping.degenerate_after_epochs}, "
        "the demo's synthetic data and model as when collected). It is a smooth "
        "stand-in for the demo, not the demo itself; absolute hypervolumes mean nothing beyond it.",
        "Reference point (fixed): AUC 0.5, F_MEO 1.0, F_FPR 2.0; hypervolume in (-AUC, F_MEO, F_FPR) space of the "
        "feasible (non-degenerate) complete trials, optuna._hypervolume.compute_hypervolume.",
        f"n_startup_trials {study_config.sampler.n_startup_trials if args.n_startup is None else args.n_startup}"
        + (" (the demo's)" if args.n_startup is None else " (--n-startup; the demo has "
           f"{study_config.sampler.n_startup_trials})") + ": random trials before gp and tpe fit their model.",
        f"{args.seeds} sampler seeds per sampler; median and interquartile range over seeds; the demo's 3 reference "
        "configurations are enqueued first (warm_start: true) for every sampler.",
        "Target: the default sampler's (gp) median reaches random search's median 100-trial hypervolume within 30 trials.",
        *([f"Batches of {args.batch}: {args.batch} trials are asked, then all {args.batch} told, as a `--fuse {args.batch}` worker "
           "runs them; each is sampled while the batch's earlier trials are RUNNING with their parameters (GP: q-batch "
           "acquisition over them; TPE: constant liar)."] if args.batch > 1 else []),
        "Overhead = time in study.ask + suggest + study.tell (the sampler's own work), median over trials n-9..n"
        + (f"; {args.jobs} runs in parallel, one core and one torch thread each." if args.jobs > 1 else "."),
    ]
    write_result(args.name, "Target 5: sampler efficiency on a surrogate of the demo study", markdown_table(rows), info=info, notes=notes)
    curves_path = WORK / "surrogate" / f"{args.name}-curves.csv"
    pd.DataFrame([{"sampler": s, "seed": i, "trial": t + 1, "hypervolume": v}
                  for s, runs in curves.items() for i, c in enumerate(runs) for t, v in enumerate(c)]).to_csv(curves_path, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
