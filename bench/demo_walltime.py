"""Target 6: wall time of the CPU demo, ``python run_study.py optimize --study studies/demo.yaml``.

Runs the real command line in a fresh temporary workdir (a copy of studies/demo.yaml pointing
there), so nothing is shared with runs/demo:

1. prepare included: a fresh workdir, one ``optimize`` (generates the synthetic data, builds the
   tiny-ViT cache, trains Stage 1, then the study's trials);
2. prepare excluded: the same workdir (data, cache and Stage 1 reused) with a fresh storage and
   study name, once per variant: torch threads (OMP_NUM_THREADS) and ``--workers``;
3. what the demo's ``sinkhorn_scaling: 0.7`` (the GPU study keeps 0.9) trades: Sinkhorn iterations
   and how close the divergence stays to exact 1-D transport (POT) on batch-sized score clouds.

    python -m bench.demo_walltime [--variants demo,1w1t,1w2t] [--n-trials 20] [--timeout-2t 600]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

import yaml

from bench._common import REPO, WORK, load_average, machine, markdown_table, sinkhorn_iterations, write_result

VARIANTS = {  # name: (OMP_NUM_THREADS or None for torch's default, extra CLI args)
    "demo": (None, []),  # as studies/demo.yaml says: distributed.workers 2, one CPU thread each
    "1w1t": ("1", ["--workers", "1"]),  # one worker process, one torch thread
    "1w2t": ("2", ["--workers", "1"]),  # one worker process, two torch threads
}


def run(args: list[str], threads: str | None) -> tuple[float, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = threads
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "run_study.py", "-q", *args], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return seconds, done.stdout


def summary(stdout: str) -> str:
    match = re.search(r"study '[^']+' in \S+: (.*)", stdout)
    return match.group(1) if match else "?"


def scaling_accuracy(cases: int = 200, blur: float = 1e-3) -> list[dict]:
    """Debiased Sinkhorn divergence / exact W2^2/2 (POT) on random (group, batch) score clouds."""
    import numpy as np
    import ot
    import torch

    from objectives import sinkhorn_divergence

    rng = np.random.default_rng(0)
    clouds = []
    while len(clouds) < cases:  # a group's 4-32 scores vs a label's 16-64, shifted apart by 0-0.3
        n, m = rng.integers(4, 33), rng.integers(16, 65)
        x = np.clip(rng.beta(2, 2, n) * rng.uniform(0.2, 1) + rng.choice([0.0, 0.02, 0.1, 0.3]), 0, 1)
        y = np.clip(rng.beta(2, 2, m) * rng.uniform(0.2, 1), 0, 1)
        exact = ot.wasserstein_1d(x, y, p=2) / 2
        if exact > 1e-5:
            clouds.append((torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), exact))
    rows = []
    for scaling in (0.5, 0.7, 0.8, 0.9):
        ratio = np.array([float(sinkhorn_divergence(x, y, blur=blur, scaling=scaling, diameter=1.0)) / exact for x, y, exact in clouds])
        rows.append({"sinkhorn_scaling": scaling,
                     "iterations at blur 1e-4": sinkhorn_iterations(1e-4, scaling),
                     "iterations at blur 1e-2": sinkhorn_iterations(1e-2, scaling),
                     f"divergence / exact, median (blur {blur:g})": float(np.median(ratio)),
                     "worst 10%": float(np.percentile(ratio, 10)), "worst": float(ratio.min())})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="demo,1w1t,1w2t")
    parser.add_argument("--timeout-2t", type=float, default=600,
                        help="stop starting trials after this many seconds in the 1w2t variant (slow on a busy machine)")
    parser.add_argument("--n-trials", type=int, default=None, help="default: the demo's budget")
    args = parser.parse_args(argv)
    info = machine()
    root = WORK / "demo-walltime" / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True)
    study = yaml.safe_load((REPO / "studies" / "demo.yaml").read_text())
    study["workdir"] = str(root / "work")
    study["name"] = "bench-demo"
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    budget = ["--n-trials", str(args.n_trials)] if args.n_trials else []
    n_trials = args.n_trials or study.get("budget", {}).get("n_trials", 20)

    rows = []
    first, *rest = args.variants.split(",")
    threads, extra = VARIANTS[first]
    load = load_average()
    seconds, out = run(["optimize", "--study", str(path), *budget, *extra], threads)
    rows.append({"run": f"prepare included ({first})", "trials": n_trials, "wall s": seconds, "wall min": seconds / 60,
                 "result": summary(out), "load avg before": load})
    for name in [first, *rest]:
        threads, extra = VARIANTS[name]
        if name == "1w2t" and args.timeout_2t:
            extra = [*extra, "--timeout", str(args.timeout_2t)]
        load = load_average()
        seconds, out = run(["optimize", "--study", str(path), "--storage", f"sqlite:///{root / (name + '.db')}",
                            "--study-name", f"bench-{name}", *budget, *extra], threads)
        rows.append({"run": f"prepare excluded ({name})" + (" [timeout]" if "--timeout" in extra else ""), "trials": n_trials,
                     "wall s": seconds, "wall min": seconds / 60, "result": summary(out), "load avg before": load})
    notes = [
        "Target: studies/demo.yaml (>= 20 trials) in under 3 minutes on 2 cores.",
        "Variants: demo = the README command as it is (studies/demo.yaml's distributed.workers: 2, two worker "
        "processes sharing the SQLite study, 1 torch thread each); 1w1t / 1w2t = --workers 1 with OMP_NUM_THREADS=1 / 2. "
        "The 1w2t run stops starting trials after --timeout-2t seconds ('result' says how many finished).",
        "'prepare excluded' reuses the workdir's data, cache and Stage 1 (optimize still validates and reopens them).",
        "The machine is shared: see the load averages; wall times scale roughly with 2 / (load average) when it is busy.",
    ]
    notes += [
        "What makes the demo this fast (studies/demo.yaml, each measured here on one trial first): two CPU workers "
        "(above); model.stage2_hidden_ratio 1.0 instead of 2.0 (the Stage 2 MLP over 64 patch tokens is most of a "
        "step); 6 epochs with one cosine cycle; degenerate stop after 4 epochs (Exp1/Exp3 leave the degenerate phase "
        "at epoch 4, Exp2 never does, as in the reference report); sinkhorn_scaling 0.7 (the table below: 28 "
        "Sinkhorn iterations instead of 90 at blur 1e-4, the fairness loss's main cost).",
    ]
    table = markdown_table(rows) + "\n\nsinkhorn_scaling: iterations and accuracy against exact 1-D transport " \
        "(POT's wasserstein_1d(x, y, p=2) / 2; 200 random group-vs-batch score clouds):\n\n" + markdown_table(scaling_accuracy())
    write_result("demo_walltime", "Target 6: CPU demo wall time (run_study.py optimize --study studies/demo.yaml)",
                 table, info=info, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
