"""Network blocks: DeepLab-v3 head, residual blocks, small helpers."""
from modules.deeplab import DeeplabV3
from modules.misc import GlobalAvgPool2d, try_index
from modules.residual import ResidualBlock

__all__ = ["DeeplabV3", "GlobalAvgPool2d", "ResidualBlock", "try_index"]
