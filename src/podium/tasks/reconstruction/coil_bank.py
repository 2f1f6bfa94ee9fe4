"""Coil sensitivity maps measured on real scans, for the simulator.

A network trained on simulated k-space learns the coil geometry it is shown. Analytic surface
coils (simulate.coil_maps) are easier to unfold than a real head array: a VarNet trained on them
loses about 0.05 SSIM when the same image is simulated with the maps of the real ESPIRiT scan
instead. This module estimates maps from the calibration block of real scans — the fully
sampled centre columns that every undersampled acquisition carries, so no fully sampled scan is
needed — and hands the simulator randomly moved, flipped and scaled copies of them.

    bank = CoilMapBank.from_files(["../shared/data/mri/espirit_brain_8ch.mat"])
    maps = bank.draw((320, 256), np.random.default_rng(0))   # (8, 320, 256) complex64

Maps of a calibration block are low-resolution images, periodic with the field of view; on the
simulator's wide canvas they are therefore tiled, which reproduces what the calibration data of
a fold-over scan measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from podium.errors import UserError


def calibration_block(kspace: np.ndarray, fraction: float) -> tuple[int, int]:
    """[start, stop) of the centred calibration columns (the SNU / fastMRI centre block)."""
    width = kspace.shape[-1]
    n = max(2, int(round(width * fraction)))
    start = (width - n + 1) // 2
    block = kspace[..., start:start + n]
    if not np.all(np.abs(block).sum(axis=(0, 1)) > 0):
        raise UserError(f"the centre {n} columns of this k-space are not all sampled: "
                        f"no calibration block of fraction {fraction}.")
    return start, start + n


def _fill_background(maps: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Extend the maps smoothly outside the object (normalised convolution), where the scan had
    no signal but a simulated head may have some."""
    out = maps.copy()
    missing = ~support
    weight = support.astype(np.float64)
    for sigma in (6.0, 24.0, 96.0):
        if not missing.any():
            break
        norm = ndimage.gaussian_filter(weight, sigma, mode="wrap")
        ok = missing & (norm > 1e-3)
        def blur(part: np.ndarray) -> np.ndarray:
            return ndimage.gaussian_filter(part * weight, sigma, mode="wrap") / np.maximum(norm, 1e-12)

        for c in range(maps.shape[0]):
            out[c][ok] = (blur(maps[c].real) + 1j * blur(maps[c].imag))[ok]
        missing &= ~ok
    return out


def calibration_maps(kspace: np.ndarray, fraction: float = 0.08, threshold: float = 0.05) -> np.ndarray:
    """Coil maps (C, H, W) of unit root-sum-of-squares from a scan's calibration block.

    The block is Hann-windowed (classical.estimate_sensitivities); where the low-resolution image
    is below `threshold` of its maximum the maps are extrapolated from the object's edge."""
    from podium.tasks.reconstruction.classical import estimate_sensitivities

    start, stop = calibration_block(kspace, fraction)
    maps = estimate_sensitivities(kspace, (start, stop), threshold=threshold).astype(np.complex128)
    support = np.abs(maps).sum(0) > 0
    maps = _fill_background(maps, support)
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True) + 1e-12)).astype(np.complex64)


class CoilMapBank:
    """Real coil-map sets, drawn with random flips, shifts and scale for each simulated slice."""

    def __init__(self, map_sets: Sequence[np.ndarray], names: Sequence[str] = (), shift: float = 0.1,
                 zoom: tuple[float, float] = (0.9, 1.15)):
        if not map_sets:
            raise UserError("a coil map bank needs at least one set of maps.")
        coils = {m.shape[0] for m in map_sets}
        if len(coils) != 1:
            raise UserError(f"coil map sets disagree on the number of coils: {sorted(coils)}.")
        self.map_sets, self.names = list(map_sets), list(names)
        self.shift, self.zoom = shift, zoom

    @property
    def num_coils(self) -> int:
        return self.map_sets[0].shape[0]

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], fraction: float = 0.08, axes: str = "auto") -> CoilMapBank:
        from podium.tasks.reconstruction.rawfiles import read_kspace_file

        sets = []
        for path in paths:
            if not Path(path).exists() and not Path(path).with_suffix(".cfl").exists():
                raise UserError(f"data.coil_maps: {path} not found.")
            try:
                sets.append(calibration_maps(read_kspace_file(path, axes=axes), fraction))
            except UserError as err:
                raise UserError(f"data.coil_maps: {path}: {err}") from None
        return cls(sets, [str(p) for p in paths])

    def draw(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """One map set resampled to `shape` (H, W), randomly flipped, zoomed and shifted."""
        maps = self.map_sets[int(rng.integers(len(self.map_sets)))]
        h, w = shape
        scale = rng.uniform(*self.zoom)
        factors = (1.0, h * scale / maps.shape[1], w * scale / maps.shape[2])
        # maps are smooth: linear interpolation of real and imaginary parts is enough
        resized = ndimage.zoom(maps.real, factors, order=1) + 1j * ndimage.zoom(maps.imag, factors, order=1)
        resized = _centre_wrap(resized, (h, w))
        if rng.random() < 0.5:
            resized = resized[:, ::-1]
        if rng.random() < 0.5:
            resized = resized[:, :, ::-1]
        dy, dx = (int(round(rng.uniform(-self.shift, self.shift) * n)) for n in (h, w))
        resized = np.roll(resized, (dy, dx), axis=(1, 2))
        resized = resized * np.exp(1j * rng.uniform(0, 2 * np.pi))  # the receiver's global phase
        return np.ascontiguousarray(resized, dtype=np.complex64)


def _centre_wrap(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crop, or periodically extend, to `shape` around the centre (calibration maps are periodic)."""
    h, w = shape
    rows = (np.arange(h) - h // 2 + maps.shape[1] // 2) % maps.shape[1]
    cols = (np.arange(w) - w // 2 + maps.shape[2] // 2) % maps.shape[2]
    return maps[:, rows][:, :, cols]


def tile_to_canvas(maps: np.ndarray, canvas_width: int) -> np.ndarray:
    """FOV-periodic maps (C, H, W) on a canvas `canvas_width` wide, aligned as simulate.fold
    aligns the canvas with the FOV (canvas centre on FOV centre)."""
    width = maps.shape[-1]
    offset = (canvas_width - width) // 2
    return maps[..., (np.arange(canvas_width) - offset) % width]
