"""Server optimizers (``server-optimizer``), one per file; each registers itself."""
