"""Aggregation rules, one per file; each registers itself (``strategies.stage.register``)."""
