"""The ServerApp: run folder, round loop, checkpoints, results and the final report."""
