"""pymerge: fast, trustworthy model merging."""
from pymerge.ops import weighted_sum, weighted_sum_many

__version__ = "0.1.0"
__all__ = ["weighted_sum", "weighted_sum_many", "__version__"]
