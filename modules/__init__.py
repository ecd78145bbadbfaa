"""Network blocks: normalisation layers, residual blocks, DeepLab-v3 heads, per-step classifiers, small helpers."""
