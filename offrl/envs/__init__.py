"""Simulator adapters behind one protocol (:class:`BatchedSim`), task registry and scripted experts."""

from offrl.envs.base import BatchedSim
from offrl.envs.maniskill import ManiSkillCPUSim, ManiSkillGPUSim, make_sim

__all__ = ["BatchedSim", "ManiSkillCPUSim", "ManiSkillGPUSim", "make_sim"]
