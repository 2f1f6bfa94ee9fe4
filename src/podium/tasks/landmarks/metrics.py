"""Landmark metrics and diagnostic plots, all in millimetres of the ORIGINAL image.

Radial error of one landmark: sqrt((dx * sx)^2 + (dy * sy)^2), where (dx, dy) is the
prediction - target offset in original-image pixels and (sx, sy) the spacing of THAT image in mm
per pixel. Predictions must be mapped back through the `Letterbox` before calling
`radial_errors_mm`: an error measured in network-input pixels, or with one spacing for every
image, is wrong. (One public ISBI 2015 evaluator used 0.078 mm/pixel instead of 0.1 and
understated every error by 22 %; spacing here is always taken per image.)

Reported, as in the ISBI 2015 cephalometric challenge and the papers that use it:
- MRE: mean radial error in mm over every (image, landmark) pair, with its standard deviation
  ("MRE ± SD"; population SD, ddof = 0, as `numpy.std`).
- SDR@r: successful detection rate, the share of radial errors within r mm, for
  r = 2, 2.5, 3, 4 mm. "Within" is `error <= r` (the challenge's convention: an error of exactly
  2 mm counts as a success at 2 mm). A slack of `SDR_ATOL_MM` = 1e-9 mm absorbs floating-point
  noise so that an exact tie stays a tie: an integer offset of (18, 24) px at 0.1 mm/px is
  exactly 3 mm but computes as 3.0000000000000004.
- A NaN error (a landmark not visible / not annotated) is left out of every mean and share and
  counted in "missing". An infinite error counts as a failure.

Registered under kind "metric" (`errors` is the (N, K) array of radial errors in mm):
  mre_mm(errors)             -> float
  sdr(errors, radius=2.0)    -> float in [0, 1]

Plots use matplotlib's object-oriented API on an Agg canvas, imported inside the functions:
importing this module stays light and no global pyplot state or backend is touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from podium.common.plots import new_figure, save_figure
from podium.engine.registry import register

DEFAULT_RADII: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0)

# Slack on the SDR comparison `error <= r`: far below any meaningful error (1e-8 pixel at
# 0.1 mm/px), far above float noise on errors of a few mm (~1e-15).
SDR_ATOL_MM = 1e-9

# Longest side, in screen pixels, of the image drawn by `plot_overlay`; larger images are
# block-averaged down to it.
OVERLAY_MAX_SIDE = 1024


# --------------------------------------------------------------------------------------------
# Radial errors
# --------------------------------------------------------------------------------------------


def radial_errors_mm(pred: np.ndarray, target: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """(N, K) Euclidean errors in mm from points (N, K, 2) in original-image pixels (x, y).

    `spacing` is (N, 2): mm per pixel (x, y) of each image, so anisotropic pixels and images of
    different resolutions are handled. A NaN coordinate (invisible landmark) gives a NaN error.
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64)
    if pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"pred must have shape (N, K, 2), got {pred.shape}")
    if target.shape != pred.shape:
        raise ValueError(f"target has shape {target.shape} but pred has {pred.shape}")
    if spacing.shape != (pred.shape[0], 2):
        raise ValueError(
            f"spacing must have shape (N, 2) = ({pred.shape[0]}, 2), mm per pixel (x, y) of each "
            f"image, got {spacing.shape}"
        )
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be finite and positive, got {spacing.tolist()}")
    offset_mm = (pred - target) * spacing[:, None, :]
    return np.sqrt(np.sum(offset_mm**2, axis=-1))


def mean_offsets_mm(pred: np.ndarray, target: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """(K, 2) mean signed offset prediction - target per landmark, in mm (x right, y down).

    The systematic part of each landmark's error: a model (or an annotation convention that
    differs between training and test images) that is consistently off in one direction shows a
    large offset; a landmark whose errors scatter around the truth shows one near zero. NaN
    (invisible) points are left out; a landmark never visible gets NaN.
    """
    radial_errors_mm(pred, target, spacing)  # the same shape and spacing checks
    offset = (np.asarray(pred, np.float64) - np.asarray(target, np.float64)) * np.asarray(spacing, np.float64)[:, None, :]
    seen = np.isfinite(offset).all(-1, keepdims=True)
    count = seen.sum(0)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, np.where(seen, offset, 0).sum(0) / count, np.nan)


def _as_errors(errors: np.ndarray) -> np.ndarray:
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 2:
        raise ValueError(f"errors must have shape (N, K), got {errors.shape}")
    if np.any(errors < 0):  # NaN compares False: invisible landmarks pass
        raise ValueError("radial errors must be non-negative")
    return errors


def _names(names: Sequence[str] | None, num_landmarks: int) -> list[str]:
    if names is None:
        return [str(k + 1) for k in range(num_landmarks)]
    names = [str(n) for n in names]
    if len(names) != num_landmarks:
        raise ValueError(f"got {len(names)} landmark names for {num_landmarks} landmarks")
    return names


def _radius_key(radius: float) -> str:
    """2.0 -> "sdr_2mm", 2.5 -> "sdr_2.5mm"."""
    return f"sdr_{float(radius):g}mm"


def _check_radii(radii: Sequence[float]) -> list[float]:
    radii = [float(r) for r in radii]
    if not radii or any(not math.isfinite(r) or r < 0 for r in radii):
        raise ValueError(f"radii must be a non-empty list of non-negative mm, got {radii}")
    return radii


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else math.nan


def _std(values: np.ndarray) -> float:
    if not values.size:
        return math.nan
    # An infinite error makes the spread infinite (numpy would give NaN with a warning).
    return float(np.std(values)) if np.all(np.isfinite(values)) else math.inf


def _sdr(values: np.ndarray, radius: float) -> float:
    """Share of (non-NaN) errors within `radius` mm; NaN when there are none."""
    return float(np.mean(values <= radius + SDR_ATOL_MM)) if values.size else math.nan


# --------------------------------------------------------------------------------------------
# Registered metrics
# --------------------------------------------------------------------------------------------


@register("metric", "mre_mm")
def mre_mm(errors: np.ndarray) -> float:
    """Mean radial error in mm over every visible (image, landmark) pair."""
    errors = _as_errors(errors)
    return _mean(errors[~np.isnan(errors)])


@register("metric", "sdr")
def sdr(errors: np.ndarray, radius: float = 2.0) -> float:
    """Successful detection rate: share of visible errors <= `radius` mm, in [0, 1]."""
    errors = _as_errors(errors)
    return _sdr(errors[~np.isnan(errors)], float(radius))


# --------------------------------------------------------------------------------------------
# Everything the evaluation loop logs, in one flat dict
# --------------------------------------------------------------------------------------------


def landmark_metrics(
    errors: np.ndarray,
    radii: Sequence[float] = DEFAULT_RADII,
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Flat metrics from radial errors (N, K) in mm.

    Keys: "mre_mm", "mre_std_mm" (over all visible N·K errors), "sdr_<r>mm" for each radius
    ("sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm"; shares in [0, 1], error <= r), "missing" (the
    number of NaN errors, left out of everything else), and per landmark "mre_mm/<name>" and
    "sdr_<r0>mm/<name>" with r0 the first radius ("sdr_2mm/<name>" by default). Names default to
    "1" .. "K". A landmark with no visible error gets NaN.
    """
    errors = _as_errors(errors)
    radii = _check_radii(radii)
    names = _names(names, errors.shape[1])
    visible = ~np.isnan(errors)
    valid = errors[visible]

    out: dict[str, float] = {"mre_mm": _mean(valid), "mre_std_mm": _std(valid)}
    for radius in radii:
        out[_radius_key(radius)] = _sdr(valid, radius)
    out["missing"] = float(np.count_nonzero(~visible))
    first = _radius_key(radii[0])
    for k, name in enumerate(names):
        column = errors[visible[:, k], k]
        out[f"mre_mm/{name}"] = _mean(column)
        out[f"{first}/{name}"] = _sdr(column, radii[0])
    return out


def per_landmark_table(
    errors: np.ndarray,
    names: Sequence[str] | None = None,
    radii: Sequence[float] = DEFAULT_RADII,
    offsets: np.ndarray | None = None,
) -> list[dict]:
    """One row per landmark: {landmark, mre_mm, std_mm, sdr_2mm, sdr_2.5mm, sdr_3mm, sdr_4mm}
    and, given `offsets` (K, 2) from `mean_offsets_mm`, offset_x_mm / offset_y_mm.

    The SDR keys follow `radii`; NaN errors are left out of each landmark's statistics.
    """
    errors = _as_errors(errors)
    radii = _check_radii(radii)
    names = _names(names, errors.shape[1])
    if offsets is not None and np.shape(offsets) != (errors.shape[1], 2):
        raise ValueError(f"offsets must have shape (K, 2) = ({errors.shape[1]}, 2), got {np.shape(offsets)}")
    rows = []
    for k, name in enumerate(names):
        column = errors[~np.isnan(errors[:, k]), k]
        row: dict = {"landmark": name, "mre_mm": _mean(column), "std_mm": _std(column)}
        for radius in radii:
            row[_radius_key(radius)] = _sdr(column, radius)
        if offsets is not None:
            row["offset_x_mm"], row["offset_y_mm"] = float(offsets[k][0]), float(offsets[k][1])
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Fixed-width text table of `per_landmark_table` rows (SDR shown in %, mm to 2 decimals)."""
    rows = list(rows)
    if not rows:
        return ""
    columns = list(rows[0])

    def header(column: str) -> str:
        if column.startswith("sdr_"):
            return f"SDR@{column[4:]} %"
        return {"landmark": "landmark", "mre_mm": "MRE mm", "std_mm": "SD mm",
                "offset_x_mm": "offset x mm", "offset_y_mm": "offset y mm"}.get(column, column)

    def cell(column: str, value) -> str:
        if isinstance(value, (float, np.floating)):
            if math.isnan(value):
                return "-"
            return f"{100 * value:.1f}" if column.startswith("sdr_") else f"{value:.2f}"
        return str(value)

    table = [[header(c) for c in columns]]
    table += [[cell(c, row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = []
    for n, line in enumerate(table):
        first = line[0].ljust(widths[0])
        rest = [text.rjust(width) for text, width in zip(line[1:], widths[1:])]
        lines.append("  ".join([first, *rest]))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _empty_figure(message: str, path: str | Path) -> Path:
    fig = new_figure((4.0, 2.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12)
    return save_figure(fig, path)


def plot_cumulative_error(
    errors: np.ndarray,
    path: str | Path,
    radii: Sequence[float] = DEFAULT_RADII,
    label: str | None = None,
) -> Path:
    """Empirical CDF of the radial error (mm): y = share of errors <= x.

    Each SDR radius is drawn as a vertical line with its SDR annotated (the CDF's value there).
    The x axis stops at the larger of 2 × the largest radius and the 99th percentile, so a few
    far outliers do not squash the range that matters; the share beyond is given in the title.
    NaN errors are left out (their count is in the title).
    """
    errors = _as_errors(errors)
    radii = _check_radii(radii)
    valid = np.sort(errors[~np.isnan(errors)])
    missing = errors.size - valid.size
    if valid.size == 0:
        return _empty_figure(f"No visible landmarks\n({missing} missing)", path)

    finite = valid[np.isfinite(valid)]
    x_max = max(2.0 * max(radii), float(np.quantile(finite, 0.99)) if finite.size else 0.0, 1e-3)
    shares = np.arange(1, valid.size + 1) / valid.size

    fig = new_figure((6.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    # Start the staircase at (0, 0) so that the curve reads from the origin.
    ax.step(np.concatenate([[0.0], valid]), np.concatenate([[0.0], shares]), where="post",
            color="tab:blue", label=label or "radial error")
    for radius in radii:
        share = _sdr(valid, radius)
        ax.axvline(radius, color="0.5", linestyle="--", linewidth=0.8)
        ax.plot([radius], [share], "o", color="tab:red", markersize=4)
        ax.annotate(f"{100 * share:.1f}% ≤ {radius:g} mm", (radius, share), xytext=(4, -12),
                    textcoords="offset points", fontsize=8)
    ax.set_xlim(0.0, x_max)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("radial error (mm)")
    ax.set_ylabel("share of landmarks within error")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    beyond = float(np.mean(valid > x_max))
    title = f"MRE {_mean(valid):.2f} ± {_std(valid):.2f} mm  (n = {valid.size}"
    if missing:
        title += f", {missing} missing"
    if beyond > 0:
        title += f", {100 * beyond:.1f}% > {x_max:.1f} mm"
    ax.set_title(title + ")", fontsize=10)
    return save_figure(fig, path)


def plot_per_landmark(
    errors: np.ndarray,
    names: Sequence[str] | None,
    path: str | Path,
    radius: float = 2.0,
) -> Path:
    """Box plot of the radial error (mm) of each landmark; the mean is marked with a triangle.

    A dashed line marks `radius` (the SDR@2mm threshold by default). The y axis stops at the
    larger of 4 × `radius` and the 99th percentile (errors beyond are counted in the title).
    NaN errors are left out; a landmark with none visible gets an empty slot.
    """
    errors = _as_errors(errors)
    names = _names(names, errors.shape[1])
    columns = [errors[~np.isnan(errors[:, k]), k] for k in range(errors.shape[1])]
    if not any(c.size for c in columns):
        return _empty_figure(f"No visible landmarks\n({errors.size} missing)", path)

    fig = new_figure((max(6.0, 0.45 * len(names) + 2.0), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    positions = [k + 1 for k, c in enumerate(columns) if c.size]
    ax.boxplot([c for c in columns if c.size], positions=positions, showmeans=True,
               flierprops={"markersize": 3})
    ax.axhline(radius, color="tab:red", linestyle="--", linewidth=0.8, label=f"{radius:g} mm")
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(names, rotation=90 if max(len(n) for n in names) > 3 else 0, fontsize=8)
    ax.set_xlim(0.5, len(names) + 0.5)
    ax.set_xlabel("landmark")
    ax.set_ylabel("radial error (mm)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    valid = np.concatenate(columns)
    finite = valid[np.isfinite(valid)]
    y_max = 1.05 * max(4.0 * radius, float(np.quantile(finite, 0.99)) if finite.size else 0.0, 1e-3)
    ax.set_ylim(0.0, y_max)
    title = f"radial error per landmark (MRE {_mean(valid):.2f} mm)"
    beyond = int(np.count_nonzero(valid > y_max))
    if beyond:
        title += f"; {beyond} error{'s' if beyond > 1 else ''} > {y_max:.1f} mm off the scale"
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def _display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(H, W) or (H, W, C) -> float array in [0, 1] and a colormap (grey for one channel).

    A (C, H, W) array with C <= 4 and W > 4 is recognised and transposed. One or two channels
    are shown in grey (the first), three or more as RGB from the first three.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3 and image.shape[0] <= 4 < image.shape[2]:
        image = np.transpose(image, (1, 2, 0))
    if image.ndim == 3:
        image = image[..., 0] if image.shape[2] < 3 else image[..., :3]
    elif image.ndim != 2:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")
    image = np.nan_to_num(image)
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else np.full_like(image, 0.5)
    return image, ("gray" if image.ndim == 2 else None)


def _downsample(image: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    """Block-average by an integer factor f so the longest side is <= max_side; returns f.

    The image is edge-padded to a multiple of f first. Display block (i, j) averages original
    pixels [f·i, f·i + f) × [f·j, f·j + f), so drawn with `extent` (-0.5, f·Wb - 0.5,
    f·Hb - 0.5, -0.5) it sits exactly where those pixels are: points stay in original pixels.
    """
    h, w = image.shape[:2]
    factor = max(1, math.ceil(max(h, w) / max_side))
    if factor == 1:
        return image, 1
    hb, wb = math.ceil(h / factor), math.ceil(w / factor)
    pad = [(0, hb * factor - h), (0, wb * factor - w)] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, pad, mode="edge")
    blocks = padded.reshape(hb, factor, wb, factor, *image.shape[2:])
    return blocks.mean(axis=(1, 3)), factor


def plot_overlay(
    image: np.ndarray,
    pred: np.ndarray,
    target: np.ndarray | None,
    path: str | Path,
    names: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    max_side: int = OVERLAY_MAX_SIDE,
) -> Path:
    """Draw one image with its landmarks, all in original-image pixels (x, y).

    Targets are green circles, predictions red crosses, each pair joined by a yellow line, and
    each prediction is numbered 1..K. A large image is block-averaged for display (longest side
    <= `max_side`) and drawn at its original pixel extent, so the points need no rescaling and
    the axes read in original pixels. With a target, the title gives the image's MRE: in mm
    when `spacing` (mm per pixel (x, y) of this image) is given, else in pixels. `names`, when
    given, are listed beside the image by number. Points with a NaN coordinate are skipped.
    """
    pred = np.asarray(pred, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] != 2:
        raise ValueError(f"pred must have shape (K, 2), got {pred.shape}")
    if target is not None:
        target = np.asarray(target, dtype=np.float64)
        if target.shape != pred.shape:
            raise ValueError(f"target has shape {target.shape} but pred has {pred.shape}")
    num_landmarks = len(pred)
    names = None if names is None else _names(names, num_landmarks)

    shown, cmap = _display_image(image)
    h, w = shown.shape[:2]
    small, factor = _downsample(shown, max_side)
    extent = (-0.5, small.shape[1] * factor - 0.5, small.shape[0] * factor - 0.5, -0.5)

    width = 8.0
    fig = new_figure((width + (2.5 if names else 0.0), max(2.0, width * h / w)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(small, cmap=cmap, vmin=0.0, vmax=1.0, extent=extent, interpolation="bilinear")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)

    if target is not None:
        for k in range(num_landmarks):
            if np.all(np.isfinite(pred[k])) and np.all(np.isfinite(target[k])):
                ax.plot([target[k, 0], pred[k, 0]], [target[k, 1], pred[k, 1]], "-",
                        color="yellow", linewidth=1.0)
        ax.plot(target[:, 0], target[:, 1], "o", markerfacecolor="none", markeredgecolor="lime",
                markersize=7, markeredgewidth=1.5, label="target")
    ax.plot(pred[:, 0], pred[:, 1], "x", color="red", markersize=7, markeredgewidth=1.5,
            label="prediction")
    offset = 0.012 * max(h, w)
    for k in range(num_landmarks):
        if np.all(np.isfinite(pred[k])):
            ax.text(pred[k, 0] + offset, pred[k, 1] - offset, str(k + 1), color="cyan",
                    fontsize=8, ha="left", va="bottom")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("x (original pixels)")
    ax.set_ylabel("y (original pixels)")

    if target is not None:
        if spacing is not None:
            scale = np.asarray(spacing, dtype=np.float64).reshape(2)
            unit = "mm"
        else:
            scale, unit = np.ones(2), "px"
        errors = np.sqrt(np.sum(((pred - target) * scale) ** 2, axis=1))
        errors = errors[~np.isnan(errors)]
        if errors.size:
            ax.set_title(f"MRE {np.mean(errors):.2f} {unit} over {errors.size} landmarks"
                         f" (max {np.max(errors):.2f} {unit})", fontsize=10)
        else:
            ax.set_title("no visible landmark", fontsize=10)
    if names:
        listing = "\n".join(f"{k + 1:>2}  {name}" for k, name in enumerate(names))
        ax.text(1.02, 1.0, listing, transform=ax.transAxes, va="top", ha="left", fontsize=8,
                family="monospace")
    return save_figure(fig, path)
