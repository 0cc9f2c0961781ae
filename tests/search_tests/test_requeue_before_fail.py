"""An interrupted trial's copy is queued before the trial is failed, in serial and fused workers,
and a copy that cannot be queued does not keep the trial RUNNING.

Failing it first gives its slot back with nothing queued: another worker polling at that moment
(``TrialBudget.next_slots``) fills the slot with a new point, and when that was the last slot the
copy stays queued past the budget. Each test records what is WAITING at the moment the trial's FAIL
is written, which is when the slot becomes free to the other workers.
"""

from __future__ import annotations

import signal

import pytest
import torch
import yaml
from optuna.trial import TrialState

try:
    from ._tiny_study import write_tiny_study_yaml
except ImportError:  # tests/search_tests is not a package
    from _tiny_study import write_tiny_study_yaml

import search.fused_batch
import search.study
import search.workers
from search import load_study_config, open_study
from search.fused_batch import optimize_fused
from search.storage import ResilientRDBStorage, make_storage
from search.workers import TrialBudget


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


def _interrupted_study(tmp_path, name: str, *, heartbeats: bool = True):
    torch.set_num_threads(1)
    path = write_tiny_study_yaml(tmp_path, name=name, n_trials=3)
    if not heartbeats:
        data = yaml.safe_load(path.read_text())
        data["distributed"]["heartbeat_interval"] = None
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_study_config(path)


def _interrupted_training(*args, **kwargs):  # a Ctrl-C in the middle of a fused batch
    raise KeyboardInterrupt


def _storage_refuses(*args, **kwargs):
    raise RuntimeError("database is read-only")


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


def test_a_serial_trial_the_storage_could_not_mark_interrupted_is_still_copied(tmp_path, monkeypatch):
    """The storage fails while ``wrap`` marks and copies the interrupted trial, then comes back for
    Optuna's FAIL: the trial carries no ``fail_reason``, and the worker, which saw the interrupt,
    still queues its copy on the way out."""
    config = _interrupted_study(tmp_path, "serial-unmarked")
    monkeypatch.setattr(search.study, "TrialObjective", _InterruptedObjective)
    set_attr = ResilientRDBStorage.set_trial_user_attr

    def refusing_the_mark(self, trial_id, key, value):
        if key == "fail_reason":
            raise RuntimeError("connection lost")
        return set_attr(self, trial_id, key, value)

    monkeypatch.setattr(ResilientRDBStorage, "set_trial_user_attr", refusing_the_mark)
    with pytest.raises(KeyboardInterrupt):
        search.study.optimize(config, progress=False)
    trials = open_study(config, create=False).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # before: no copy
    assert "fail_reason" not in trials[0].user_attrs
    assert trials[1].params == trials[0].params and trials[1].system_attrs["failed_trial"] == 0


def test_a_fused_worker_queues_every_copy_before_its_trials_give_back_their_slots(tmp_path, monkeypatch):
    config = _interrupted_study(tmp_path, "fused")
    seen = _copies_waiting_at_each_fail(monkeypatch, config.name)

    monkeypatch.setattr(search.fused_batch, "train_fused", _interrupted_training)
    with pytest.raises(KeyboardInterrupt):
        optimize_fused(config, group_size=3, progress=False)
    assert seen == {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2]}
    trials = open_study(config, create=False).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.WAITING] * 3


def test_a_fused_trial_failed_elsewhere_meanwhile_does_not_cost_the_others_their_copies(tmp_path, monkeypatch):
    """Trial 0's heartbeat was late and another worker failed it (and re-queued it there); then the
    batch is interrupted: trials 1 and 2 are still copied before they are failed."""
    config = _interrupted_study(tmp_path, "fused-lost")

    def failed_elsewhere_then_interrupted(*args, **kwargs):
        storage = make_storage(config.storage_url, config.distributed)
        study_id = storage.get_study_id_from_name(config.name)
        storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, 0), TrialState.FAIL)
        raise KeyboardInterrupt

    monkeypatch.setattr(search.fused_batch, "train_fused", failed_elsewhere_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        optimize_fused(config, group_size=3, progress=False)
    trials = open_study(config, create=False).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.WAITING] * 2
    assert [t.system_attrs["failed_trial"] for t in trials[3:]] == [1, 2]


def _running_trial_of_a_worker(tmp_path, name: str, *, heartbeats: bool = True):
    config = _interrupted_study(tmp_path, name, heartbeats=heartbeats)
    study = open_study(config)
    budget = TrialBudget(study, config, target=3)
    trial = study.ask()
    budget.claim(trial)  # its parameters sampled, as under the lock
    budget.current = trial._trial_id
    return config, study, budget, trial


def test_abandon_queues_the_copy_before_it_fails_the_trial(tmp_path, monkeypatch):
    """An interrupt that lands outside the objective (where ``wrap`` cannot queue the copy)."""
    config, study, budget, trial = _running_trial_of_a_worker(tmp_path, "abandoned")
    seen = _copies_waiting_at_each_fail(monkeypatch, config.name)
    budget.abandon()
    assert seen == {trial.number: [trial.number]}
    states = [(t.state, t.params) for t in open_study(config, create=False).get_trials()]
    assert states == [(TrialState.FAIL, trial.params), (TrialState.WAITING, trial.params)]


@pytest.mark.parametrize("heartbeats", [True, False], ids=["heartbeats", "no-heartbeats"])
def test_a_trial_abandon_cannot_copy_is_left_to_heartbeats_or_failed(tmp_path, monkeypatch, heartbeats):
    """With heartbeats, another worker fails the trial later and re-queues it (failed here, it
    would never be copied); without, nobody would, and it would hold a budget slot for good."""
    config, study, budget, trial = _running_trial_of_a_worker(tmp_path, "uncopied", heartbeats=heartbeats)
    monkeypatch.setattr(search.workers, "requeue_interrupted", _storage_refuses)
    budget.abandon()
    (stored,) = open_study(config, create=False).get_trials()
    assert stored.state == (TrialState.RUNNING if heartbeats else TrialState.FAIL)
    assert stored.user_attrs["fail_reason"].startswith("interrupted")


@pytest.mark.parametrize("heartbeats", [True, False], ids=["heartbeats", "no-heartbeats"])
def test_fused_trials_that_cannot_be_copied_are_left_to_heartbeats_or_failed(tmp_path, monkeypatch, heartbeats):
    config = _interrupted_study(tmp_path, "fused-uncopied", heartbeats=heartbeats)

    monkeypatch.setattr(search.fused_batch, "train_fused", _interrupted_training)
    monkeypatch.setattr(search.fused_batch, "requeue_interrupted", _storage_refuses)
    with pytest.raises(KeyboardInterrupt):
        optimize_fused(config, group_size=3, progress=False)
    states = [t.state for t in open_study(config, create=False).get_trials()]
    assert states == [TrialState.RUNNING if heartbeats else TrialState.FAIL] * 3


def test_an_interrupt_while_a_dead_workers_trial_is_failed_and_copied_waits_for_the_copy(tmp_path, monkeypatch):
    """A Ctrl-C that lands between the FAIL of a dead worker's trial and its copy (under the study
    lock, before this worker starts a trial) is held back until the copy is queued."""
    config = _interrupted_study(tmp_path, "dead-then-interrupted")
    budget = TrialBudget(open_study(config), config, target=3)
    copied: list[bool] = []

    def signalled_between_fail_and_copy(study, storage):
        signal.raise_signal(signal.SIGINT)
        copied.append(True)
        return []

    monkeypatch.setattr(search.workers, "fail_dead_trials", signalled_between_fail_and_copy)
    try:
        slots = budget.next_slots(1)
    except KeyboardInterrupt:  # before: it landed between the two
        slots = None
    assert copied == [True] and slots == 1
    with pytest.raises(KeyboardInterrupt):  # delivered once the lock is let go
        budget.release()
    assert not budget.lock.held and signal.getsignal(signal.SIGINT) is signal.default_int_handler
