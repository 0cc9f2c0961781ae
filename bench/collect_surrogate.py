"""Training data for the sampler benchmark's surrogate: the real demo training (studies/demo.yaml:
same data, model, schedule and degenerate stop) for N random configurations of its search
space, trained in fused groups of K (model.fused.train_fused; each trial's result is its serial
result up to rounding). Writes runs/bench/surrogate/trials.csv (git-ignored) and appends.

    python -m bench.collect_surrogate [--n 128] [--k 8] [--threads 1]

--n is the total: a CSV that already holds the first m configurations of the same --seed gets the
next n - m. 128, not 64: a surrogate fitted to the first 64 (21 of them not degenerate) changed
the sampler ranking at 100 trials (bench/results/sampler_efficiency_64.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import pandas as pd

from bench._common import REPO, WORK, machine, set_threads
from bench.fused_trials import sample_trials

OUT = WORK / "surrogate" / "trials.csv"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="total configurations in the CSV (default 128)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    from model import prepare
    from model.fused import train_fused
    from search.config import load_study_config

    study = load_study_config(REPO / "studies" / "demo.yaml")
    base = dataclasses.replace(study.base_run_config(), workdir=WORK / "demo")
    prepared = prepare(base, progress=False, with_test_caches=False)
    synthetic_digest = base.data.synthetic.digest()[:12]
    done = len(pd.read_csv(OUT)) if OUT.is_file() else 0
    trials = sample_trials(args.n, args.seed)[done:]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    print(f"{done} trials already in {OUT}; training {len(trials)} more ({machine()['load average (1, 5, 15 min) at start']})")
    for start in range(0, len(trials), args.k):
        group = trials[start:start + args.k]
        configs = [dataclasses.replace(base.with_training(**p), output_dir=WORK / "surrogate" / f"trial-{done + start + i}")
                   for i, p in enumerate(group)]
        t = time.perf_counter()
        results = train_fused(configs, prepared, progress=False, write_outputs=False)
        seconds = time.perf_counter() - t
        rows = []
        for params, result in zip(group, results):
            best = result.best  # (a degenerate trial as the study records it: search.objective.finish_trial)
            row = dict(params, status=result.status, degenerate=result.degenerate, epochs_run=len(result.epochs),
                       group_seconds=seconds, synthetic=synthetic_digest)
            for metric in study.metric_names:
                row[metric] = None if best is None else best.val[metric]
            rows.append(row)
        pd.DataFrame(rows).to_csv(OUT, mode="a", header=not OUT.is_file(), index=False)
        print(f"group of {len(group)}: {seconds:.0f} s; degenerate {sum(r['degenerate'] for r in rows)}/{len(rows)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
