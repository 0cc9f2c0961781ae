"""Target 6: wall time of the CPU demo, ``python run_study.py optimize --study studies/demo.yaml``.

Runs the real command line in a fresh temporary workdir (a copy of studies/demo.yaml pointing
there), so nothing is shared with runs/demo:

1. prepare included: a fresh workdir, one ``optimize`` (generates the synthetic data, builds the
   tiny-ViT cache, trains Stage 1, then the study's trials);
2. prepare excluded: the same workdir (data, cache and Stage 1 reused) with a fresh storage and
   study name, once per variant: torch threads (OMP_NUM_THREADS) and ``--workers``.

    python -m bench.demo_walltime [--variants 2t,1t,w2] [--n-trials 20]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

import yaml

from bench._common import REPO, WORK, load_average, machine, markdown_table, write_result

VARIANTS = {  # name: (OMP_NUM_THREADS or None for torch's default, extra CLI args)
    "2t": ("2", []),
    "1t": ("1", []),
    "w2": (None, ["--workers", "2", "--devices", "cpu,cpu"]),
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="2t,1t,w2")
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
        load = load_average()
        seconds, out = run(["optimize", "--study", str(path), "--storage", f"sqlite:///{root / (name + '.db')}",
                            "--study-name", f"bench-{name}", *budget, *extra], threads)
        rows.append({"run": f"prepare excluded ({name})", "trials": n_trials, "wall s": seconds, "wall min": seconds / 60,
                     "result": summary(out), "load avg before": load})
    notes = [
        "Target: studies/demo.yaml (>= 20 trials) in under 3 minutes on 2 cores.",
        "Variants: 2t / 1t = one worker with OMP_NUM_THREADS=2 / 1 (torch intra-op threads); w2 = --workers 2 "
        "--devices cpu,cpu (two worker processes sharing the study, 1 thread each).",
        "'prepare excluded' reuses the workdir's data, cache and Stage 1 (optimize still validates and reopens them).",
        "The machine is shared: see the load averages; wall times scale roughly with 2 / (load average) when it is busy.",
    ]
    write_result("demo_walltime", "Target 6: CPU demo wall time (run_study.py optimize --study studies/demo.yaml)",
                 markdown_table(rows), info=info, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
