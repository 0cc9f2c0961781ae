#!/usr/bin/env python
"""Trials per hour with 1, 2 and 4 local workers (``run_study.py optimize --workers K``) on the
demo study: same YAML, a fresh study name per run, a reduced trial count.

    python -m bench.worker_throughput                      # 8 trials per run, SQLite (the demo's storage)
    python -m bench.worker_throughput --workers 1 2 4 8 --n-trials 16
    FAIRFRONT_STORAGE=postgresql+psycopg://... python -m bench.worker_throughput --storage '${FAIRFRONT_STORAGE}'

Two numbers per run: trials/hour over the trial window (first trial start to last trial end:
the steady state), and the wall time of the whole command (process start-up, preparation
check and the idle tail included). Prints a markdown table with the machine, and writes it to
bench/results/worker_throughput.md. Uses only the command line and the public API.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench._common import REPO, load_average, machine, markdown_table, write_result


def bench_yaml(study: Path, workdir: Path) -> Path:
    data = yaml.safe_load(study.read_text())
    data["workdir"] = str(workdir)
    path = workdir / "bench-study.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(study_yaml: Path, name: str, workers: int, n_trials: int, storage: str | None, devices: str | None,
        threads: int | None = None) -> dict:
    """One `optimize --workers K` run; ``threads`` forces OMP_NUM_THREADS (the 1-worker control)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = [sys.executable, str(REPO / "run_study.py"), "-q", "optimize", "--study", str(study_yaml), "--study-name", name,
               "--n-trials", str(n_trials), "--workers", str(workers)]
    if storage:
        command += ["--storage", storage]
    if devices:
        command += ["--devices", devices]
    load_before = load_average().split(",")[0]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"{name}: run_study.py optimize exited with {result.returncode}")

    from search import load_study_config, open_study

    config = load_study_config(study_yaml, storage=storage, study_name=name)
    trials = [t for t in open_study(config, create=False).get_trials(deepcopy=False) if t.datetime_complete and t.state.is_finished()]
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    window = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    mean_trial = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in finished) / len(finished)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {
        "workers": workers, "threads": threads or max(1, cores // workers), "finished": len(finished), "wall": wall, "window": window, "mean_trial": mean_trial,
        "per_hour": 3600 * len(finished) / window, "load": f"{load_before} -> {load_average().split(',')[0]}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=REPO / "studies" / "demo.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--n-trials", type=int, default=8)
    parser.add_argument("--storage", help="storage URL or '${ENV_VAR}' (default: the study's own, SQLite for the demo)")
    parser.add_argument("--devices", help="passed to --devices (default: the study's device / every GPU)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-worker-throughput")
    parser.add_argument("--name", default="worker_throughput", help="results file: bench/results/<name>.md")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the control run: 1 worker limited to 1 thread (separates the threading effect)")
    args = parser.parse_args(argv)

    study_yaml = bench_yaml(args.study, args.workdir)
    prep = subprocess.run([sys.executable, str(REPO / "run_study.py"), "-q", "prepare", "--study", str(study_yaml)], cwd=REPO)
    if prep.returncode != 0:
        return prep.returncode
    stamp = time.strftime("%Y%m%d-%H%M%S")
    info = machine()
    plan = [(k, None) for k in args.workers]
    if not args.no_control and 1 in args.workers and not args.devices:
        plan.insert(args.workers.index(1) + 1, (1, 1))
    rows = []
    for k, threads in plan:
        name = f"bench-workers{k}{'-1thread' if threads else ''}-{stamp}"
        row = run(study_yaml, name, k, args.n_trials, args.storage, args.devices, threads)
        rows.append(row)
        print(f"{k} worker(s), {row['threads']} thread(s) each: {row['finished']} trials, {row['per_hour']:.0f} trials/h, "
              f"wall {row['wall']:.0f} s", flush=True)

    base = rows[0]["per_hour"]
    table = markdown_table([{
        "workers": r["workers"], "CPU threads each": r["threads"], "finished": r["finished"],
        "trials/hour (trial window)": round(r["per_hour"]), "speed-up": f"{r['per_hour'] / base:.2f}x",
        "mean trial s": r["mean_trial"], "trial window s": r["window"], "wall s (with start-up)": r["wall"],
        "load avg 1 min (before -> after)": r["load"]} for r in rows])
    notes = [
        f"{args.n_trials} finished trials per run, a fresh study each, on {args.study.name}'s data and settings; storage: "
        + ("the study default (SQLite)." if not args.storage else "from --storage."),
        "Trials/hour counts finished trials over the window from the first trial's start to the last one's end; the wall "
        "time adds process start-up (imports, loading the prepared caches) and the idle tail while the last trials finish.",
        "CPU workers share the cores: --workers K gives each max(1, cores // K) torch threads; the control row is one "
        "worker limited to 1 thread (separates the threading effect from the worker count).",
        "GPU workers (one device each, or K per device with --devices 0,0,...): not measured here unless a GPU row says so.",
    ]
    write_result(args.name, f"Worker throughput: run_study.py optimize --workers K on {args.study.name}", table, info=info, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
