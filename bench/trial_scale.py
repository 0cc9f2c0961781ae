"""Target 2: one trial at FF++ scale (~100k images, ViT-L-14 tokens [256, 1024], 30 epochs).

The real training loop (``model.train``: AdapterDetector + label-conditioned Sinkhorn fairness
loss + AdamW + validation every epoch) on a feature cache of random float16 tokens with real
shapes, memory-mapped like ``model/cache.py`` writes it (preloaded when it fits). Also the same
trials fused (``model.fused.train_fused``).

On CUDA, run it at full size (~58 GB of synthetic tokens written under runs/bench/ first):
    python -m bench.trial_scale --n-train 100000 --n-val 10000 --epochs 2 --fused 8
On the CPU it runs at a reduced N and the table extrapolates to FF++ scale (labelled as such);
it also counts, per training step, the kernels a GPU would launch and the host syncs, with
torch.profiler, which is what bounds a step on a GPU at batch 32.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import resource
import statistics
import threading

import torch

from bench._common import (VITL14_TOKENS, VITL14_WIDTH, WORK, gpu_note, machine, markdown_table, set_threads, sinkhorn_iterations,
                           synthetic_prepared, timer, vitl14_prepared, write_result)

# ops that launch no kernel (views, metadata) and ops that wait for the device
_NO_KERNEL = {"aten::view", "aten::reshape", "aten::as_strided", "aten::expand", "aten::t", "aten::transpose", "aten::permute",
              "aten::select", "aten::slice", "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias", "aten::empty",
              "aten::empty_strided", "aten::_unsafe_view", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh",
              "aten::empty_like", "aten::unflatten", "aten::flatten", "aten::split", "aten::unbind", "aten::_reshape_alias",
              "aten::squeeze_", "aten::unsqueeze_", "aten::set_", "aten::result_type", "aten::zeros_like", "aten::expand_as",
              "aten::view_as", "aten::chunk", "aten::narrow", "aten::contiguous", "aten::to", "aten::lift", "aten::matmul"}
_SYNCS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::is_nonzero"}


class GpuSampler:
    """Mean NVML utilisation (torch.cuda.utilization, needs pynvml: the nvidia-ml-py wheel) sampled
    every 0.2 s: the share of time any kernel ran, however few SMs it kept busy, so an upper bound
    on how busy the GPU was."""

    def __init__(self) -> None:
        self.samples, self._stop, self.error = [], threading.Event(), None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.samples.append(torch.cuda.utilization())
            except Exception as err:  # pynvml missing: the table says why there is no figure
                self.error = f"{type(err).__name__}: {err}"
                return

    def __enter__(self):
        if torch.cuda.is_available():
            self._thread.start()
        else:
            self.error = "no CUDA"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()  # (its last sample, or its error, before mean() reads them)

    def mean(self) -> str:
        return f"{statistics.mean(self.samples):.0f}%" if self.samples else f"n/a ({self.error or 'no sample'})"


def peak_memory() -> str:
    if torch.cuda.is_available():  # the held training tokens included
        return (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved (GPU)")
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def _launches(event) -> tuple[int, int]:
    """(kernel launches, host syncs) of one profiler event and everything it calls.

    An aten op launches a kernel when it is not a view/metadata op and nothing it calls launches
    one (so addmm counts once, not its expand/resolve_conj children). A ``_foreach_*`` or
    ``_fused_*`` op counts as one launch: on CUDA it is one multi-tensor-apply kernel (per chunk of
    tensors), while the CPU runs it as a loop of per-tensor ops that would be counted one by one.
    """
    name = event.name
    if name in _SYNCS:
        return 0, 1
    if name.startswith(("aten::_foreach_", "aten::_fused_")):
        return 1, 0
    below = [_launches(child) for child in event.cpu_children]
    kernels, syncs = sum(k for k, _ in below), sum(s for _, s in below)
    if kernels == 0 and name.startswith("aten::") and name not in _NO_KERNEL:
        kernels = 1
    return kernels, syncs


@dataclasses.dataclass
class StepOps:
    """What one training step asks of the device, per step (see ``count_step_ops``)."""

    launches: float  # aten ops that launch a kernel on CUDA, outside torch.compile'd code
    syncs: float  # host syncs: item(), nonzero(), boolean-mask indexing
    compiled_calls: float  # calls into torch.compile'd code (each runs a few fused kernels)
    device_kernels: float | None  # kernels and copies the GPU ran (CUDA only): the ground truth
    device_ms: float | None  # the sum of their durations: the step's time if the host never made the GPU wait

    def __sub__(self, other: "StepOps") -> "StepOps":
        device = None if self.device_kernels is None else self.device_kernels - other.device_kernels
        busy = None if self.device_ms is None else self.device_ms - other.device_ms
        return StepOps(self.launches - other.launches, self.syncs - other.syncs, self.compiled_calls - other.compiled_calls, device, busy)

    def __truediv__(self, n: float) -> "StepOps":
        return StepOps(self.launches / n, self.syncs / n, self.compiled_calls / n, None if self.device_kernels is None else self.device_kernels / n,
                       None if self.device_ms is None else self.device_ms / n)

    def row(self) -> dict:
        return {"kernel launches/step": self.launches, "compiled calls/step": self.compiled_calls,
                "CUDA kernels/step (measured)": "n/a (no CUDA)" if self.device_kernels is None else self.device_kernels,
                "GPU kernel ms/step (measured)": "n/a (no CUDA)" if self.device_ms is None else self.device_ms,
                "host syncs/step": self.syncs}


def _device_kernels(events) -> tuple[int, float]:
    """(count, milliseconds) of the kernels (and memcpy/memset) the CUDA device ran, from the
    profiler's device-side events; the milliseconds add their durations (one stream: no overlap)."""
    cuda = torch.autograd.DeviceType.CUDA
    on_device = [e for e in events if getattr(e, "device_type", None) == cuda]
    if not on_device:  # older layouts attach them to CPU ops
        on_device = [k for e in events for k in getattr(e, "kernels", [])]
    return len(on_device), sum(e.time_range.elapsed_us() for e in on_device if hasattr(e, "time_range")) / 1e3


def count_step_ops(train_fn) -> StepOps:
    """Per training step, from one short run under the profiler (``train_fn`` returns its steps).

    Compiled code's fused kernels are not aten ops: on the CPU they are counted as calls into
    compiled code; on CUDA the device-side events count every kernel, compiled or not.
    """
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        steps = train_fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    totals = [_launches(event) for event in events if event.cpu_parent is None and getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA]
    compiled = sum(1 for e in events if e.name.startswith("Torch-Compiled Region"))
    kernels, busy_ms = _device_kernels(events) if cuda else (None, None)
    ops = StepOps(sum(k for k, _ in totals), sum(s for _, s in totals), compiled, kernels, busy_ms)
    return ops / steps


def geomloss_fairness_loss(scores, labels, groups, *, blur: float, scaling: float) -> torch.Tensor:
    """The fairness loss as fairfront computed it before objectives/_sinkhorn_packed.py: every
    (label, group) pair through one batched geomloss ``SamplesLoss`` call (pads: zero-weight
    copies of the first point). The baseline of the fairness-loss table; same value to ~1e-7."""
    from geomloss import SamplesLoss

    pairs = []
    for c in (0, 1):
        same = torch.nonzero(labels == c).flatten()
        for g in torch.unique(groups[same]).tolist():
            members = same[groups[same] == g]
            if members.numel() >= 2:
                pairs.append((members, same))

    def padded(sets):
        length = max(len(s) for s in sets)
        index = torch.stack([torch.cat([s, s[:1].expand(length - len(s))]) for s in sets])
        weight = torch.stack([torch.cat([torch.full((len(s),), 1 / len(s)), torch.zeros(length - len(s))]) for s in sets])
        return scores[index.to(scores.device)][..., None], weight.to(scores.device)

    (x, a), (y, b) = padded([m for m, _ in pairs]), padded([s for _, s in pairs])
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=True, diameter=1.0, backend="tensorized",
                       cost=lambda u, v: ((u[:, :, None, :] - v[:, None, :, :]) ** 2).sum(-1) / 2)
    return loss(a, x, b, y).mean()


def fairness_loss_rows(batch_sizes=(32, 128), scalings=(0.9, 0.7), blur=1e-4, groups=8, compiled=True) -> list[dict]:
    """Kernel-launching ops and time of the fairness loss alone (forward + backward), on CUDA when
    there is one (scores on the device; labels and groups on the host, as model.train keeps them);
    ``compiled``: also the loss with compile_sinkhorn (compiled beforehand, see ``try_compile``)."""
    import objectives

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    gen = torch.Generator().manual_seed(0)
    implementations = [("geomloss SamplesLoss, pairs batched (before)", geomloss_fairness_loss),
                       ("packed loop (objectives.fairness_loss)", objectives.fairness_loss)]
    if compiled:
        implementations.append(("packed loop, compiled (compile_sinkhorn)", functools.partial(objectives.fairness_loss, compiled=True)))
    for batch in batch_sizes:
        logits = torch.randn(batch, generator=gen).to(device).requires_grad_()
        labels, group_ids = torch.randint(0, 2, (batch,), generator=gen), torch.randint(0, groups, (batch,), generator=gen)
        for scaling in scalings:
            for name, loss in implementations:
                def step():
                    loss(torch.sigmoid(logits), labels, group_ids, blur=blur, scaling=scaling).backward()
                    return 1
                ops = count_step_ops(step)
                step()  # warm
                sync()
                with timer() as t:
                    repeats = 10
                    for _ in range(repeats):
                        step()
                    sync()
                rows.append({"batch": batch, "sinkhorn_scaling": scaling, "iterations": sinkhorn_iterations(blur, scaling),
                             "implementation": name, "kernel launches": ops.launches, "compiled calls": ops.compiled_calls,
                             "CUDA kernels (measured)": "n/a" if ops.device_kernels is None else ops.device_kernels,
                             f"ms ({device.type})": 1e3 * t() / repeats})
    return rows


def try_compile(device: torch.device) -> tuple[float | None, str | None]:
    """(seconds, None) once the compiled Sinkhorn iterations are ready on ``device``, or (None, why
    not): a machine that cannot compile still gets every other row."""
    from model.runtime import CompileError, compile_sinkhorn

    try:
        with timer() as t:
            compile_sinkhorn(True, device)  # once per process (seconds when inductor's disk cache has it)
    except CompileError as err:
        return None, str(err)
    return t(), None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=None, help="default: 100000 on CUDA, 96 on the CPU")
    parser.add_argument("--n-val", type=int, default=None, help="default: 10000 on CUDA, 32 on the CPU")
    parser.add_argument("--epochs", type=int, default=1, help="epochs timed (extrapolated to --target-epochs)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fused", type=int, default=0, help="also time K fused trials")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--target-images", type=int, default=100_000)
    parser.add_argument("--target-val", type=int, default=10_000)
    parser.add_argument("--target-epochs", type=int, default=30)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    cuda = torch.cuda.is_available()
    n_train = args.n_train or (100_000 if cuda else 96)
    n_val = args.n_val or (10_000 if cuda else 32)
    info = machine()
    from model import train
    from model.fused import train_fused

    prepared = vitl14_prepared(WORK / "trial-scale", n_train=n_train, n_val=n_val, batch_size=args.batch_size, epochs=args.epochs)
    config = prepared.config
    steps = -(-n_train // args.batch_size)
    token_bytes = (VITL14_TOKENS + 1) * VITL14_WIDTH * 2  # patches and CLS, float16
    rows = []
    # small runs: "warm-up" warms the device up (cuBLAS handles, lazily loaded kernels, SDPA's
    # choice) outside the timed serial run; 2 and 6 steps for the per-step counts below
    small = dataclasses.replace(config, training=dataclasses.replace(config.training, num_epochs=1))
    sizes = {n: synthetic_prepared(WORK / f"trial-scale-ops-{n}", n_train=(2 if n == "warm-up" else n) * args.batch_size,
                                   n_val=args.batch_size, width=VITL14_WIDTH if cuda else 64, tokens=VITL14_TOKENS if cuda else 16,
                                   training=dataclasses.asdict(small.training))
             for n in ("warm-up", 2, 6)}
    train(sizes["warm-up"].config, prepared=sizes["warm-up"], progress=False, write_outputs=False)

    def timed(name: str, k: int, run) -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with GpuSampler() as gpu, timer() as t:
            results = run()
        epochs = [r.seconds for r in results[0].epochs]
        epoch = statistics.median(epochs[1:] or epochs)  # the first pays the group's first kernel calls
        trial_target = epoch * (args.target_images / n_train) * args.target_epochs / k_or_1(k)
        trials_per_hour = 3600 / trial_target
        serial_per_hour = rows[0]["trials/h"] if rows else trials_per_hour  # the first row is the serial run
        rows.append({
            "run": name, "N train/val": f"{n_train}/{n_val}", "epoch s": epoch, "img/s (train+val)": k_or_1(k) * n_train / epoch,
            "s/step (train+val)": epoch / steps, f"peak memory at N={n_train}": peak_memory(), "GPU busy (NVML)": gpu.mean(), "wall s": t(),
            f"min/trial at {args.target_images // 1000}k x {args.target_epochs} ep (fused: group / K)": trial_target / 60,
            "trials/h": trials_per_hour, "x serial": trials_per_hour / serial_per_hour,
        })

    timed("serial (model.train)", 0, lambda: [train(config, prepared=prepared, progress=False, write_outputs=False)])
    compile_seconds, compile_error = try_compile(torch.device("cuda" if cuda else "cpu"))
    can_compile = compile_error is None
    if can_compile:
        compiled = config.with_training(compile_sinkhorn=True)
        timed("serial, compile_sinkhorn", 0, lambda: [train(compiled, prepared=prepared, progress=False, write_outputs=False)])
    if args.fused:
        # Trial 0 is the serial run's config. Only lr and lambda_fair vary: a step costs the same
        # at any of their values, while a larger blur runs fewer Sinkhorn iterations, so "x serial"
        # compares equal work per trial.
        configs = [dataclasses.replace(config.with_training(lr=config.training.lr * (0.7 ** i), lambda_fair=config.training.lambda_fair * (1.5 ** i)),
                                       output_dir=WORK / "trial-scale" / f"f{i}")
                   for i in range(args.fused)]
        timed(f"{args.fused} fused (model.fused)", args.fused, lambda: train_fused(configs, prepared, progress=False, write_outputs=False))
        if can_compile:
            compiled_group = [c.with_training(compile_sinkhorn=True) for c in configs]
            timed(f"{args.fused} fused, compile_sinkhorn", args.fused,
                  lambda: train_fused(compiled_group, prepared, progress=False, write_outputs=False))

    title = "Target 2: a trial at FF++ scale (ViT-L-14 token shapes)"
    device = "CUDA" if cuda else "CPU"
    extrapolation = (f"The last column is an EXTRAPOLATION from N={n_train} on this {device} to {args.target_images} training images "
                     f"x {args.target_epochs} epochs (linear in images; validation scaled with it), not a measurement at that scale."
                     + ("" if cuda else " On the CPU it says what a CPU would take, nothing about a GPU."))
    timing_notes = [
        "Target: < 5 min per 30-epoch trial on one H100 at ~100k images, ViT-L-14 token shapes.", extrapolation,
        gpu_note() + ("" if cuda else " (run the command in the docstring on one)"),
        "An untimed 2-step run warmed the device up first; 'epoch s' is the median of the epochs after the first "
        "(the first, when it is the only one). img/s and s/step count the epoch's validation pass too. "
        "GPU busy = NVML's share of time any kernel ran, sampled every 0.2 s (an upper bound on how busy the SMs were).",
        f"Peak memory at N={n_train} includes the training tokens held on the device: {n_train * token_bytes / 2**30:.2f} GiB of "
        f"them here, {args.target_images * token_bytes / 2**30:.1f} GiB at {args.target_images} images (float16 "
        f"[{VITL14_TOKENS} + 1, {VITL14_WIDTH}] an image).",
        "Target 3 (K trials on one device): 'trials/h' and 'x serial' from the same extrapolation; the fused group's "
        "trial 0 is the serial config, the others vary lr and lambda_fair (equal work per step), target K=8 >= 4x serial.",
    ]
    # the timed rows now, in case a time limit stops the process during the counts below
    write_result("trial_scale", title, markdown_table(rows) + "\n\n(The per-step counts were not reached.)", info=info, notes=timing_notes)

    # kernels and syncs per training step: runs of 2 and 6 steps under the profiler, differenced
    # (so model set-up and the validation pass, which every run has once, drop out)

    def per_step(run) -> StepOps:
        two, six = (count_step_ops(lambda n=n: (run(sizes[n]), 1)[1]) for n in (2, 6))
        return (six - two) / 4

    def serial(**training):
        return lambda prep: train(prep.config.with_training(**training), prepared=prep, progress=False, write_outputs=False)

    scaling = small.training.sinkhorn_scaling
    serial_ops = per_step(serial())
    ops = [{"run": f"serial (sinkhorn_scaling {scaling:g})", **serial_ops.row()}]
    if can_compile:
        ops.append({"run": f"serial, compile_sinkhorn (sinkhorn_scaling {scaling:g})", **per_step(serial(compile_sinkhorn=True)).row()})
    ops.append({"run": "serial (sinkhorn_scaling 0.7, as the CPU demo)", **per_step(serial(sinkhorn_scaling=0.7)).row()})
    ops.append({"run": "serial, lambda_fair 0 (no fairness loss: model, loss, optimizer)", **per_step(serial(lambda_fair=0.0)).row()})
    if args.fused:
        def fused(prep, **training):
            configs = [dataclasses.replace(prep.config.with_training(sinkhorn_blur=1e-4 * (2 ** i), **training), output_dir=WORK / "ops" / f"f{i}")
                       for i in range(args.fused)]
            return train_fused(configs, prep, progress=False, write_outputs=False)
        runs = [(f"{args.fused} fused", fused)]
        if can_compile:
            runs.append((f"{args.fused} fused, compile_sinkhorn", functools.partial(fused, compile_sinkhorn=True)))
        for name, run in runs:
            fused_ops = per_step(run)
            ops.append({"run": name, **fused_ops.row(),
                        "per trial": f"{fused_ops.launches / args.fused:.0f} launches, {fused_ops.compiled_calls / args.fused:.1f} compiled calls"})
    k_serial = serial_ops.launches
    notes = [
        *timing_notes,
        "FLOPs per step at ViT-L-14 shapes, batch 32: ~69 GMAC forward, ~207 GMAC forward+backward (Stage 2 MLP on "
        "8192 tokens x 2 blocks dominates): ~0.5-1 ms on an H100 in bf16. A step is therefore bound by kernel launches "
        "and host syncs, counted with torch.profiler in the per-step table above (runs of 6 and 2 steps, differenced; ops that launch a kernel "
        "on CUDA, a foreach/fused optimizer op counted once; syncs = item()/nonzero()/boolean-mask indexing). At ~5 us per launch, the serial step's launch floor alone is "
        f"~{k_serial * 5e-3:.1f} ms, i.e. ~{k_serial * 5e-6 * 3125 * 30 / 60:.0f} min for 3125 steps x 30 epochs; "
        "fusing K trials divides it by ~K. sinkhorn_scaling 0.7 instead of 0.9 cuts the Sinkhorn iterations 3.2x "
        "(bench/results/demo_walltime.md has its accuracy against exact transport); the GPU study keeps 0.9.",
        "GPU kernel ms/step: the summed durations of the kernels and copies the device ran per training step "
        "(profiler, the same differencing); the step's wall time ('s/step' in the first table, validation included) "
        "minus this is time the GPU sat waiting for the host: Python, dispatch, autograd, launches and syncs.",
        "Both counts include the fairness loss's pair bookkeeping, which runs on CPU tensors (labels and groups are "
        "kept on the host on purpose): on a GPU those ops launch no kernel and wait for nothing, so the GPU figures "
        "are at most these.",
        "The fairness-loss table: the loss alone, forward + backward, on one batch with 8 groups at blur 1e-4. The "
        "packed loop (objectives/_sinkhorn_packed.py) solves every pair's four transport problems as rows of one "
        "[rows, L, L] batch, so an iteration is ~11 kernels whatever the number of pairs; geomloss' SamplesLoss "
        "(what fairfront called before, all pairs in one batched call) launches ~75 per iteration. The price: every "
        "cloud is padded to the largest label set L, so the arithmetic per iteration grows with L^2 for all rows; "
        "on a GPU that should be noise at these sizes; on the CPU it makes the eager packed loop slower than "
        "geomloss from batch ~128 up (the ms column, measured on the CPU unless it says cuda); the compiled rows show what inductor's fused "
        "kernels make of it.",
    ]
    loss_rows = fairness_loss_rows(compiled=can_compile)
    notes.append(
        "compile_sinkhorn (training.compile_sinkhorn, off by default, on in studies/ffpp_clip_vitl14.yaml): the Sinkhorn iterations through torch.compile, "
        + (f"8 per compiled call, each call a few fused kernels. Compiling took {compile_seconds:.1f} s in this process "
           "(once per process and device; ~20 s on 2 CPU cores with an empty inductor cache, a few s with a warm one), "
           "outside the timed epochs. On the CPU the 'kernel launches' of compiled rows count only the aten ops left "
           "outside compiled code; on CUDA the measured CUDA-kernel column counts everything."
           if can_compile else f"NOT measured: {compile_error}"))
    body = (markdown_table(rows) + "\n\nPer training step (what bounds a GPU step at batch 32):\n\n" + markdown_table(ops)
            + "\n\nThe fairness loss alone (forward + backward, 8 groups, blur 1e-4):\n\n"
            + markdown_table(loss_rows))
    write_result("trial_scale", title, body, info=info, notes=notes)
    return 0


def k_or_1(k: int) -> int:
    return k if k else 1


if __name__ == "__main__":
    raise SystemExit(main())
