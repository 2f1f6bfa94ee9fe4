"""Semantic segmentation of fundus photographs (vessels, lesions) and other 2-D images: U-Net over
any timm encoder, CLAHE and field-of-view handling, Dice+CE / focal / Tversky losses with an
ignore index and per-pixel weights, sliding-window inference with Gaussian blending and flip
TTA, metrics inside the field of view (Dice, IoU, sensitivity, specificity, pooled AUC-ROC and
AUPR), MoCo v2 / SimCLR pretraining of the encoder (`podium pretrain`).

Conventions shared by every module of this family:
- label maps are int64 class ids; `ignore_index` (default 255) marks pixels that never count;
  binary vessel segmentation is 2 classes (0 background, 1 vessel);
- the field of view (FOV) is a bool map, True inside the camera aperture; pixels outside it
  count in no loss and no metric;
- label maps are resized with nearest neighbour only.
"""

from podium.tasks.segmentation import (  # noqa: F401
    data,
    inference,
    lens,
    losses,
    metrics,
    mixing,
    models,
    pretrain,
    rare_class,
    readers,
    synthetic,
    task,
    uda,
)
