"""Offline datasets in ManiSkill's trajectory format: collect, read/write, import, merge, split, inspect.

The main entry point is :class:`OfflineDataset` (``OfflineDataset.load(path)``); see
:mod:`offrl.data.dataset` for the API used by pretraining and finetuning.
"""

from offrl.data.dataset import NormStats, OfflineDataset
from offrl.data.format import Episode, read_trajectories, write_trajectories

__all__ = ["Episode", "NormStats", "OfflineDataset", "read_trajectories", "write_trajectories"]
