"""objectives.fairness_loss(_multi): invariances, label conditioning, gradients, and the packed
Sinkhorn loop against geomloss' own SamplesLoss (one pair at a time) and POT's exact transport."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from objectives import fairness_loss, fairness_loss_multi, sinkhorn_divergence

BLUR = 1e-3


def batch(seed: int = 0, n: int = 96, n_groups: int = 8):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    groups = torch.randint(0, n_groups, (n,), generator=gen)
    return scores, labels, groups


def equal_multisets(n_groups: int = 4, shift_fakes: float = 0.0):
    """Every group holds the same real scores and the same fake scores: the fair ideal."""
    real = torch.tensor([0.1, 0.3, 0.35, 0.6])
    fake = torch.tensor([0.5, 0.55, 0.8, 0.95]) if shift_fakes == 0 else real + shift_fakes
    scores = torch.cat([torch.cat([real, fake]) for _ in range(n_groups)])
    labels = torch.tensor([0] * 4 + [1] * 4).repeat(n_groups)
    groups = torch.arange(n_groups).repeat_interleave(8)
    return scores, labels, groups


def loop_reference(scores, labels, groups, *, blur, scaling=0.9, min_group_size=2):
    """The definition, one (label, group) pair at a time through the public sinkhorn_divergence,
    i.e. geomloss' SamplesLoss("sinkhorn", debias=True): an implementation independent of ours."""
    values = []
    for c in (0, 1):
        for g in torch.unique(groups).tolist():
            members = (labels == c) & (groups == g)
            if members.sum() >= min_group_size:
                values.append(sinkhorn_divergence(scores[members], scores[labels == c], blur=blur, scaling=scaling, diameter=1.0))
    return torch.stack(values).mean()


@pytest.mark.parametrize("n_groups", [1, 2, 4, 8])
def test_zero_when_every_group_matches_the_batch(n_groups: int) -> None:
    assert abs(fairness_loss(*equal_multisets(n_groups), blur=BLUR).item()) < 1e-6


@pytest.mark.parametrize("shift", [0.05, 0.2])
def test_grows_when_one_group_is_shifted(shift: float) -> None:
    scores, labels, groups = equal_multisets(4)
    fair = fairness_loss(scores, labels, groups, blur=BLUR)
    shifted = torch.where((groups == 2) & (labels == 0), scores + shift, scores)
    unfair = fairness_loss(shifted, labels, groups, blur=BLUR)
    assert unfair.item() > 1e-4 + 100 * abs(fair.item())
    bigger = fairness_loss(torch.where((groups == 2) & (labels == 0), scores + 2 * shift, scores), labels, groups, blur=BLUR)
    assert bigger.item() > 2 * unfair.item()  # ~W2^2: quadratic in the shift


def test_label_conditioning_ignores_a_shift_shared_by_every_group() -> None:
    """Fakes score 0.3 above reals in every group: fair (same for all groups), so ~0.

    An unconditioned loss (each group's scores vs the whole batch, labels ignored) would be
    non-zero as soon as groups differ in their fake share; the second half shows that it does.
    """
    scores, labels, groups = equal_multisets(4, shift_fakes=0.3)
    assert abs(fairness_loss(scores, labels, groups, blur=BLUR).item()) < 1e-6
    # Drop two reals of group 0: its fake share rises, its label-conditioned distributions don't move.
    keep = ~((groups == 0) & (labels == 0) & (scores < 0.32))
    scores, labels, groups = scores[keep], labels[keep], groups[keep]
    assert abs(fairness_loss(scores, labels, groups, blur=BLUR).item()) > 1e-4  # real multiset of group 0 changed
    unconditioned = fairness_loss(scores, torch.zeros_like(labels), groups, blur=BLUR)
    assert unconditioned.item() > 1e-3


@pytest.mark.parametrize("blur", [1e-2, 1e-3, 1e-4])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_call_equals_pairwise_definition(blur: float, seed: int) -> None:
    scores, labels, groups = batch(seed)
    scores = scores.requires_grad_()
    batched = fairness_loss(scores, labels, groups, blur=blur)
    reference = loop_reference(scores, labels, groups, blur=blur)
    assert batched.item() == pytest.approx(reference.item(), rel=1e-4)
    if blur >= 1e-3:  # at 1e-4, float32 gradients of any implementation carry ~10% noise
        (g_batched,) = torch.autograd.grad(batched, scores)
        (g_reference,) = torch.autograd.grad(reference, scores)
        # float32 summation order differs; measured gap <= 0.2% of the largest gradient entry
        torch.testing.assert_close(g_batched, g_reference, rtol=1e-2, atol=5e-3 * g_reference.abs().max().item())


def test_gradient_flows_to_scores() -> None:
    scores, labels, groups = batch(3)
    scores.requires_grad_()
    fairness_loss(scores, labels, groups, blur=BLUR).backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad != 0).float().mean() > 0.9


def test_min_group_size_filters_pairs() -> None:
    scores, labels, groups = batch(4, n=64)
    counts = torch.stack([torch.bincount(groups[labels == c], minlength=8) for c in (0, 1)])
    size = int(counts[counts > 0].float().median().item())  # some pairs in, some out
    value = fairness_loss(scores, labels, groups, blur=BLUR, min_group_size=size)
    assert value.item() == pytest.approx(loop_reference(scores, labels, groups, blur=BLUR, min_group_size=size).item(), rel=1e-4)
    assert value.item() != pytest.approx(fairness_loss(scores, labels, groups, blur=BLUR).item(), rel=1e-4)


@pytest.mark.parametrize("min_group_size", [2, 100])
def test_no_qualifying_pair_gives_connected_zero(min_group_size: int) -> None:
    scores = torch.rand(10, requires_grad=True)
    groups = torch.arange(10) if min_group_size == 2 else torch.zeros(10, dtype=torch.long)
    loss = fairness_loss(scores, torch.randint(0, 2, (10,)), groups, blur=BLUR, min_group_size=min_group_size)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(scores.grad, torch.zeros(10))


def test_low_precision_scores_and_column_shape() -> None:
    scores, labels, groups = batch(5)
    reference = fairness_loss(scores.bfloat16().float(), labels, groups, blur=BLUR)
    low = scores.bfloat16().requires_grad_()
    value = fairness_loss(low[:, None], labels.float(), groups, blur=BLUR)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(reference.item(), rel=1e-5)
    value.backward()
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad.float()).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"labels": torch.tensor([0, 1, 2, 1])}, "labels"),
        ({"groups": torch.tensor([0.0, 1.0, 0.0, 1.0])}, "groups"),
        ({"groups": torch.tensor([0, 1, 0])}, "length"),
        ({"scores": torch.rand(4, 2)}, "scores"),
        ({"scores": torch.tensor([0, 1, 0, 1])}, "scores"),
        ({"blur": -1.0}, "blur"),
        ({"scaling": 0.0}, "scaling"),
        ({"min_group_size": 0}, "min_group_size"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, name: str) -> None:
    args = {"scores": torch.rand(4), "labels": torch.tensor([0, 1, 0, 1]), "groups": torch.tensor([0, 0, 1, 1]), "blur": BLUR}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        fairness_loss(args.pop("scores"), args.pop("labels"), args.pop("groups"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # bf16: model.runtime.autocast's
def test_cuda_matches_cpu_under_autocast(dtype) -> None:
    scores, labels, groups = batch(6, n=256)
    on_cpu = fairness_loss(scores, labels, groups, blur=BLUR)
    on_gpu_scores = scores.cuda().requires_grad_()
    with torch.autocast(device_type="cuda", dtype=dtype):
        on_gpu = fairness_loss(on_gpu_scores, labels.cuda(), groups.cuda(), blur=BLUR)
    on_gpu.backward()
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    assert on_gpu.item() == pytest.approx(on_cpu.item(), rel=1e-3)
    assert torch.isfinite(on_gpu_scores.grad).all()


# ---- fairness_loss_multi: T score vectors of one batch (the trials of a fused group) -------------

# Schedules of different lengths in one call: blur 1e-5 at scaling 0.95 is ~460 iterations, 1e-2 at
# 0.7 ~26, so rows must stop at their own last step.
SETTINGS = [(1e-5, 0.95), (1e-4, 0.9), (3e-3, 0.7), (1e-2, 0.9), (1e-3, 0.5)]


def fused_batch(seed: int = 3, n: int = 40):
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=gen) < 0.7).float()
    groups = torch.randint(0, 5, (n,), generator=gen)
    scores = torch.sigmoid(torch.randn(len(SETTINGS), n, generator=gen))
    return scores, labels, groups


@pytest.mark.parametrize("seed", [0, 3])
def test_each_row_equals_geomloss_with_its_own_schedule(seed: int) -> None:
    scores, labels, groups = fused_batch(seed)
    values = fairness_loss_multi(scores, labels, groups, blurs=[b for b, _ in SETTINGS], scalings=[s for _, s in SETTINGS])
    assert values.shape == (len(SETTINGS),)
    for t, (blur, scaling) in enumerate(SETTINGS):
        reference = loop_reference(scores[t], labels, groups, blur=blur, scaling=scaling)
        assert values[t].item() == pytest.approx(reference.item(), rel=1e-5), (blur, scaling)
        single = fairness_loss(scores[t], labels, groups, blur=blur, scaling=scaling)
        assert single.item() == pytest.approx(reference.item(), rel=1e-5), (blur, scaling)


@pytest.mark.parametrize("blur", [3e-3, 1e-2])
def test_each_row_has_geomloss_gradient(blur: float) -> None:
    # Only well-conditioned blurs compare tightly: below ~1e-3 the float32 Sinkhorn gradient is
    # rounding-dominated. Measured here (96 scores, 8 groups): geomloss' own gradient moves by
    # 0.1% (blur 1e-3), 10% (1e-4) and 90% (1e-5) when the scores move by 1e-7 relative, and ours
    # differs from geomloss' by as much, no more.
    scores, labels, groups = fused_batch()
    logits = torch.logit(scores[:3]).requires_grad_()
    settings = [(blur, 0.9), (2 * blur, 0.9), (blur, 0.8)]
    values = fairness_loss_multi(torch.sigmoid(logits), labels, groups, blurs=[b for b, _ in settings], scalings=[s for _, s in settings])
    (grad,) = torch.autograd.grad(values.sum(), logits)
    for t, (b, s) in enumerate(settings):
        row = logits.detach()[t].clone().requires_grad_()
        (reference,) = torch.autograd.grad(loop_reference(torch.sigmoid(row), labels, groups, blur=b, scaling=s), row)
        assert float((grad[t] - reference).norm() / reference.norm()) < 1e-3, (b, s)


def test_small_blur_approaches_exact_transport() -> None:
    """At blur 1e-3 and scaling 0.9 each pair's divergence is within a few % of POT's exact W2^2 / 2."""
    scores, labels, groups = batch(7, n=128, n_groups=4)
    exact = []
    for c in (0, 1):
        for g in torch.unique(groups).tolist():
            members = (labels == c) & (groups == g)
            if members.sum() >= 2:
                x, y = scores[members].double().numpy(), scores[labels == c].double().numpy()
                exact.append(ot.wasserstein_1d(x, y, p=2) / 2)
    value = fairness_loss_multi(scores[None], labels, groups, blurs=[1e-3], scalings=[0.9])[0].item()
    assert value == pytest.approx(float(np.mean(exact)), rel=0.05)


def test_multi_without_qualifying_pairs_is_a_connected_zero() -> None:
    logits = torch.randn(2, 4, requires_grad=True)
    values = fairness_loss_multi(torch.sigmoid(logits), torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.arange(4), blurs=[1e-3, 1e-3], scalings=[0.9, 0.9])
    assert values.tolist() == [0.0, 0.0] and values.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": torch.rand(6)}, "trials, n"),
        ({"blurs": [1e-3]}, "one blur and one scaling per row"),
        ({"scalings": [0.9, 1.5]}, "scaling"),
        ({"blurs": [1e-3, float("nan")]}, "blur"),
        ({"groups": torch.tensor([0, 1, 0])}, "length"),
    ],
)
def test_multi_bad_arguments_raise(kwargs: dict, message: str) -> None:
    args = {"scores": torch.rand(2, 6), "labels": torch.tensor([0, 1, 0, 1, 0, 1]), "groups": torch.tensor([0, 0, 1, 1, 0, 1]),
            "blurs": [1e-3, 1e-3], "scalings": [0.9, 0.9]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        fairness_loss_multi(args.pop("scores"), args.pop("labels"), args.pop("groups"), **args)


# ---- the packed loop's launch count: what bounds a GPU step at batch 32 ------------------------

def _ops(run) -> int:
    """aten ops that would launch a kernel (leaves of the profiler tree, views excluded)."""
    views = {"aten::view", "aten::reshape", "aten::as_strided", "aten::expand", "aten::t", "aten::transpose", "aten::select",
             "aten::slice", "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias", "aten::empty", "aten::empty_strided",
             "aten::_unsafe_view", "aten::split", "aten::split_with_sizes", "aten::lift_fresh", "aten::to", "aten::_to_copy", "aten::copy_",
             "aten::resolve_conj", "aten::resolve_neg", "aten::empty_like", "aten::contiguous", "aten::numpy_T", "aten::permute"}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not e.cpu_children and e.name not in views)


def test_packed_loop_launches_a_fixed_number_of_kernels_per_iteration_whatever_the_pairs() -> None:
    from objectives._sinkhorn_packed import debiased_sinkhorn_1d, schedule

    def run(problems: int, sets: int, scaling: float):
        gen = torch.Generator().manual_seed(problems)
        x, y = torch.rand(problems, 12, generator=gen), torch.rand(sets, 12, generator=gen)
        a, b = torch.full((problems, 12), 1 / 12), torch.full((sets, 12), 1 / 12)
        eps = schedule(diameter=1.0, blur=1e-4, scaling=scaling)
        return lambda: debiased_sinkhorn_1d(x, a, y, b, torch.arange(problems) % sets, schedules=[eps],
                                            problem_schedule=torch.zeros(problems, dtype=torch.long),
                                            set_schedule=torch.zeros(sets, dtype=torch.long))

    few, many = _ops(run(2, 1, 0.9)), _ops(run(64, 16, 0.9))
    assert few == many  # 2 pairs or 64 (8 trials x 8 groups): the same kernels, only larger
    iterations = len(schedule(diameter=1.0, blur=1e-4, scaling=0.9)) - len(schedule(diameter=1.0, blur=1e-4, scaling=0.7))
    per_iteration = (few - _ops(run(2, 1, 0.7))) / iterations
    assert per_iteration <= 12  # geomloss' SamplesLoss: ~75 per iteration (bench/results/trial_scale.md)
