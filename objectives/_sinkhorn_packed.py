"""Many debiased Sinkhorn divergences between 1-D clouds, solved in one packed loop.

The fairness loss needs, per batch, one divergence S_eps(x_p, y_s(p)) for every (label, group)
pair p: x_p = the group's scores, y_s = the scores of its label's set s. geomloss'
``SamplesLoss("sinkhorn", debias=True)`` solves each as four transport problems (x<->y, y<->x,
x<->x, y<->y), and every epsilon-scaling iteration is several small kernels per problem: ~7,200
kernel launches per training step at scaling 0.9, which is what bounds a GPU step at batch 32
(bench/results/trial_scale.md). Here all four problems of all pairs are rows of ONE batch:

    row block   row points  column points   partner block (its potential is read)
    A  x->y     x_p         y_s(p)          B
    C  x->x     x_p         x_p             C
    B  y->x     y_s(p)      x_p             A
    D  y->y     y_s         y_s             D      (once per set, not once per pair)

so an iteration is one soft-min over a [rows, L, L] cost whatever the number of pairs, trials
and groups (~12 kernels). Every cloud is padded to the same length L with zero-weight copies of
its own first point: a copy gets the same potential as that point, and zero weight keeps it out
of every sum, so padding changes no value (objectives/_fairness_loss.py pads the same way).

The arithmetic is geomloss' own: the same epsilon schedule (its ``epsilon_schedule``), the same
symmetric (Jacobi) updates averaged with the previous potentials, the same soft-min, and the same
final "last extrapolation" step with detached potentials and a cost that carries the gradient of
the row points only. Only float rounding differs (tests/objectives_tests compare with geomloss).
Each row follows the schedule given for it and is frozen after its last step, so problems with
different blur or scaling (the trials of a fused group) share the loop and still get exactly
their own iterations.

``compiled=True`` runs the iterations through ``torch.compile`` in chunks of ``CHUNK``: one
compiled call does ``CHUNK`` iterations with their ~12 ops fused into a few kernels (dynamic
shapes, so one compilation serves every batch, trial and schedule). Rounding the loop up to whole
chunks adds frozen iterations that change nothing. Same arithmetic, other rounding (inductor's
fused exp and sums); bench/results/trial_scale.md has what it saves.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from geomloss._legacy.sinkhorn_divergence import epsilon_schedule

__all__ = ["CHUNK", "debiased_sinkhorn_1d", "schedule"]

# Iterations per compiled call: a compiled call costs ~50-75 us of host time before any kernel
# runs (guards, wrapper), more than the ~12 eager ops of one iteration (~40-60 us), so one call per
# iteration would save nothing. Measured once on a 2-core CPU at tiny sizes while choosing it (not
# a bench): 8 iterations per call came to ~8 us per iteration, and still compile in seconds.
CHUNK = 8


@functools.lru_cache(maxsize=256)  # called every training step with a trial's fixed blur and scaling
def schedule(*, diameter: float, blur: float, scaling: float) -> tuple[float, ...]:
    """geomloss' epsilon values (p=2) from diameter**2 down to blur**2, one per iteration."""
    return tuple(float(e) for e in epsilon_schedule(2, diameter, blur, scaling))


def _log_weights(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w <= 0, torch.full_like(w, -100000.0), w.log())  # geomloss' clamp, without a sync


def _softmin(eps: torch.Tensor, neg_eps: torch.Tensor, neg_cost: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """-eps log sum_j exp(h_j - C_ij / eps), one eps per row: eps, neg_eps = -eps [R], neg_cost = -C [R, L, L], h [R, L].

    geomloss' soft-min (a stabilised log-sum-exp), written out: torch.logsumexp adds guards for
    infinite maxima (four more kernels per call) that finite costs and log-weights never need.
    """
    z = torch.addcdiv(h.unsqueeze(1), neg_cost, eps.view(-1, 1, 1))
    peak = z.amax(dim=2, keepdim=True).detach()  # the shift cancels in value and gradient
    return neg_eps.view(-1, 1) * ((z - peak).exp().sum(dim=2).log() + peak.squeeze(2))


def _iteration(f, partner, log_w, neg_cost, e, neg_e):
    """One symmetric Sinkhorn update of every row's potential f [R, L], averaged with the old one."""
    update = _softmin(e, neg_e, neg_cost, torch.addcdiv(log_w, f[partner], e.view(-1, 1)))
    return torch.lerp(f, update, 0.5)  # geomloss' 0.5 * (f + update), one kernel


def _chunk(f, partner, log_w, neg_cost, eps, neg_eps, active):
    """CHUNK iterations (eps, neg_eps [CHUNK, R], active [CHUNK, R, 1]); inactive rows keep f."""
    for i in range(CHUNK):
        f = torch.where(active[i], _iteration(f, partner, log_w, neg_cost, eps[i], neg_eps[i]), f)
    return f


@functools.cache  # torch.compile's wrapper is lazy: nothing compiles before the first call
def _compiled_chunk():
    return torch.compile(_chunk, dynamic=True, fullgraph=True)


def debiased_sinkhorn_1d(
    x: torch.Tensor,
    a: torch.Tensor,
    y: torch.Tensor,
    b: torch.Tensor,
    set_of_problem: torch.Tensor,
    *,
    schedules: Sequence[Sequence[float]],
    problem_schedule: torch.Tensor,
    set_schedule: torch.Tensor,
    compiled: bool = False,
) -> torch.Tensor:
    """S_eps(x_p, y_{set_of_problem[p]}) for every problem p, with cost |x - y|^2 / 2.

    Args:
        x: [P, L] float32 row clouds; a: [P, L] their weights (each row sums to 1, 0 on pads).
        y: [S, L] float32 set clouds; b: [S, L] their weights.
        set_of_problem: [P] long, the set each problem compares its cloud with.
        schedules: the distinct epsilon schedules (``schedule``), one per trial of a fused group.
        problem_schedule: [P] long, on the CPU: the schedule that the x->y, x->x and y->x
            problems of p follow.
        set_schedule: [S] long, on the CPU: the schedule of each set's y->y problem.
        compiled: run the iterations through ``torch.compile`` (see the module docstring); the
            first call in a process compiles (~20 s on 2 CPU cores, seconds once inductor's
            on-disk cache holds it).

    Returns:
        [P] divergences; the gradient flows to x and y (give pads detached values if they must
        not receive any).
    """
    problems, sets = x.shape[0], y.shape[0]
    if problem_schedule.shape != (problems,) or set_schedule.shape != (sets,):
        raise ValueError(f"need {problems} problem and {sets} set schedule indices, got {tuple(problem_schedule.shape)} and {tuple(set_schedule.shape)}")
    device = x.device
    y_p, b_p = y[set_of_problem], b[set_of_problem]
    rows = torch.cat([x, x, y_p, y])  # blocks A, C, B, D
    columns = torch.cat([y_p, x, x, y]).detach()
    log_w = _log_weights(torch.cat([b_p, a, a, b]))
    neg_cost = -0.5 * (rows.unsqueeze(2) - columns.unsqueeze(1)) ** 2  # [R, L, L]; grad to row points only
    p_range = torch.arange(problems)
    partner = torch.cat([p_range + 2 * problems, p_range + problems, p_range, torch.arange(sets) + 3 * problems]).to(device, non_blocking=True)

    steps = max(len(s) for s in schedules)
    total = steps + (-steps % CHUNK if compiled else 0)  # the compiled loop runs whole chunks
    # The compiled loop reads slices of the tables: dynamo guards on whether a slice covers its whole
    # tensor, so one spare chunk (never run) keeps one-chunk schedules on the same compiled graph.
    allocated = total + (CHUNK if compiled else 0)
    # [schedules, allocated]: each schedule's epsilon at each iteration, its last value repeated once it is done
    table = torch.tensor([[*s, *[s[-1]] * (allocated - len(s))] for s in schedules], dtype=torch.float32)
    row_schedule = torch.cat([problem_schedule, problem_schedule, problem_schedule, set_schedule])  # blocks A, C, B, D
    lengths = torch.tensor([len(s) for s in schedules])[row_schedule]
    eps = table[row_schedule].T.contiguous()  # [allocated, R]
    uniform = bool((lengths == total).all())
    active = (torch.arange(allocated)[:, None] < lengths[None, :]).unsqueeze(-1)  # [allocated, R, 1]
    eps, neg_eps, active = (t.to(device, non_blocking=True) for t in (eps, -eps, active))

    with torch.no_grad():
        f = _softmin(eps[0], neg_eps[0], neg_cost, log_w)
        if compiled:
            chunk, cost = _compiled_chunk(), neg_cost.detach()  # detached: guards on requires_grad would recompile
            for start in range(0, total, CHUNK):
                window = slice(start, start + CHUNK)
                f = chunk(f, partner, log_w, cost, eps[window], neg_eps[window], active[window])
        else:
            for i in range(steps):
                averaged = _iteration(f, partner, log_w, neg_cost, eps[i], neg_eps[i])
                f = averaged if uniform else torch.where(active[i], averaged, f)
    # each row's last step (its blur ** 2) again, now with the gradient of the cost (geomloss'
    # "last extrapolation"); the potentials it reads are constants
    e = eps[-1]
    final = _softmin(e, neg_eps[-1], neg_cost, torch.addcdiv(log_w, f[partner], e.view(-1, 1)))
    f_ba, f_aa, g_ab, g_bb = final.split([problems, problems, problems, sets])
    return (a * (f_ba - f_aa)).sum(1) + (b_p * (g_ab - g_bb[set_of_problem])).sum(1)
