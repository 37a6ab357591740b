"""Helpers of the entry points: config printing, instantiation of callbacks and loggers."""
