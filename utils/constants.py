"""Named constants shared by every part of the framework."""

IGNORE_INDEX = 255  # label value excluded from losses and metrics (VOC object boundaries)
BACKGROUND = 0  # class index of the background in every dataset and step
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
