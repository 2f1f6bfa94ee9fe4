"""Image classification: timm backbones, heavy augmentation, focal/asymmetric losses, macro-F1.

Importing this package registers its datasets (digits, image_folder, csv), models (small_cnn,
timm), losses (cross_entropy, weighted_ce, focal, asymmetric), metrics and the task.
"""

from podium.tasks.classification import data, losses, metrics, models, task  # noqa: F401
