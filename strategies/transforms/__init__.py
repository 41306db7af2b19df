"""Transforms of the round's updates before aggregation, one per file; each registers itself."""
