"""Speculation policies: which proposer and how many candidates, per running request and step.

- base.py: the Policy interface, `none` and `fixed`;
- smartspec.py: the goodput policies (`smartspec`, the default, and `batch-uniform`), built on
  goodput.py (the chooser), acceptance.py and tree_acceptance.py (acceptance estimates) and
  cost_model.py (the step-time model);
- batch_size.py: the batch-size switches (`disable-by-batch-size`, `batch-size-table`).

This package imports no grpc and nothing of the engine: it sees requests and steps through
scheduler_svc/types.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from scheduler_svc.policy.base import FixedPolicy, NoSpeculationPolicy, Policy
from scheduler_svc.policy.batch_size import BatchSizeTablePolicy, DisableByBatchSizePolicy
from scheduler_svc.policy.smartspec import BatchUniformPolicy, SmartSpecPolicy

if TYPE_CHECKING:
    from scheduler_svc.config import SchedulerConfig

__all__ = ["Policy", "make_policy", "policy_from_config"]


def make_policy(name: str, proposers: Sequence[str], k: int, **options) -> Policy:
    """The policy called `name` (see config.POLICIES); `options` are the keyword arguments of its class
    (smartspec / batch-uniform: max_k, ema_alpha, cost_window, max_tree_nodes;
    disable-by-batch-size: threshold;
    batch-size-table: table)."""
    if name == "none":
        return NoSpeculationPolicy()
    if name == "fixed":
        return FixedPolicy(proposers, k)
    if name == "smartspec":
        return SmartSpecPolicy(proposers, **options)
    if name == "batch-uniform":
        return BatchUniformPolicy(proposers, **options)
    if name == "disable-by-batch-size":
        return DisableByBatchSizePolicy(proposers, k, **options)
    if name == "batch-size-table":
        return BatchSizeTablePolicy(proposers, **options)
    raise ValueError(f"unknown policy {name!r}")


def policy_from_config(config: SchedulerConfig, proposers: Sequence[str]) -> Policy:
    """The policy a scheduler configuration asks for, with the flags that policy reads."""
    options: dict = {}
    if config.policy in ("smartspec", "batch-uniform"):
        options = dict(max_k=config.max_k, ema_alpha=config.ema_alpha, cost_window=config.cost_window,
                       max_tree_nodes=config.max_tree_nodes)
    elif config.policy == "disable-by-batch-size":
        options = dict(threshold=config.disable_batch_size)
    elif config.policy == "batch-size-table":
        options = dict(table=config.batch_size_table)
    return make_policy(config.policy, proposers, config.k, **options)
