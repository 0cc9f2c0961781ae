"""An interrupted trial's copy is queued before the trial is failed, in serial and fused workers.

Failing it first gives its slot back with nothing queued: another worker polling at that moment
(``TrialBudget.next_slots``) fills the slot with a new point, and when that was the last slot the
copy stays queued past the budget. Each test records what is WAITING at the moment the trial's FAIL
is written, which is when the slot becomes free to the other workers.
"""

from __future__ import annotations

import pytest
import torch
from optuna.trial import TrialState

try:
    from ._tiny_study import write_tiny_study_yaml
except ImportError:  # tests/search_tests is not a package
    from _tiny_study import write_tiny_study_yaml

import search.fused_batch
import search.study
from search import load_study_config, open_study
from search.fused_batch import optimize_fused
from search.storage import ResilientRDBStorage


def _copies_waiting_at_each_fail(monkeypatch, study_name: str) -> dict[int, list[int]]:
    """{trial number: the ``failed_trial`` of every WAITING trial when that trial's FAIL was written}."""
    seen: dict[int, list[int]] = {}
    write = ResilientRDBStorage.set_trial_state_values

    def recording(self, trial_id, state, values=None):
        if state == TrialState.FAIL:
            study_id = self.get_study_id_from_name(study_name)
            waiting = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
            seen[self.get_trial(trial_id).number] = [t.system_attrs.get("failed_trial") for t in waiting]
        return write(self, trial_id, state, values)

    monkeypatch.setattr(ResilientRDBStorage, "set_trial_state_values", recording)
    return seen


class _InterruptedObjective:
    def __init__(self, config, prepared) -> None:
        pass

    def __call__(self, trial):
        raise KeyboardInterrupt


def _interrupted_study(tmp_path, name: str):
    torch.set_num_threads(1)
    return load_study_config(write_tiny_study_yaml(tmp_path, name=name, n_trials=3))


def test_a_serial_worker_queues_the_copy_before_its_trial_gives_back_its_slot(tmp_path, monkeypatch):
    config = _interrupted_study(tmp_path, "serial")
    seen = _copies_waiting_at_each_fail(monkeypatch, config.name)
    monkeypatch.setattr(search.study, "TrialObjective", _InterruptedObjective)
    with pytest.raises(KeyboardInterrupt):
        search.study.optimize(config, progress=False)
    assert seen == {0: [0]}  # before: {0: []}, the copy came after the FAIL
    trials = open_study(config, create=False).get_trials()
    assert [(t.state, t.params) for t in trials] == [(TrialState.FAIL, trials[0].params), (TrialState.WAITING, trials[0].params)]
    assert trials[0].user_attrs["fail_reason"].startswith("interrupted")


def test_a_fused_worker_queues_every_copy_before_its_trials_give_back_their_slots(tmp_path, monkeypatch):
    config = _interrupted_study(tmp_path, "fused")
    seen = _copies_waiting_at_each_fail(monkeypatch, config.name)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search.fused_batch, "train_fused", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optimize_fused(config, group_size=3, progress=False)
    assert seen == {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2]}
    trials = open_study(config, create=False).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.WAITING] * 3
