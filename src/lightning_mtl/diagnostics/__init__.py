"""Negative-transfer diagnostics and run plots: inter-task affinity by look-ahead (Fifty et al.
2021), task-grouping suggestions, gradient-cosine statistics, and PNG figures drawn from a run's
``csv/metrics.csv``."""
