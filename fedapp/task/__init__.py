"""The ML task both sides share: the validated run config, model zoo, devices, data wiring, training."""
