#!/usr/bin/env python
"""fairfront command line: prepare data, train one model, search, inspect and export.

Each subcommand is a small function that parses nothing itself and hands the work to the
library (``search``, ``model``); ``main(argv)`` returns an exit code so tests can call it in-process.

    python run_study.py prepare  --study studies/demo.yaml
    python run_study.py train    --config studies/demo_train.yaml
    python run_study.py optimize --study studies/demo.yaml
    python run_study.py show     --study studies/demo.yaml
    python run_study.py export   --study studies/demo.yaml --pick knee --out best.yaml
    python run_study.py dashboard --study studies/demo.yaml              # optuna-dashboard, localhost
    python run_study.py evaluate --study studies/demo.yaml --trials pareto  # test-set metrics
    python run_study.py report   --study studies/demo.yaml --out report/  # HTML + PNG + markdown
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger("fairfront")

def _load_study(args: argparse.Namespace):
    from search.config import load_study_config

    return load_study_config(args.study, storage=getattr(args, "storage", None), study_name=getattr(args, "study_name", None))


def _study_args(args: argparse.Namespace) -> str:
    """How this command named the study: stored on it for the commands its notes and report print."""
    from search.study_args import format_study_args

    return format_study_args(args.study, storage=args.storage, study_name=args.study_name)


def cmd_prepare(args: argparse.Namespace) -> int:
    from model import load_train_config, prepare

    if args.config:
        config = load_train_config(args.config)
    else:  # prepare never opens the study: a node that only builds caches needs no database URL or password
        from search.config import load_study_config

        config = load_study_config(args.study, storage="sqlite://").base_run_config()
    prepared = prepare(config, progress=not args.quiet)
    counts = prepared.manifest.frame["split"].value_counts().to_dict()
    print(f"manifest ok: {prepared.manifest.path} {counts}")
    for name, cache in {"train/val": prepared.cache, **prepared.test_caches}.items():
        print(f"feature cache ({name}): {cache.directory}  cls {tuple(cache.cls.shape)}  patches {tuple(cache.patches.shape)}")
    print(f"stage 1 adapter: {prepared.stage1_checkpoint}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from model import load_train_config, train
    from model.train import earlier_run_files

    import torch

    config = load_train_config(args.config)
    if args.output_dir:
        config = dataclasses.replace(config, output_dir=Path(args.output_dir).resolve())
    if not args.overwrite and (earlier := earlier_run_files(config)):  # before any work, and a failed run would delete best.pt
        raise ValueError(f"output_dir: {config.run_dir} holds an earlier run's outputs ({', '.join(earlier)}); "
                         "give another --output-dir, or --overwrite to replace them")
    threads = torch.get_num_threads()
    if args.threads:  # a CPU run's rounding depends on it: an export's header gives its trial's
        torch.set_num_threads(args.threads)
    try:
        result = train(config, progress=not args.quiet)
    finally:
        torch.set_num_threads(threads)
    print(json.dumps(result.summary(), indent=2))
    print(f"outputs: {result.output_dir}")
    return 0 if result.status != "diverged" else 1


def _print_front(study, config) -> None:
    import pandas as pd

    from search import front_table

    table = front_table(study, params=list(config.search_space))
    if table.empty:
        print("Pareto front: no feasible complete trial yet")
        return
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.float_format", "{:.4g}".format):
        print(f"Pareto front of {config.name!r} ({len(table)} trials; objectives: "
              + ", ".join(f"{m} {d}" for m, d in zip(config.metric_names, config.directions)) + ")")
        print(table.to_string(index=False))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0-65535 (0: any free one), got {value}")
    return value


def _window_size(text: str) -> tuple[int, int]:
    width, sep, height = text.partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 1400x1000, got {text!r}")
    return int(width), int(height)


def cmd_optimize(args: argparse.Namespace) -> int:
    from search import optimize
    from search.credentials import mask_url
    from search.study import FINISHED, finished_count

    config = _load_study(args)
    if args.warm_start:
        config = dataclasses.replace(config, warm_start=True)
    given = _study_args(args)
    code = 0
    workers = config.distributed.workers if args.workers is None else args.workers
    devices = args.devices or config.distributed.devices
    fuse = args.fuse or config.distributed.fuse  # (1: one trial at a time)
    if workers > 1 or devices:
        from search.local_workers import run_workers

        run = run_workers(config, workers=workers, devices=devices, n_trials=args.n_trials, timeout=args.timeout,
                          progress=not args.quiet, verbose=args.verbose, fuse=fuse if fuse > 1 else None, study_args=given)
        study, code = run.study, run.exit_code
    elif fuse > 1:
        from search.fused_batch import optimize_fused

        study = optimize_fused(config, group_size=fuse, n_trials=args.n_trials, timeout=args.timeout, progress=not args.quiet,
                               study_args=given)
    else:
        study = optimize(config, n_trials=args.n_trials, timeout=args.timeout, progress=not args.quiet, study_args=given)
    target, finished = args.n_trials or config.budget.n_trials, finished_count(study)
    if finished < target and code == 0:  # failed trials, a timeout: the same exit status as with --workers
        print(f"optimize: the study has {finished} of its {target} finished trials (a timeout ended this run, or trials failed: "
              "see above; run optimize again to continue)", file=sys.stderr)
        code = 1
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    infeasible = sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED) if t.user_attrs.get("degenerate"))
    print(f"\nstudy {config.name!r} in {mask_url(config.storage_url)}: " + ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
          + f" ({infeasible} degenerate)")
    _print_front(study, config)
    print("\nnext:")
    for command in next_commands(config, given, args.storage, retrain_threads=knee_retrain_threads(study)):
        print(f"  {command}")
    return code


def knee_retrain_threads(study) -> int | None:
    """The thread count that re-trains the trial ``export --pick knee`` picks (a CPU trial
    reproduces bit for bit only at its own count); None for a GPU trial or an empty front."""
    from search.export import retrain_threads
    from search.pareto import PickError, pick_trial

    try:
        return retrain_threads(pick_trial(study, "knee"))
    except PickError:
        return None


def next_commands(config, given: str, storage: str | None, *, retrain_threads: int | None = None) -> list[str]:
    """What to run after a study: browse it, export a trial, train it. The plain optuna-dashboard
    command needs the artifact folder, or every trial's curves and files fail to load."""
    from search.credentials import mask_url

    # the storage as the user gave it: "${VAR}" stays a reference, a literal password is masked
    shown = mask_url(storage or config.storage_url)
    return [
        f'optuna-dashboard "{shown}" --artifact-dir "{config.artifact_dir}"',  # (or: python run_study.py dashboard ...)
        f"python run_study.py export {given} --pick knee --out best.yaml",
        "python run_study.py train --config best.yaml" + (f" --threads {retrain_threads}" if retrain_threads else ""),
    ]


def cmd_show(args: argparse.Namespace) -> int:
    from search import open_study

    config = _load_study(args)
    _print_front(open_study(config, create=False), config)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from search import export_trial, open_study, pick_trial

    config = _load_study(args)
    study = open_study(config, create=False)
    trial = pick_trial(study, args.pick)
    out = export_trial(study, config, trial, args.out, pick=args.pick)
    from search.dashboard import upload_export

    upload_export(study, config, trial, out)  # also listed in the trial's dashboard artifacts
    print(f"trial {trial.number} ({', '.join(f'{m} {v:.4f}' for m, v in zip(config.metric_names, trial.values))}) -> {out}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from search import dashboard

    config = _load_study(args)
    if args.screenshot:
        png, _ = dashboard.screenshot_study(config, args.screenshot, page=args.page, annotate=not args.no_annotate,
                                            window=args.window)
        print(f"screenshot of study {config.name!r}{args.page}: {png}")
        return 0
    return dashboard.serve(config, host=args.host, port=args.port, annotate=not args.no_annotate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import pandas as pd

    from search import open_study
    from search.evaluate import evaluate_study, results_frame, select_trials
    from search.study_args import remember_study_args
    from search.pareto import is_feasible
    from search.storage import require_write_access

    config = _load_study(args)
    study = open_study(config, create=False)
    require_write_access(study)  # the results are stored in the study: a read-only one stops here, before any scoring
    remember_study_args(study, _study_args(args))
    trials = select_trials(study, args.trials)
    results = evaluate_study(config, study, trials, tune_threshold=not args.no_tune_threshold, batch_size=args.batch_size,
                             progress=not args.quiet)
    infeasible = frozenset(t.number for t in trials if not is_feasible(t))
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.float_format", "{:.4f}".format):
        print(f"test sets of study {config.name!r} ({len(results)} trials; stored in the study, see `report`):")
        print(results_frame(results, tuple(config.metric_names), infeasible=infeasible).to_string(index=False))
    if infeasible & results.keys():
        print(f"trials {', '.join(map(str, sorted(infeasible & results.keys())))} are infeasible: degenerate on validation (every "
              "prediction one class), so their fairness gaps of ~0 are not fairness", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from search import open_study
    from search.report import build_report

    config = _load_study(args)
    report = build_report(open_study(config, create=False), config, args.out)
    print(f"report of study {config.name!r} ({len(report.pareto_numbers)} Pareto trials): {report.html}")
    for path in [report.markdown, *report.images.values(), *report.tables.values()]:
        print(f"  {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_study.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    def study_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--study", type=Path, required=required, help="study YAML (studies/*.yaml)")
        p.add_argument("--storage", help="override the study's storage URL (may be '${ENV_VAR}')")
        p.add_argument("--study-name", help="override the study's name")

    p = add("prepare", cmd_prepare, "validate manifests, build the feature caches, train or load the Stage 1 adapter")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--study", type=Path, help="study YAML")
    group.add_argument("--config", type=Path, help="training-config YAML")

    p = add("train", cmd_train, "one full training run of the Stage 2 model from a training-config YAML")
    p.add_argument("--config", type=Path, required=True, help="training-config YAML (studies/demo_train.yaml, or an exported trial)")
    p.add_argument("--output-dir", help="override the config's output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in the output folder (refused otherwise)")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's); the same as a trial's reproduces it bit for bit")

    p = add("optimize", cmd_optimize, "run (or continue) the multi-objective study until its trial budget is met")
    study_args(p)
    p.add_argument("--n-trials", type=_positive_int, help="finished trials the study should reach (default: budget.n_trials)")
    p.add_argument("--timeout", type=_positive_float, help="stop starting new trials after this many seconds")
    p.add_argument("--warm-start", action="store_true", help="enqueue the reference report's Exp1-3 configurations first")
    p.add_argument("--workers", type=_positive_int, help="worker processes on this node sharing the study "
                                               "(default: the study's distributed.workers, 1 unless set)")
    p.add_argument("--devices", help="devices for the workers, round-robin: GPU indices (0,1,...), cuda:N or cpu "
                                     "(default: the study's distributed.devices, else every visible GPU, the CPU when none)")
    p.add_argument("--fuse", type=_positive_int, metavar="K", help="each worker trains K trials at a time in one fused pass over the "
                                                         "cached batches (see search/fused_batch.py; default: distributed.fuse; "
                                                         "1: one at a time)")

    p = add("show", cmd_show, "print the study's feasible Pareto front as a table")
    study_args(p)

    from model.train import SCORING_BATCH_SIZE
    from search._chromium import DEFAULT_WINDOW
    from search.dashboard import DEFAULT_HOST, DEFAULT_PORT
    from search.pareto import PICK_HELP

    p = add("export", cmd_export, "write one trial as a training-config YAML that `train` accepts")
    study_args(p)
    p.add_argument("--pick", default="knee", help=PICK_HELP + " (default: knee)")
    p.add_argument("--out", type=Path, required=True, help="YAML file to write")

    p = add("dashboard", cmd_dashboard, "serve optuna-dashboard on the study's storage and artifacts (notes, plots, Pareto front)")
    study_args(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}; the dashboard has no login)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--no-annotate", action="store_true", help="do not back-fill missing trial notes and study plots first")
    p.add_argument("--screenshot", type=Path, help="instead of serving: save a headless-Chromium screenshot of the study page to this PNG")
    p.add_argument("--page", default="", help="with --screenshot: a sub-page of the study, e.g. '/trials?numbers=3'")
    p.add_argument("--window", default=DEFAULT_WINDOW, type=_window_size,
                   help="with --screenshot: browser window WIDTHxHEIGHT (default {}x{})".format(*DEFAULT_WINDOW))

    p = add("evaluate", cmd_evaluate, "score trials on the study's test sets (per dataset and mean) and store the results in the study")
    study_args(p)
    p.add_argument("--trials", default="pareto", help="pareto (default) | all | trial numbers, e.g. 3,7,12")
    p.add_argument("--batch-size", type=_positive_int, default=SCORING_BATCH_SIZE, help=f"scoring batch size (default {SCORING_BATCH_SIZE})")
    p.add_argument("--no-tune-threshold", action="store_true", help="skip the validation-tuned threshold (balanced accuracy)")

    p = add("report", cmd_report, "write the study report: HTML, markdown tables and PNG plots of the trade-off")
    study_args(p)
    p.add_argument("--out", type=Path, default=Path("report"), help="output folder (default report/)")

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from search.credentials import install_log_redaction, redact
    from search.processes import drop_interrupt_tracebacks, interrupts_as_keyboard, is_user_error

    install_log_redaction()  # no storage password in any log line
    drop_interrupt_tracebacks()
    try:
        # SIGTERM (scancel, docker stop, kill) as Ctrl-C: a running trial ends FAIL instead of
        # staying RUNNING until another worker's heartbeat check
        with interrupts_as_keyboard():
            return args.func(args)
    except (ValueError, OSError) as err:  # "your input is wrong": one clear line, exit 2, no traceback
        if not is_user_error(err):
            raise
        log.debug("traceback of the error below", exc_info=True)
        print(f"error: {redact(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
