"""Classical parallel-imaging baselines: zero filling, GRAPPA, coil maps, CG-SENSE, LS scaling.

The floor and the fair non-learned comparisons for the reconstruction benchmark:

- `zero_filled`: root-sum-of-squares (RSS) of the inverse FFT of the masked k-space.
- `grappa`: Griswold et al. 2002, "Generalized autocalibrating partially parallel acquisitions
  (GRAPPA)", Magn. Reson. Med. 47:1202. Each missing phase-encode column is a linear combination
  of its acquired neighbours (all coils, a few readout rows, a few acquired columns), with
  weights fitted on the fully sampled calibration (ACS) block. It needs no coil maps, so FOV
  folding (the ESPIRiT slice: Uecker et al. 2014, "ESPIRiT", Magn. Reson. Med. 71:990) does not
  break it the way it breaks one-map SENSE; its limit there is noise amplification.
- `estimate_sensitivities`: one set of low-resolution maps from the ACS block, each coil image
  divided by the RSS (the simple estimate that the ESPIRiT paper shows failing under folding).
- `sense`: CG-SENSE (Pruessmann et al. 2001, "Advances in sensitivity encoding with arbitrary
  k-space trajectories", Magn. Reson. Med. 46:638) with Tikhonov regularisation.
- `ls_scale`: least-squares scaling of a reconstruction to the reference before SSIM.

Conventions of the family: k-space is complex (coils, H, W), H = readout rows, W = phase-encode
columns; masks select columns; FFTs are centred and orthonormal.

    import numpy as np
    from podium.tasks.reconstruction.classical import grappa, zero_filled, ls_scale
    kspace = np.random.randn(8, 64, 64) + 1j * np.random.randn(8, 64, 64)
    mask = np.zeros(64, bool); mask[1::4] = True; mask[28:36] = True
    filled = grappa(kspace * mask, mask, acs=(28, 36))
    image = zero_filled(filled, np.ones(64, bool))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from podium.errors import UserError

# --------------------------------------------------------------------------------------------
# Centred orthonormal FFTs (local copies: the family's fft.py is written in parallel)
# --------------------------------------------------------------------------------------------

_AXES = (-2, -1)


def _fft2c(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=_AXES), norm="ortho"), axes=_AXES)


def _ifft2c(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(x, axes=_AXES), norm="ortho"), axes=_AXES)


def _rss(images: np.ndarray) -> np.ndarray:
    return np.sqrt((np.abs(images) ** 2).sum(axis=0))


def _check_kspace_mask(kspace: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    kspace, mask = np.asarray(kspace), np.asarray(mask).astype(bool)
    if kspace.ndim != 3:
        raise UserError(f"k-space must be (coils, H, W), got shape {kspace.shape}")
    if mask.shape != (kspace.shape[-1],):
        raise UserError(f"mask must be (W,) = ({kspace.shape[-1]},) over phase columns, "
                        f"got shape {mask.shape}")
    return kspace, mask


def zero_filled(kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RSS image (H, W) of the inverse FFT of `kspace` (C, H, W) with unsampled columns zeroed."""
    kspace, mask = _check_kspace_mask(kspace, mask)
    return _rss(_ifft2c(kspace * mask))


# --------------------------------------------------------------------------------------------
# GRAPPA
# --------------------------------------------------------------------------------------------


def _acs_bounds(acs, mask: np.ndarray) -> tuple[int, int]:
    """(start, stop) of the calibration block: a slice, a pair, or None (the longest run of
    sampled columns)."""
    width = mask.shape[0]
    if acs is None:
        # The longest run of consecutive sampled columns is the fully sampled centre.
        edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if starts.size == 0:
            raise UserError("the mask samples no column, so there is no calibration block")
        longest = np.argmax(stops - starts)
        return int(starts[longest]), int(stops[longest])
    if isinstance(acs, slice):
        start, stop, step = acs.indices(width)
        if step != 1:
            raise UserError(f"acs must be a contiguous slice of columns, got step {step}")
    else:
        start, stop = (int(v) for v in acs)
    if not 0 <= start < stop <= width:
        raise UserError(f"acs columns ({start}, {stop}) must satisfy 0 <= start < stop <= W "
                        f"= {width}")
    if not mask[start:stop].all():
        raise UserError(f"acs columns ({start}, {stop}) are not all sampled in the mask")
    return start, stop


def _lattice(mask: np.ndarray, start: int, stop: int, acceleration: int | None) -> tuple[int, int]:
    """(R, offset) of the equispaced lattice, read from the sampled columns outside the ACS block.

    The most common gap between consecutive sampled columns is R (the gap across the centre block
    is a multiple of it or an outlier); the most common residue modulo R is the offset.
    """
    outside = np.flatnonzero(mask)
    outside = outside[(outside < start) | (outside >= stop)]
    if acceleration is None:
        if outside.size < 2:
            raise UserError("cannot infer the acceleration: fewer than two sampled columns outside "
                            "the calibration block; pass acceleration=R")
        acceleration = int(np.bincount(np.diff(outside)).argmax())
    if acceleration < 1:
        raise UserError(f"acceleration must be a positive integer, got {acceleration}")
    if outside.size == 0:
        return acceleration, start % acceleration
    return acceleration, int(np.bincount(outside % acceleration).argmax())


def _source_offsets(distance: int, acceleration: int, lines: int) -> np.ndarray:
    """Column offsets (relative to the target) of the `lines` lattice columns nearest to a target
    lying `distance` columns above a lattice column; ties go to the lower side."""
    candidates = -distance + acceleration * np.arange(-lines, lines + 1)
    order = np.lexsort((candidates > 0, np.abs(candidates)))
    return np.sort(candidates[order[:lines]])


def _gather_sources(padded: np.ndarray, columns: np.ndarray, offsets: np.ndarray, height: int,
                    kernel_readout: int) -> np.ndarray:
    """Source matrix (H * len(columns), C * kernel_readout * len(offsets)) for target `columns` of
    `padded` (C, H + kernel_readout - 1, ...) whose column index is already shifted for padding."""
    coils = padded.shape[0]
    picked = padded[:, :, columns[:, None] + offsets[None, :]]  # (C, H + pad, n_targets, n_lines)
    rows = [picked[:, shift:shift + height] for shift in range(kernel_readout)]
    sources = np.stack(rows, axis=1)  # (C, kernel_readout, H, n_targets, n_lines)
    sources = sources.transpose(2, 3, 0, 1, 4)  # (H, n_targets, C, kernel_readout, n_lines)
    return sources.reshape(height * columns.size, coils * kernel_readout * offsets.size)


def _calibration_system(acs_block: np.ndarray, offsets: np.ndarray,
                        kernel_readout: int) -> tuple[np.ndarray, np.ndarray]:
    """Sources (positions, H, n_sources) and targets (positions, H, C) for every target position
    of the ACS block whose sources fall inside it."""
    _, height, width = acs_block.shape
    reach = np.concatenate([offsets, [0]])
    targets = np.arange(-reach.min(), width - reach.max())
    half = kernel_readout // 2
    padded = np.pad(acs_block, ((0, 0), (half, kernel_readout - 1 - half), (0, 0)))
    sources = _gather_sources(padded, targets, offsets, height, kernel_readout)
    sources = sources.reshape(height, targets.size, -1).transpose(1, 0, 2)
    wanted = acs_block[:, :, targets].transpose(2, 1, 0)
    return sources, wanted


def _ridge_solve(gram: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    """Solve (gram + ridge I) w = rhs for one system or a stack of them in one batched call
    (numpy's batched solve: many small scipy calls are slow when OpenBLAS threads contend)."""
    return np.linalg.solve(gram + ridge * np.eye(gram.shape[-1]), rhs)


def _calibrate(sources: np.ndarray, wanted: np.ndarray, lamdas: np.ndarray) -> np.ndarray:
    """GRAPPA weights (n_sources, C) by Tikhonov-regularised least squares.

    lamda is relative to the mean eigenvalue of the Gram matrix (its trace / size), so one value
    suits any data scale (the convention of Lustig's and pygrappa's GRAPPA codes). With several
    lamdas, the one with the least leave-one-position-out error on the ACS block wins: that error
    includes the noise the weights amplify, which the training residual hides. Each held-out
    position's error is relative to its energy, so the few high-energy positions next to the
    k-space centre (high SNR, where little regularisation is needed) do not outvote the rest.
    """
    adjoint = sources.conj().transpose(0, 2, 1)
    per_position_gram, per_position_rhs = adjoint @ sources, adjoint @ wanted
    gram, rhs = per_position_gram.sum(axis=0), per_position_rhs.sum(axis=0)
    scale = np.trace(gram).real / gram.shape[0]
    best = lamdas[0]
    if lamdas.size > 1 and sources.shape[0] > 1:
        energy = np.maximum((np.abs(wanted) ** 2).sum(axis=(1, 2)), np.finfo(float).tiny)
        errors = []
        for lamda in lamdas:
            weights = _ridge_solve(gram - per_position_gram, rhs - per_position_rhs, lamda * scale)
            misses = (np.abs(sources @ weights - wanted) ** 2).sum(axis=(1, 2))
            errors.append((misses / energy).sum())
        best = lamdas[int(np.argmin(errors))]
    return _ridge_solve(gram, rhs, best * scale)


# Candidates for `grappa(..., lamda=GRAPPA_LAMDA_CANDIDATES)`. On the real ESPIRiT slice (8 coils
# whose profiles vary little across the phase direction, 20 ACS lines) the usual lamda = 0.01
# amplifies noise so much that GRAPPA scores below zero filling (SSIM 0.51 vs 0.74 at R = 4,
# 0.42 vs 0.70 at R = 8); letting the ACS cross-validation pick from these gives 0.77 / 0.69.
GRAPPA_LAMDA_CANDIDATES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def grappa(kspace: np.ndarray, mask: np.ndarray, acs: slice | tuple[int, int] | None = None,
           kernel: tuple[int, int] = (5, 4),
           lamda: float | Sequence[float] = 0.01, acceleration: int | None = None) -> np.ndarray:
    """Fill the missing phase columns of 1-D equispaced undersampled k-space by GRAPPA.

    kspace: (C, H, W) complex, zeros where not sampled; mask: (W,) bool, an equispaced lattice
    (step R, any offset) plus a fully sampled centre block. acs: the calibration columns, a slice
    or (start, stop); None takes the longest run of sampled columns. kernel: (readout rows,
    acquired phase lines) of the source kernel. lamda: Tikhonov weight relative to the mean
    eigenvalue of the calibration Gram matrix, or several candidates, of which each offset class
    takes the one with the least leave-one-position-out error on the ACS block (no reference
    needed; see GRAPPA_LAMDA_CANDIDATES). acceleration: R, inferred from the mask (the most
    common gap between sampled columns outside the ACS block) if None.

    Returns the filled k-space (C, H, W) in the input's dtype; sampled columns are kept exactly.
    The lattice (the columns at offset + k R) provides the sources; centre lines off the lattice
    are kept but not used as sources. For each distance d = 1..R-1 of a target above its lattice
    line, one set of weights is fitted on the ACS block and applied to every missing column at
    that distance whose sources are sampled (columns beyond the k-space edge count as zeros);
    a missing column whose sources are not all sampled stays zero.
    When the ACS block is too narrow for `kernel[1]` lines at this R, fewer lines are used: the
    most for which the calibration has at least as many equations as unknowns.
    """
    kspace, mask = _check_kspace_mask(kspace, mask)
    kernel_readout, kernel_phase = (int(k) for k in kernel)
    if kernel_readout < 1 or kernel_phase < 1:
        raise UserError(f"kernel must be (readout rows, phase lines) >= 1, got {kernel}")
    lamdas = np.atleast_1d(np.asarray(lamda, dtype=float))
    if lamdas.ndim != 1 or lamdas.size == 0 or (lamdas < 0).any():
        raise UserError(f"lamda must be a non-negative number or a list of them, got {lamda!r}")
    coils, height, width = kspace.shape
    start, stop = _acs_bounds(acs, mask)
    step, offset = _lattice(mask, start, stop, acceleration)

    sampled = np.where(mask, kspace, 0).astype(np.complex128)
    filled = sampled.copy()
    acs_block = sampled[:, :, start:stop]
    columns = np.arange(width)
    margin = step * (kernel_phase + 1)
    half = kernel_readout // 2
    padded = np.pad(sampled, ((0, 0), (half, kernel_readout - 1 - half), (margin, margin)))
    # A column outside the k-space is a zero that is "sampled" (zero padding at the edges).
    known = np.pad(mask, margin, constant_values=True)

    for distance in range(1, step):
        targets = columns[~mask & ((columns - offset) % step == distance)]
        if targets.size == 0:
            continue
        for lines in range(kernel_phase, 0, -1):
            offsets = _source_offsets(distance, step, lines)
            reach = np.concatenate([offsets, [0]])
            positions = (stop - start) - (reach.max() - reach.min())
            if positions * height >= coils * kernel_readout * lines:
                break
        else:
            raise UserError(f"the calibration block ({stop - start} columns) is too narrow for "
                            f"GRAPPA at acceleration {step}; widen the centre or pass acs")
        usable = known[targets[:, None] + margin + offsets[None, :]].all(axis=1)
        targets = targets[usable]
        if targets.size == 0:
            continue
        weights = _calibrate(*_calibration_system(acs_block, offsets, kernel_readout), lamdas)
        sources = _gather_sources(padded, targets + margin, offsets, height, kernel_readout)
        predicted = (sources @ weights).reshape(height, targets.size, coils)
        filled[:, :, targets] = predicted.transpose(2, 0, 1)
    return filled.astype(np.result_type(kspace.dtype, np.complex64))


# --------------------------------------------------------------------------------------------
# Coil sensitivities and CG-SENSE
# --------------------------------------------------------------------------------------------


def _centred_hann(length: int, support: int) -> np.ndarray:
    """A Hann window of `support` samples centred on index length // 2 (the DC of a centred FFT)."""
    window = np.zeros(length)
    taps = np.hanning(support + 2)[1:-1]  # drop the zero end points so every sample counts
    first = length // 2 - support // 2
    lo, hi = max(first, 0), min(first + support, length)
    window[lo:hi] = taps[lo - first:hi - first]
    return window


def estimate_sensitivities(kspace: np.ndarray, acs_columns: slice | tuple[int, int],
                           threshold: float = 0.05, eps: float = 1e-8) -> np.ndarray:
    """One set of low-resolution coil maps (C, H, W) from the calibration block.

    acs_columns: a slice or (start, stop) of the fully sampled centre columns. The centre of
    k-space is Hann-windowed over those columns and, along the readout, over round(ACS width *
    H / W) rows (the same image-space resolution both ways); the inverse FFT gives
    low-resolution coil images, which are divided by their RSS (+ eps * max). Maps are set to
    zero where the low-resolution RSS is below `threshold` times its maximum (no object).
    """
    kspace = np.asarray(kspace)
    if kspace.ndim != 3:
        raise UserError(f"k-space must be (coils, H, W), got shape {kspace.shape}")
    _, height, width = kspace.shape
    start, stop = _acs_bounds(acs_columns, np.ones(width, bool))
    columns = np.zeros(width)
    columns[start:stop] = np.hanning(stop - start + 2)[1:-1]
    rows = _centred_hann(height, max(1, round((stop - start) * height / width)))
    low_res = _ifft2c(kspace * rows[:, None] * columns[None, :])
    rss = _rss(low_res)
    maps = low_res / (rss + eps * rss.max())
    return maps * (rss > threshold * rss.max())


def sense(kspace: np.ndarray, mask: np.ndarray, maps: np.ndarray, iterations: int = 30,
          lamda: float = 1e-3, tolerance: float = 1e-6) -> np.ndarray:
    """CG-SENSE image (H, W) complex: conjugate gradients on (E^H E + lamda I) x = E^H y.

    E x = mask * FFT(maps * x). With orthonormal FFTs and maps of unit RSS, E^H E has eigenvalues
    in [0, 1], so lamda is relative to the operator's scale. Stops after `iterations` or when the
    residual norm falls below `tolerance` times its initial value.
    """
    kspace, mask = _check_kspace_mask(kspace, mask)
    maps = np.asarray(maps)
    if maps.shape != kspace.shape:
        raise UserError(f"maps must have the k-space shape {kspace.shape}, got {maps.shape}")
    maps = maps.astype(np.complex128)

    def normal(image: np.ndarray) -> np.ndarray:
        coil_kspace = _fft2c(maps * image) * mask
        return (maps.conj() * _ifft2c(coil_kspace)).sum(axis=0) + lamda * image

    rhs = (maps.conj() * _ifft2c(np.where(mask, kspace, 0))).sum(axis=0)
    image = np.zeros_like(rhs)
    residual = rhs.copy()
    direction = residual.copy()
    energy = np.vdot(residual, residual).real
    stop_energy = (tolerance ** 2) * energy
    for _ in range(iterations):
        if energy <= stop_energy or energy == 0:
            break
        applied = normal(direction)
        alpha = energy / np.vdot(direction, applied).real
        image += alpha * direction
        residual -= alpha * applied
        new_energy = np.vdot(residual, residual).real
        direction = residual + (new_energy / energy) * direction
        energy = new_energy
    return image


def ls_scale(recon: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """recon * a with a = <recon, reference> / <recon, recon>, the a minimising ||a recon - ref||^2.

    Pass magnitudes for the benchmark's SSIM; for complex inputs a is complex.
    """
    recon, reference = np.asarray(recon), np.asarray(reference)
    if recon.shape != reference.shape:
        raise UserError(f"recon {recon.shape} and reference {reference.shape} must have one shape")
    power = np.vdot(recon, recon)
    if power == 0:
        return recon.copy()
    scale = np.vdot(recon, reference) / power
    if not (np.iscomplexobj(recon) or np.iscomplexobj(reference)):
        scale = scale.real
    return recon * scale
