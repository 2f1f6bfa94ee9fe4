"""Accelerated multi-coil MRI reconstruction (fastMRI / SNU challenge): readers, undersampling
masks, a k-space simulator, E2E-VarNet and FI-VarNet (with LSKA), leaderboard-exact SSIM.

Conventions shared by every module of this family:
- numpy k-space per slice is complex64 `(coils, H, W)`: H = readout rows, W = phase-encode
  columns; undersampling masks select columns (the last axis).
- torch tensors carry complex data as real with a trailing dimension of 2 (fastMRI layout):
  k-space `(B, coils, H, W, 2)`, masks `(B, 1, 1, W, 1)`.
- the centred orthonormal FFT of `fft.py` maps image to k-space; every dataset scales a sample
  by the maximum of its zero-filled image (see data.make_sample).
"""

from podium.tasks.reconstruction import data, losses, models, simulated_data, task  # noqa: F401
from podium.tasks.reconstruction import sigpy_recon  # noqa: F401  (models sense, cs_l1wavelet, cs_tv)
