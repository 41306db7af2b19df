"""Federated video classification with Flower and PyTorch."""
