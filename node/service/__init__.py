"""`neuronode serve`: the node (node.py), its study worker processes (workers.py), the spool
lock that decides which node processes may share a spool (lock.py), and the backoff of its
loops (backoff.py)."""

from node.pipeline.worker import TEST_DELAY_ENV
from node.service.backoff import RepeatedError
from node.service.lock import lock_spool, prepare_spool_dir
from node.service.node import ALL_ROLES, Node, Role, pipeline_processor
from node.service.workers import Processor

__all__ = [
    "ALL_ROLES",
    "TEST_DELAY_ENV",
    "Node",
    "Processor",
    "RepeatedError",
    "Role",
    "lock_spool",
    "pipeline_processor",
    "prepare_spool_dir",
]
