"""Backbone, heads and losses: the shared and the task-specific layers of a multi-task model."""
