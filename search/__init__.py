"""The Optuna side: study config, search space, samplers, trial objective, Pareto picks, export."""

from search.config import StudyConfig, load_study_config
from search.export import export_trial, trial_train_config
from search.pareto import PickError, front_table, pareto_trials, pick_trial
from search.study import open_study, optimize

__all__ = [
    "PickError",
    "StudyConfig",
    "export_trial",
    "front_table",
    "load_study_config",
    "open_study",
    "optimize",
    "pareto_trials",
    "pick_trial",
    "trial_train_config",
]
