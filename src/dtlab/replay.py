"""The Online Decision Transformer's replay buffer lives in dtlab.online, beside the stage that
fills it; its names stay importable from here for code written before."""

from dtlab.online import OFFLINE, ONLINE, ReplayBuffer, Trajectory, rollout_trajectories

__all__ = ["OFFLINE", "ONLINE", "ReplayBuffer", "Trajectory", "rollout_trajectories"]
