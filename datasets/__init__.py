"""Video data for the federated app: decoding, layouts, partitioning, synthetic data."""
