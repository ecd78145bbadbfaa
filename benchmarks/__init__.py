"""Speed measurements (``python -m benchmarks.train_step|data_loader|evaluation``); never timed tests."""
