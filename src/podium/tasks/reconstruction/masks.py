"""Undersampling masks over phase-encode columns, with the fastMRI semantics.

A mask function draws a (center_fraction, acceleration) pair per call, keeps a fully sampled
block of `num_low = round(W * center_fraction)` columns starting at `(W - num_low + 1) // 2`, and
adds high-frequency columns in its own pattern (Zbontar et al. 2018, "fastMRI: An Open Dataset
and Benchmarks for Accelerated MRI", and the fastMRI mask functions; see
/work/shared/reference.md, "fastMRI mask functions"):

- `random`: every column kept with p = (W/acc - num_low) / (W - num_low), so the expected total
  is W/acc;
- `equispaced`: mask[offset::acc], offset random in [0, acc) (or fixed with `offset=`);
- `equispaced_fraction`: spacing acc (num_low - W) / (num_low acc - W), columns
  round(arange(offset, W - 1, spacing)) - the pattern of the public fastMRI multi-coil data;
- `magic`: equispaced, but the negative frequencies use an offset half a period away from the
  positive ones, so a column and its conjugate-symmetric mirror are never both acquired
  (Defazio 2019, "Offset Sampling Improves Deep Learning based Accelerated MRI Reconstructions
  by Exploiting Symmetry"): for a near-real image the mirror fills the gaps, halving the
  effective spacing;
- `magic_fraction`: the same idea with a fractional period, hitting round(W/acc) columns exactly,
  centre included;
- `snu`: the SNU FastMRI challenge public masks: every acc-th column from (W // 2) % acc plus the
  centre block (W 396, acc 4, centre 0.08 -> 123 columns).

Column c holds frequency k = c - W // 2 (fftshift layout); its conjugate mirror is column
2 (W // 2) - c (= W - c for even W).

Example:
    >>> import numpy as np
    >>> from podium.tasks.reconstruction.masks import build_mask_func, seeded_rng
    >>> mask_func = build_mask_func("snu", center_fractions=[0.08], accelerations=[4])
    >>> int(mask_func(396, seeded_rng("brain_acc4_1.h5/slice3")).mask.sum())
    123
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from podium.errors import UserError


@dataclass(frozen=True)
class SampledMask:
    """One drawn mask: `mask` bool (W,) read-only, the centre width, the nominal acceleration,
    and whether it was drawn from a mask-augmentation pool instead of the configured mask."""

    mask: np.ndarray
    num_low_frequencies: int
    acceleration: int
    augmented: bool = False

    def __post_init__(self) -> None:
        # A copy made read-only: masks are cached and shared (MaskBank), nobody may edit them.
        mask = np.array(self.mask, dtype=bool)
        if mask.ndim != 1:
            raise ValueError(f"mask must be 1-D (W,), got shape {mask.shape}")
        mask.setflags(write=False)
        object.__setattr__(self, "mask", mask)

    @property
    def num_sampled(self) -> int:
        return int(self.mask.sum())

    @property
    def effective_acceleration(self) -> float:
        """W / sampled columns, the acceleration actually reached (centre included)."""
        return self.mask.size / max(self.num_sampled, 1)


def center_mask(num_cols: int, num_low_frequencies: int) -> np.ndarray:
    """bool (W,) with the fully sampled centre block [(W - n + 1) // 2, ... + n)."""
    mask = np.zeros(num_cols, dtype=bool)
    start = (num_cols - num_low_frequencies + 1) // 2
    mask[start : start + num_low_frequencies] = True
    return mask


def _as_acceleration(value: object) -> int:
    # YAML may hand over 4.0; an integral float is accepted, anything else is refused.
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_number or not float(value).is_integer() or value < 1:
        raise ValueError(f"acceleration must be an integer >= 1, got {value!r}")
    return int(value)


class MaskFunc:
    """Base class: validates the pairs, picks one per call and adds the centre block.

    Subclasses implement `_high_frequency_lines(num_cols, acceleration, num_low, rng)`. With a
    single configured pair `rng` is not consulted for the pair, so deterministic subclasses
    (SNUMask, EquispacedMask with `offset`) give the same mask for any rng.
    """

    def __init__(self, center_fractions: Sequence[float], accelerations: Sequence[int]):
        center_fractions, accelerations = list(center_fractions), list(accelerations)
        if len(center_fractions) != len(accelerations) or not center_fractions:
            raise ValueError(
                "center_fractions and accelerations must be non-empty and of equal length, got "
                f"{center_fractions} and {accelerations}"
            )
        for fraction in center_fractions:
            if not 0.0 <= float(fraction) <= 1.0:
                raise ValueError(f"center fraction must be in [0, 1], got {fraction!r}")
        self.center_fractions = tuple(float(f) for f in center_fractions)
        self.accelerations = tuple(_as_acceleration(a) for a in accelerations)

    def __call__(self, num_cols: int, rng: np.random.Generator) -> SampledMask:
        if (
            isinstance(num_cols, bool)
            or not isinstance(num_cols, (int, np.integer))
            or num_cols < 1
        ):
            raise ValueError(f"num_cols must be a positive integer, got {num_cols!r}")
        num_cols = int(num_cols)
        choice = int(rng.integers(len(self.accelerations))) if len(self.accelerations) > 1 else 0
        acceleration = self.accelerations[choice]
        num_low = round(num_cols * self.center_fractions[choice])
        lines = self._high_frequency_lines(num_cols, acceleration, num_low, rng)
        return SampledMask(center_mask(num_cols, num_low) | lines, num_low, acceleration)

    def _high_frequency_lines(
        self, num_cols: int, acceleration: int, num_low: int, rng: np.random.Generator
    ) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(center_fractions={list(self.center_fractions)}, "
            f"accelerations={list(self.accelerations)})"
        )


class RandomMask(MaskFunc):
    """Each column kept independently so that the expected total (centre included) is W/acc."""

    def _high_frequency_lines(self, num_cols, acceleration, num_low, rng):
        outside = num_cols - num_low
        prob = (num_cols / acceleration - num_low) / outside if outside > 0 else 0.0
        # A centre wider than W/acc leaves nothing to draw; clip instead of a negative p.
        return rng.random(num_cols) < min(max(prob, 0.0), 1.0)


class EquispacedMask(MaskFunc):
    """mask[offset::acc] with a random offset in [0, acc), or the fixed `offset` if given."""

    def __init__(self, center_fractions, accelerations, offset: int | None = None):
        super().__init__(center_fractions, accelerations)
        if offset is not None and not 0 <= offset < min(self.accelerations):
            raise ValueError(f"offset must be in [0, {min(self.accelerations)}), got {offset!r}")
        self.offset = offset

    def _line_offset(self, num_cols: int, acceleration: int, rng: np.random.Generator) -> int:
        if self.offset is not None:
            return self.offset
        return int(rng.integers(acceleration))

    def _high_frequency_lines(self, num_cols, acceleration, num_low, rng):
        lines = np.zeros(num_cols, dtype=bool)
        lines[self._line_offset(num_cols, acceleration, rng) :: acceleration] = True
        return lines


class SNUMask(EquispacedMask):
    """SNU FastMRI challenge public masks: every acc-th column from (W // 2) % acc, plus centre.

    The offset puts a line on the DC column W // 2. Deterministic (the benchmark's "equispaced
    with offset (W // 2) % acc plus an 8 % centre" is SNUMask([0.08], [acc])).
    """

    def __init__(self, center_fractions, accelerations):
        super().__init__(center_fractions, accelerations)

    def _line_offset(self, num_cols, acceleration, rng):
        return (num_cols // 2) % acceleration


class EquispacedFractionMask(MaskFunc):
    """fastMRI equispaced_fraction: spacing stretched so centre + lines give about W/acc columns.

    spacing = acc (num_low - W) / (num_low acc - W); columns round(arange(offset, W - 1,
    spacing)) with np.round (half to even, as fastMRI), offset random in [0, round(spacing)).
    A centre that alone reaches W/acc (num_low * acc >= W) gets no further lines.
    """

    def _high_frequency_lines(self, num_cols, acceleration, num_low, rng):
        lines = np.zeros(num_cols, dtype=bool)
        if num_low * acceleration >= num_cols:
            return lines
        spacing = acceleration * (num_low - num_cols) / (num_low * acceleration - num_cols)
        offset = int(rng.integers(round(spacing)))
        lines[np.round(np.arange(offset, num_cols - 1, spacing)).astype(int)] = True
        return lines


def _signed_frequencies(num_cols: int) -> np.ndarray:
    """Frequency index k = c - W // 2 of every column c (DC at W // 2 after fftshift)."""
    return np.arange(num_cols) - num_cols // 2


class MagicMask(MaskFunc):
    """Conjugate-symmetry offset sampling (Defazio 2019) with integer period acc.

    Columns with k >= 0 are kept where k % acc == a, columns with k < 0 where (-k) % acc == b,
    b = (a + acc // 2) % acc, a random in [0, acc). For a real-valued image K(-k) = conj(K(k)),
    so the mirror of each acquired negative column lands on a positive column the positive
    offset skipped: for even acc the acquired columns plus their mirrors are equispaced with
    period acc / 2, and no column pair is acquired twice.
    """

    def _high_frequency_lines(self, num_cols, acceleration, num_low, rng):
        positive_offset = int(rng.integers(acceleration))
        negative_offset = (positive_offset + acceleration // 2) % acceleration
        k = _signed_frequencies(num_cols)
        return np.where(
            k >= 0, k % acceleration == positive_offset, (-k) % acceleration == negative_offset
        )


class MagicFractionMask(MaskFunc):
    """Magic sampling with a fractional period that yields exactly round(W / acc) columns.

    Outside the centre, positive |k| follow the lattice floor((phase + j) * s) and negative |k|
    the lattice shifted by s / 2 (phase random in [0, 1)); for s >= 2 the two never mirror each
    other. s starts at (columns outside the centre) / (lines needed) and shrinks until the
    lattice offers enough columns; the few surplus columns are dropped from the outermost |k|,
    where k-space carries the least energy. A centre that alone reaches W/acc gets no lines.
    """

    def _high_frequency_lines(self, num_cols, acceleration, num_low, rng):
        lines = np.zeros(num_cols, dtype=bool)
        outside = ~center_mask(num_cols, num_low)
        needed = round(num_cols / acceleration) - num_low
        available = int(outside.sum())
        if needed <= 0:
            return lines
        if needed >= available:
            return outside
        phase = rng.random()
        k = _signed_frequencies(num_cols)
        for extra in (0.0, 0.5, 1.0, 1.5, 2.0):
            # (available / (needed + 2)) is enough: each half of length L offers >= floor(L/s).
            spacing = max(available / (needed + extra), 1.0)
            candidates = outside & self._on_lattice(k, spacing, phase)
            if candidates.sum() >= needed:
                break
        chosen = np.flatnonzero(candidates)
        # Keep the `needed` columns closest to DC (stable sort: ties keep column order).
        keep = chosen[np.argsort(np.abs(k[chosen]), kind="stable")[:needed]]
        lines[keep] = True
        return lines

    @staticmethod
    def _on_lattice(k: np.ndarray, spacing: float, phase: float) -> np.ndarray:
        """Whether |k| is on floor((phase + j) s), positive k, or its s/2-shifted copy, negative k."""
        on_lattice = np.zeros(k.size, dtype=bool)
        for sign, shift in ((1, phase), (-1, phase + 0.5)):
            count = int(np.abs(k).max() / spacing) + 2
            # The small epsilon keeps integral products (e.g. 3 * (1/3 + j)) from flooring down.
            magnitudes = np.floor((shift + np.arange(count)) * spacing + 1e-9).astype(int)
            half = (k >= 0) if sign == 1 else (k < 0)
            on_lattice |= half & np.isin(np.abs(k), magnitudes)
        return on_lattice


MASK_TYPES: dict[str, type[MaskFunc]] = {
    "random": RandomMask,
    "equispaced": EquispacedMask,
    "equispaced_fraction": EquispacedFractionMask,
    "magic": MagicMask,
    "magic_fraction": MagicFractionMask,
    "snu": SNUMask,
}


def build_mask_func(
    name: str, center_fractions: Sequence[float], accelerations: Sequence[int], **options
) -> MaskFunc:
    """The mask function registered as `name` (a key of MASK_TYPES); options go to its class."""
    if name not in MASK_TYPES:
        raise UserError(f"unknown mask type {name!r}; expected one of {sorted(MASK_TYPES)}")
    try:
        return MASK_TYPES[name](center_fractions, accelerations, **options)
    except (ValueError, TypeError) as error:
        raise UserError(f"mask {name!r}: {error}") from error


def seeded_rng(key: str, epoch: int | None = None) -> np.random.Generator:
    """A generator fixed by `key` (and `epoch`), identical across processes and runs.

    Python's hash() of a str is salted per process, so a SHA-256 digest seeds instead; validation
    masks built with seeded_rng(f"{file}/{slice}") never change between runs.
    """
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    if epoch is None:
        return np.random.default_rng([digest, 0])
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer or None, got {epoch!r}")
    return np.random.default_rng([digest, 1, int(epoch)])


def apply_padding(mask: np.ndarray, padding_left: int, padding_right: int) -> np.ndarray:
    """A copy of `mask` with the never-acquired columns [0, left) and [right, W) zeroed.

    `padding_left` / `padding_right` come from the fastMRI ISMRMRD header
    (encodingLimits/kspace_encoding_step_1); works on the last axis of any array.
    """
    num_cols = np.shape(mask)[-1]
    if not 0 <= padding_left <= padding_right <= num_cols:
        raise ValueError(
            f"need 0 <= padding_left <= padding_right <= W={num_cols}, "
            f"got {padding_left} and {padding_right}"
        )
    padded = np.array(mask, copy=True)
    padded[..., :padding_left] = 0
    padded[..., padding_right:] = 0
    return padded


def all_mask_types(center_fractions: Sequence[float], accelerations: Sequence[int]) -> list:
    """One mask function of every type in MASK_TYPES, e.g. the pool of a MaskAugmentation."""
    return [cls(center_fractions, accelerations) for cls in MASK_TYPES.values()]


SCHEDULES = ("linear", "delayed", "constant")


class MaskAugmentation:
    """Draw from `base`, or with probability p(progress) from a random member of `pool`.

    progress is the fraction of training done (0..1, clipped). Schedules:
    - "linear": 0 up to `start`, rising linearly to `p_max` at `end`, `p_max` afterwards;
    - "delayed": 0 before `start`, `p_max` from `start` on (a step; `end` unused);
    - "constant": `p_max` always.
    Training on masks it will not be tested on hurts (reference.md: 0.95 -> 0.76), so keep the
    base mask the test mask and the pool an occasional variation.
    """

    def __init__(
        self,
        base: MaskFunc,
        pool: Sequence[MaskFunc],
        schedule: str = "linear",
        p_max: float = 0.5,
        start: float = 0.0,
        end: float = 1.0,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not 0.0 <= p_max <= 1.0:
            raise ValueError(f"p_max must be in [0, 1], got {p_max!r}")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"need 0 <= start <= end <= 1, got start={start!r}, end={end!r}")
        if p_max > 0 and not pool:
            raise ValueError("pool must hold at least one mask function when p_max > 0")
        self.base, self.pool = base, list(pool)
        self.schedule, self.p_max, self.start, self.end = schedule, p_max, start, end

    def probability(self, progress: float) -> float:
        if not math.isfinite(progress):
            raise ValueError(f"progress must be finite, got {progress!r}")
        progress = min(max(progress, 0.0), 1.0)
        if self.schedule == "constant":
            return self.p_max
        if progress < self.start:
            return 0.0
        if self.schedule == "delayed" or progress >= self.end:
            return self.p_max
        return self.p_max * (progress - self.start) / (self.end - self.start)

    def __call__(self, num_cols: int, rng: np.random.Generator, progress: float) -> SampledMask:
        if rng.random() < self.probability(progress):
            return self.draw_from_pool(num_cols, rng)
        return self.base(num_cols, rng)

    def draw_from_pool(self, num_cols: int, rng: np.random.Generator) -> SampledMask:
        drawn = self.pool[int(rng.integers(len(self.pool)))](num_cols, rng)
        return replace(drawn, augmented=True)


class MaskBank:
    """Fixed masks, one per (sample, acceleration): the "mask duplicate" training set.

    A dataset of N k-spaces exposes N * copies items; item copy i of a sample always gets the
    same mask at accelerations[i], seeded from the sample key, so each k-space is seen once per
    acceleration per epoch (x2 for acc 4 + acc 8).
    """

    def __init__(
        self,
        accelerations: Sequence[int] = (4, 8),
        center_fraction: float | Sequence[float] = 0.08,
        kind: str = "snu",
    ):
        if not accelerations:
            raise ValueError("accelerations must not be empty")
        self.accelerations = tuple(_as_acceleration(a) for a in accelerations)
        # one fraction for all, or one per acceleration (fastMRI's [0.08, 0.04] for [4, 8]):
        # each acceleration keeps its own centre width
        fractions = [center_fraction] * len(self.accelerations) if isinstance(
            center_fraction, numbers.Real) else list(center_fraction)
        if len(fractions) != len(self.accelerations):
            raise ValueError(f"need one center fraction per acceleration {list(self.accelerations)}, "
                             f"got {fractions}")
        self.center_fractions, self.kind = tuple(float(f) for f in fractions), kind
        self._mask_funcs = [
            build_mask_func(kind, [fraction], [acc])
            for fraction, acc in zip(self.center_fractions, self.accelerations)
        ]

    @property
    def copies(self) -> int:
        return len(self.accelerations)

    def mask_for(self, sample_key: str, num_cols: int, copy_index: int) -> SampledMask:
        if not 0 <= copy_index < self.copies:
            raise IndexError(f"copy_index must be in [0, {self.copies}), got {copy_index}")
        acceleration = self.accelerations[copy_index]
        rng = seeded_rng(f"{sample_key}#acc{acceleration}")
        return self._mask_funcs[copy_index](num_cols, rng)
