"""Datasets in their native on-disk formats, each a source for :class:`MergedDataModule`."""
