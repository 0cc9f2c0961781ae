"""Patches that put a real training run into states that are rare in a tiny one: epochs that
predict one class, and a finite loss with a NaN gradient."""

import importlib

import torch

import objectives


def predict_one_class_in(epochs, monkeypatch, module=None, name="_predict"):
    """Patch ``module.name`` (the per-epoch validation scoring) so that the listed epochs predict
    one class: their scores are mapped into [0.5, 1] in order, so AUC is unchanged but every
    prediction is "fake" and every fairness gap 0. Returns the list of epochs seen so far; clear
    it before another run."""
    module = module or importlib.import_module("model.train")  # (the package exports a function of that name)
    predict, seen = getattr(module, name), []

    def patched(*args, **kwargs):
        seen.append(len(seen) + 1)
        scores, gates = predict(*args, **kwargs)
        return (0.5 + 0.5 * scores if seen[-1] in epochs else scores), gates

    monkeypatch.setattr(module, name, patched)
    return seen


def nan_gradient_at_call(n: int, monkeypatch):
    """objectives.fairness_loss whose n-th call returns its true (finite) value with a NaN gradient,
    as an overflowing Sinkhorn backward would: d sqrt(x)/dx at 0 is inf, times 0 is NaN."""
    real, calls = objectives.fairness_loss, []

    def poisoned(scores, *args, **kwargs):
        calls.append(1)
        value = real(scores, *args, **kwargs)
        return value + torch.sqrt(scores * 0).sum() if len(calls) == n else value

    monkeypatch.setattr(objectives, "fairness_loss", poisoned)

