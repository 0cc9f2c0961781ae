"""Target 6 (profile): where one demo trial's time goes, and the effect of torch's thread count.

One ``model.train`` run of studies/demo_train.yaml and one of a studies/demo.yaml trial (same
prepared data) under cProfile,
attributing wall time to the parts of a step: fairness loss (packed Sinkhorn), backward,
forward, optimizer, validation; then the same trial's epoch time at 1 and 2 torch threads, with
and without flushing denormals (torch.set_flush_denormal).

    python -m bench.profile_demo [--epochs 2]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics

import torch

from bench._common import REPO, demo_prepared, machine, markdown_table, sinkhorn_iterations, timer, write_result

PARTS = {  # label: (file substring, function name) as cProfile reports them
    "fairness loss (objectives.fairness_loss, packed Sinkhorn)": ("_fairness_loss.py", "fairness_loss"),
    "backward (autograd engine)": ("graph.py", "_engine_run_backward"),
    "forward (AdapterDetector)": ("detector.py", "forward"),
    "optimizer step (AdamW, foreach)": ("optimizer.py", "wrapper"),
    "gradient clipping": ("clip_grad.py", "clip_grad_norm_"),
    "validation forward (_predict)": ("train.py", "_predict"),
    "validation metrics (objectives.evaluate)": ("_evaluation.py", "evaluate"),
    "token batches (CachedTokens.batch)": ("tokens.py", "batch"),
}


def profile_parts(config, prepared) -> tuple[float, list[dict]]:
    from model import train

    profiler = cProfile.Profile()
    with timer() as t:
        profiler.enable()
        train(config, prepared=prepared, progress=False, write_outputs=False)
        profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = []
    for label, (path, name) in PARTS.items():
        cumulative = max((v[3] for (file, _, func), v in stats.items() if func == name and path in file), default=0.0)
        rows.append({"part": label, "seconds": cumulative, "share of the run": f"{100 * cumulative / t():.0f}%"})
    return t(), rows


def study_trial_config(demo_train_config):
    """A trial of studies/demo.yaml at its defaults (the Exp3 values), on the same prepared data."""
    import dataclasses

    from search.config import load_study_config

    trial = load_study_config(REPO / "studies" / "demo.yaml").base_run_config()
    return dataclasses.replace(demo_train_config, model=trial.model, training=dataclasses.replace(
        trial.training, num_epochs=demo_train_config.training.num_epochs, warmup_epochs=1, stop_if_degenerate_after=None))


def describe(config, prepared) -> str:
    from model.detector import AdapterDetector

    t = config.training
    iterations = sinkhorn_iterations(t.sinkhorn_blur, t.sinkhorn_scaling)
    trainable = AdapterDetector(prepared.backbone.shape.width, config.model, dropout=t.dropout, gate_init_bias=t.gate_init_bias).parameter_counts()["trainable"]
    return (f"Stage 2 hidden ratio {config.model.stage2_hidden_ratio:g}, {trainable:,} trainable parameters, "
            f"sinkhorn_scaling {t.sinkhorn_scaling:g} ({iterations} Sinkhorn iterations at blur {t.sinkhorn_blur:g})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    info = machine()
    train_config, prepared = demo_prepared(num_epochs=args.epochs, warmup_epochs=1, stop_if_degenerate_after=None)
    from model import train

    runs = {"demo_train.yaml": train_config, "demo.yaml trial": study_trial_config(train_config)}
    torch.set_num_threads(1)
    table, totals = {}, {}
    for label, config in runs.items():
        totals[label], parts = profile_parts(config, prepared)
        for row in parts:
            table.setdefault(row["part"], {"part": row["part"]}).update(
                {f"{label} s": row["seconds"], f"{label} share": row["share of the run"]})
    threads = []
    for n, flush in ((1, False), (2, False), (1, True), (2, True)):
        torch.set_num_threads(n)
        torch.set_flush_denormal(flush)
        row = {"torch threads": n, "flush denormals": flush}
        for label, config in runs.items():
            result = train(config, prepared=prepared, progress=False, write_outputs=False)
            row[f"{label}: epoch s (median)"] = statistics.median(r.seconds for r in result.epochs)
        threads.append(row)
    torch.set_flush_denormal(False)
    body = ("One demo training run of each config (" + f"{args.epochs} epochs, 1 thread) under cProfile: "
            + "; ".join(f"{label} {totals[label]:.1f} s" for label in runs) + ".\n\n"
            + "\n".join(f"- {label}: {describe(config, prepared)}" for label, config in runs.items())
            + "\n\nCumulative time per part (parts overlap where one calls another: the fairness loss's backward is "
            "inside 'backward'):\n\n" + markdown_table(list(table.values()))
            + "\n\nThe same runs by thread count and denormal flushing (no profiler):\n\n" + markdown_table(threads))
    notes = [
        "demo_train.yaml is the single-run demo (the GPU study's model ratio and sinkhorn_scaling); the demo.yaml "
        "trial is what each of the demo study's trials runs. The change between them is what took the demo study "
        "under 3 minutes (bench/results/demo_walltime.md), with two single-threaded workers.",
        "Both steps are small (batch 32, 64 tokens x 128 wide): the Sinkhorn loop is hundreds of tiny kernels per "
        "step and the largest single part with the backward; cProfile's own overhead inflates that Python-heavy "
        "loop somewhat.",
        "Thread count: these kernels split poorly over 2 threads, so two single-threaded worker processes get more "
        "out of 2 cores than one process with 2 threads (bench/results/worker_throughput.md); and on a shared, busy "
        "machine 2 threads wait on each other (OpenMP spinning): an earlier run of this script at load average 5-8 "
        "measured 316 s per epoch at 2 threads against 15 s at 1.",
        "Denormals: exp() of very negative Sinkhorn arguments can produce float32 denormals, slow on some x86 parts; "
        "flushing them to zero (which changes nothing above 1e-38) is measured above, not assumed.",
    ]
    write_result("demo_profile", "Target 6: profile of one demo trial (CPU)", body, info=info, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
