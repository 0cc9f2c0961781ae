"""The packed Sinkhorn loop through torch.compile (``compiled=True``, training.compile_sinkhorn):
the same values and gradients as geomloss, one compilation for every batch, a clear error where
torch.compile cannot run."""

from __future__ import annotations

import pytest
import torch

import objectives
from objectives import fairness_loss, fairness_loss_multi
from objectives._sinkhorn_packed import CHUNK, schedule
from .test_fairness_loss import SETTINGS, batch, fused_batch, loop_reference


@pytest.fixture(scope="module")
def on_cpu():
    # the first compilation in this process, ~20 s on 2 cores (not for the CUDA test: a GPU image
    # may have Triton but no C++ compiler for the CPU)
    objectives.compile_fairness_loss("cpu")


def test_schedules_of_every_length_are_rounded_up_to_whole_chunks_that_change_nothing(on_cpu) -> None:
    lengths = {len(schedule(diameter=1.0, blur=b, scaling=s)) for b, s in SETTINGS}
    assert any(n % CHUNK for n in lengths)  # the frozen iterations of the last chunk are exercised
    scores, labels, groups = fused_batch(0)
    values = fairness_loss_multi(scores, labels, groups, blurs=[b for b, _ in SETTINGS], scalings=[s for _, s in SETTINGS], compiled=True)
    for t, (blur, scaling) in enumerate(SETTINGS):
        reference = loop_reference(scores[t], labels, groups, blur=blur, scaling=scaling)
        assert values[t].item() == pytest.approx(reference.item(), rel=1e-5), (blur, scaling)


@pytest.mark.parametrize("blur", [1e-3, 1e-2])
def test_compiled_gradient_is_geomloss_gradient(on_cpu, blur: float) -> None:
    scores, labels, groups = batch(2)
    logits = torch.logit(scores).requires_grad_()
    (grad,) = torch.autograd.grad(fairness_loss(torch.sigmoid(logits), labels, groups, blur=blur, compiled=True), logits)
    (reference,) = torch.autograd.grad(loop_reference(torch.sigmoid(logits), labels, groups, blur=blur), logits)
    assert float((grad - reference).norm() / reference.norm()) < 1e-3


def test_one_compilation_serves_every_batch_size_and_schedule() -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    from objectives import _sinkhorn_packed

    torch._dynamo.reset()  # as in a fresh process, whatever ran before (inductor's disk cache keeps it quick)
    _sinkhorn_packed._compiled_chunk.cache_clear()
    objectives.compile_fairness_loss("cpu")  # what a run does first: one chunk of a short schedule
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    # one chunk (blur 3e-2 at 0.5: 8 iterations) or many; 16 to 200 scores; with and without gradient
    for seed, (n, blur, scaling) in enumerate([(16, 3e-2, 0.5), (33, 1e-4, 0.9), (96, 1e-2, 0.7), (200, 1e-4, 0.9), (40, 3e-2, 0.5)]):
        assert (len(schedule(diameter=1.0, blur=blur, scaling=scaling)) <= CHUNK) == (blur == 3e-2)
        scores, labels, groups = batch(seed, n=n)
        scores.requires_grad_(seed % 2 == 0)
        compiled = fairness_loss(scores, labels, groups, blur=blur, scaling=scaling, compiled=True)
        assert compiled.item() == pytest.approx(fairness_loss(scores, labels, groups, blur=blur, scaling=scaling).item(), rel=1e-5), n
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation after the warm-up


def test_a_machine_that_cannot_compile_fails_before_the_run_naming_the_key(monkeypatch) -> None:
    from model import runtime

    def broken(device):
        raise OSError("no C compiler found")

    monkeypatch.setattr(objectives, "compile_fairness_loss", broken)
    runtime.compile_sinkhorn(False, torch.device("meta"))  # off: nothing is compiled or checked
    with pytest.raises(runtime.CompileError, match=r"training.compile_sinkhorn: torch.compile failed on meta \(OSError: no C compiler"):
        runtime.compile_sinkhorn(True, torch.device("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_on_cuda_matches_uncompiled_and_recompiles_for_no_batch() -> None:
    from torch._dynamo.utils import counters

    objectives.compile_fairness_loss("cuda")  # Triton kernels: the path the GPU study would use
    graphs = counters["stats"]["unique_graphs"]
    for seed, n in enumerate((32, 77, 256)):
        scores, labels, groups = batch(seed, n=n)
        logits = torch.logit(scores).cuda().requires_grad_()
        values, grads = [], []
        for compiled in (False, True):
            value = fairness_loss(torch.sigmoid(logits), labels, groups, blur=1e-3, compiled=compiled)
            (grad,) = torch.autograd.grad(value, logits)
            values.append(value.item())
            grads.append(grad)
        assert values[1] == pytest.approx(values[0], rel=1e-5), n
        assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-3, n
    assert counters["stats"]["unique_graphs"] == graphs
