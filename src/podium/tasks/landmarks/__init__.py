"""Anatomical landmark detection (ISBI 2015 cephalometric X-rays): heatmap regression with
coarse-to-fine refinement, MRE/SDR in millimetres of the original image.

Conventions shared by every module of this family:
- points are (x, y) in pixels, float, with pixel centres at integer coordinates: x = 0 is the
  centre of the first column (the convention of torchvision's KeyPoints and of the challenge
  CSVs, whose integer coordinates name pixels).
- `Letterbox` (geometry.py) records the resize and pad from the original image to the network
  input; every prediction is mapped back through it before any metric is computed.
- a dataset item is a dict of tensors: image (C, H, W) float32, points (K, 2) float32 in input
  pixels, visible (K,) bool, index () int64, letterbox (5,) float64 [scale, pad_x, pad_y,
  orig_w, orig_h], spacing (2,) float64 mm per pixel (x, y).
"""

from podium.tasks.landmarks import data, losses, metrics, models, refine, synthetic, task  # noqa: F401,E402
