"""Fused merge ops: each takes tensors, checks them once and dispatches to a backend."""
from pymerge.ops.weighted_sum import weighted_sum, weighted_sum_many

__all__ = ["weighted_sum", "weighted_sum_many"]
