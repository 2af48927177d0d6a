"""The lecture's first half: Markov processes, dynamic programming, model-free prediction, and PPO.

The tabular parts are exact numpy; ``prefalign.rl.ppo`` (torch, gymnasium) is imported on demand.
"""

from prefalign.rl.dp import DPResult, iterative_policy_evaluation, policy_iteration, value_iteration
from prefalign.rl.envs import gridworld_4x4, gridworld_5x5, random_walk, student_mdp, student_mrp
from prefalign.rl.mdp import MDP, MRP, Episode, MarkovChain, greedy_policy
from prefalign.rl.prediction import (
    discounted_returns,
    gradient_mc_linear,
    mc_prediction,
    rms_error,
    semi_gradient_td0_linear,
    td0_prediction,
    td_vs_mc_rms,
)

__all__ = [
    "MDP",
    "MRP",
    "DPResult",
    "Episode",
    "MarkovChain",
    "discounted_returns",
    "gradient_mc_linear",
    "greedy_policy",
    "gridworld_4x4",
    "gridworld_5x5",
    "iterative_policy_evaluation",
    "mc_prediction",
    "policy_iteration",
    "random_walk",
    "rms_error",
    "semi_gradient_td0_linear",
    "student_mdp",
    "student_mrp",
    "td0_prediction",
    "td_vs_mc_rms",
    "value_iteration",
]
