"""Undersampling masks: fastMRI formulas (reference.md), SNU layout, magic symmetry, schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from podium.errors import UserError
from podium.tasks.reconstruction.masks import (
    MASK_TYPES,
    EquispacedFractionMask,
    EquispacedMask,
    MagicFractionMask,
    MagicMask,
    MaskAugmentation,
    MaskBank,
    MaskFunc,
    RandomMask,
    SampledMask,
    SNUMask,
    all_mask_types,
    apply_padding,
    build_mask_func,
    center_mask,
    seeded_rng,
)

# Expected masks are rebuilt here from the reference formulas with plain Python sets.


def expected_center(num_cols: int, center_fraction: float) -> set[int]:
    num_low = round(num_cols * center_fraction)
    start = (num_cols - num_low + 1) // 2
    return set(range(start, start + num_low))


def as_set(mask: np.ndarray) -> set[int]:
    return {int(c) for c in np.flatnonzero(mask)}


def draws(mask_func: MaskFunc, num_cols: int, count: int, seed: int = 0) -> list[SampledMask]:
    rng = np.random.default_rng(seed)
    return [mask_func(num_cols, rng) for _ in range(count)]


def outside_center_pairs(num_cols: int, center: set[int]) -> list[tuple[int, int]]:
    """(c, mirror) for positive-frequency columns c whose mirror 2 (W // 2) - c exists."""
    dc = num_cols // 2
    return [
        (c, 2 * dc - c)
        for c in range(dc + 1, num_cols)
        if 0 <= 2 * dc - c and c not in center and 2 * dc - c not in center
    ]


@pytest.mark.parametrize(
    ("num_cols", "fraction", "start", "width"),
    [
        (368, 0.08, 170, 29),
        (396, 0.08, 182, 32),
        (371, 0.1, 167, 37),
        (10, 0.0, 5, 0),
    ],
)
def test_center_block_position_and_width(num_cols, fraction, start, width):
    mask = center_mask(num_cols, round(num_cols * fraction))
    assert as_set(mask) == set(range(start, start + width)) == expected_center(num_cols, fraction)
    for name in MASK_TYPES:
        sampled = build_mask_func(name, [fraction], [4])(num_cols, np.random.default_rng(1))
        assert sampled.num_low_frequencies == width
        assert as_set(mask) <= as_set(sampled.mask), name
        assert sampled.mask.dtype == bool and sampled.mask.shape == (num_cols,)


@pytest.mark.parametrize("acceleration", [4, 8])
def test_random_mask_samples_one_over_acceleration_on_average(acceleration):
    num_cols = 368
    counts = [s.num_sampled for s in draws(RandomMask([0.08], [acceleration]), num_cols, 2000)]
    assert np.mean(counts) == pytest.approx(num_cols / acceleration, abs=1.0)
    assert np.std(counts) > 1  # random, not a fixed pattern


@pytest.mark.parametrize("acceleration", [4, 8])
def test_equispaced_matches_formula_for_every_offset(acceleration):
    num_cols, center = 368, expected_center(368, 0.08)
    expected = {
        offset: center | set(range(offset, num_cols, acceleration))
        for offset in range(acceleration)
    }
    seen = set()
    for sampled in draws(EquispacedMask([0.08], [acceleration]), num_cols, 200):
        offset = next(o for o, cols in expected.items() if cols == as_set(sampled.mask))
        seen.add(offset)
    assert seen == set(expected)  # every offset in [0, acc) is drawn
    # Pinned counts: 92 lines + 29-column centre minus its overlap with the lines.
    assert {len(cols) for cols in expected.values()} == (
        {113, 114} if acceleration == 4 else {71, 72}
    )


def test_equispaced_fixed_offset_and_snu_offset():
    fixed = EquispacedMask([0.08], [4], offset=2)
    assert as_set(fixed(396, np.random.default_rng(0)).mask) == (
        expected_center(396, 0.08) | set(range(2, 396, 4))
    )
    with pytest.raises(ValueError, match="offset"):
        EquispacedMask([0.08, 0.08], [4, 8], offset=4)


@pytest.mark.parametrize("acceleration", [4, 8])
@pytest.mark.parametrize("num_cols", [368, 396, 372])
def test_equispaced_fraction_matches_formula_for_every_offset(num_cols, acceleration):
    center = expected_center(num_cols, 0.08)
    num_low = len(center)
    spacing = acceleration * (num_low - num_cols) / (num_low * acceleration - num_cols)
    expected = {}
    for offset in range(round(spacing)):
        lines, i = set(), 0
        while offset + i * spacing < num_cols - 1:
            lines.add(round(offset + i * spacing))  # Python round: half to even, like np.round
            i += 1
        expected[offset] = center | lines
    seen = set()
    for sampled in draws(EquispacedFractionMask([0.08], [acceleration]), num_cols, 300):
        seen.add(next(o for o, cols in expected.items() if cols == as_set(sampled.mask)))
    assert seen == set(expected)
    # Close to, not exactly, W / acc (the public fastMRI masks behave the same way).
    for cols in expected.values():
        assert abs(len(cols) - num_cols / acceleration) <= 2


def test_equispaced_fraction_pinned_counts_w368():
    counts = {s.num_sampled for s in draws(EquispacedFractionMask([0.08], [4]), 368, 200)}
    assert counts == {91, 92, 93}
    counts = {s.num_sampled for s in draws(EquispacedFractionMask([0.08], [8]), 368, 200)}
    assert counts == {45, 46, 47}


@pytest.mark.parametrize("acceleration", [4, 8])
@pytest.mark.parametrize("num_cols", [368, 396])
def test_magic_mask_is_conjugate_complementary(num_cols, acceleration):
    dc = num_cols // 2
    pairs = outside_center_pairs(num_cols, expected_center(num_cols, 0.08))
    for sampled in draws(MagicMask([0.08], [acceleration]), num_cols, 20):
        mask = sampled.mask
        # Never both a column and its mirror: the mirror is free by conjugate symmetry.
        assert all(not (mask[c] and mask[m]) for c, m in pairs)
        # Together they cover exactly the frequencies |k| = a (mod acc / 2): two offset classes
        # of acc, half a period apart, every pair of those classes covered.
        covered = {c - dc for c, m in pairs if mask[c] or mask[m]}
        classes = {k % acceleration for k in covered}
        assert len(classes) == 2
        low, high = sorted(classes)
        assert high - low == acceleration // 2
        assert covered == {c - dc for c, _ in pairs if (c - dc) % (acceleration // 2) == low}


def test_plain_equispaced_duplicates_mirrors_where_magic_does_not():
    # The SNU offset puts a line on DC, so every acquired line's mirror is acquired too.
    mask = SNUMask([0.08], [4])(396, np.random.default_rng(0)).mask
    pairs = outside_center_pairs(396, expected_center(396, 0.08))
    assert sum(bool(mask[c] and mask[m]) for c, m in pairs) > 40


def test_magic_odd_acceleration_has_no_mirrored_duplicates():
    pairs = outside_center_pairs(368, expected_center(368, 0.08))
    for sampled in draws(MagicMask([0.08], [3]), 368, 10):
        assert all(not (sampled.mask[c] and sampled.mask[m]) for c, m in pairs)


@pytest.mark.parametrize("acceleration", [4, 8])
@pytest.mark.parametrize("num_cols", [368, 396, 372, 320, 371])
def test_magic_fraction_hits_target_exactly(num_cols, acceleration):
    center = expected_center(num_cols, 0.08)
    dc = num_cols // 2
    for sampled in draws(MagicFractionMask([0.08], [acceleration]), num_cols, 30):
        assert sampled.num_sampled == round(num_cols / acceleration)
        mask = sampled.mask
        pairs = outside_center_pairs(num_cols, center)
        assert all(not (mask[c] and mask[m]) for c, m in pairs)
        # Near-equal spacing on each half: interior gaps differ by at most one column.
        for half in (range(dc + 1, num_cols), range(dc)):
            cols = [c for c in half if mask[c] and c not in center]
            gaps = np.diff(cols)
            assert len(cols) >= 2 and gaps.max() - gaps.min() <= 1


def test_magic_fraction_centre_wider_than_target_gets_no_lines():
    sampled = MagicFractionMask([0.5], [4])(100, np.random.default_rng(0))
    assert as_set(sampled.mask) == expected_center(100, 0.5)


def test_snu_public_mask_w396():
    acc4 = SNUMask([0.08], [4])
    masks = [acc4(396, np.random.default_rng(seed)).mask for seed in range(3)]
    assert all((m == masks[0]).all() for m in masks)  # deterministic, rng unused
    assert int(masks[0].sum()) == 123  # reference.md: "acc4 samples 123 lines"
    assert masks[0][396 // 2]  # a line on DC
    for acceleration in (4, 8):
        offset = (396 // 2) % acceleration
        expected = expected_center(396, 0.08) | set(range(offset, 396, acceleration))
        got = SNUMask([0.08], [acceleration])(396, np.random.default_rng(0))
        assert as_set(got.mask) == expected
    assert len(expected) == 77  # acc8: 49 lines + 32 centre - 4 shared


def test_pair_is_chosen_uniformly_and_consistently():
    mask_func = EquispacedMask([0.08, 0.04], [4, 8])
    samples = draws(mask_func, 400, 1000)
    share_acc4 = np.mean([s.acceleration == 4 for s in samples])
    assert share_acc4 == pytest.approx(0.5, abs=0.06)
    for s in samples:
        assert s.num_low_frequencies == (32 if s.acceleration == 4 else 16)


@pytest.mark.parametrize("name", sorted(MASK_TYPES))
def test_same_seed_same_mask_and_seeds_differ(name):
    mask_func = build_mask_func(name, [0.08], [4])
    first = mask_func(368, np.random.default_rng(7)).mask
    assert (mask_func(368, np.random.default_rng(7)).mask == first).all()
    others = [mask_func(368, np.random.default_rng(seed)).mask for seed in range(8)]
    if name != "snu":
        assert any((m != first).any() for m in others)


def test_mask_types_and_build_errors():
    assert set(MASK_TYPES) == {
        "random",
        "equispaced",
        "equispaced_fraction",
        "magic",
        "magic_fraction",
        "snu",
    }
    assert isinstance(build_mask_func("magic", [0.08], [4]), MagicMask)
    with pytest.raises(UserError, match="equispaced_fraction") as error:
        build_mask_func("gaussian", [0.08], [4])
    assert "gaussian" in str(error.value)
    with pytest.raises(UserError, match="random"):
        build_mask_func("random", [0.08, 0.04], [4])
    with pytest.raises(UserError, match="snu"):
        build_mask_func("snu", [0.08], [4], offset=1)


@pytest.mark.parametrize(
    ("fractions", "accelerations"),
    [
        ([0.08, 0.04], [4]),
        ([], []),
        ([1.5], [4]),
        ([-0.1], [4]),
        ([0.08], [0]),
        ([0.08], [2.5]),
        ([0.08], [True]),
        ([0.08], ["4"]),
    ],
)
def test_invalid_mask_arguments_raise(fractions, accelerations):
    with pytest.raises(ValueError):
        RandomMask(fractions, accelerations)


def test_invalid_num_cols_and_integral_float_acceleration():
    mask_func = EquispacedMask([0.08], [4.0])  # YAML may give 4.0
    assert mask_func.accelerations == (4,)
    for bad in (0, -3, 3.5, True):
        with pytest.raises(ValueError, match="num_cols"):
            mask_func(bad, np.random.default_rng(0))


def test_sampled_mask_is_read_only_copy():
    source = np.array([1, 0, 1], dtype=bool)
    sampled = SampledMask(source, 1, 2)
    source[1] = True
    assert not sampled.mask[1]
    with pytest.raises(ValueError):
        sampled.mask[0] = False
    assert sampled.effective_acceleration == pytest.approx(1.5)


def test_seeded_rng_is_stable():
    def raw(key, epoch=None):
        return int(seeded_rng(key, epoch).bit_generator.random_raw())

    assert raw("file1.h5/3") == raw("file1.h5/3")
    assert len({raw("file1.h5/3"), raw("file1.h5/4"), raw("file2.h5/3")}) == 3
    assert len({raw("k"), raw("k", 0), raw("k", 1)}) == 3
    # Pinned: a salted hash (Python's hash()) would change this between processes.
    assert raw("brain_acc4_1.h5/0") == 16107945014971211531
    with pytest.raises(ValueError, match="epoch"):
        seeded_rng("k", -1)


def test_apply_padding():
    mask = np.ones(10, dtype=bool)
    padded = apply_padding(mask, 2, 7)
    assert as_set(padded) == {2, 3, 4, 5, 6}
    assert mask.all()  # input untouched
    batch = apply_padding(np.ones((3, 10)), 0, 10)
    assert batch.all()
    assert as_set(apply_padding(np.ones((2, 10)), 1, 9)[1]) == set(range(1, 9))
    for left, right in ((3, 2), (-1, 5), (0, 11)):
        with pytest.raises(ValueError, match="padding"):
            apply_padding(mask, left, right)


def test_augmentation_probability_schedules():
    base, pool = SNUMask([0.08], [4]), [SNUMask([0.08], [8])]
    linear = MaskAugmentation(base, pool, "linear", p_max=0.6, start=0.2, end=0.7)
    assert [linear.probability(p) for p in (0.0, 0.2, 0.45, 0.7, 1.0, 1.3)] == pytest.approx(
        [0.0, 0.0, 0.3, 0.6, 0.6, 0.6]
    )
    delayed = MaskAugmentation(base, pool, "delayed", p_max=0.6, start=0.2, end=0.7)
    assert [delayed.probability(p) for p in (0.0, 0.19, 0.2, 0.5, 1.0)] == pytest.approx(
        [0.0, 0.0, 0.6, 0.6, 0.6]
    )
    constant = MaskAugmentation(base, pool, "constant", p_max=0.25, start=0.5)
    assert constant.probability(0.0) == constant.probability(1.0) == 0.25
    step = MaskAugmentation(base, pool, "linear", p_max=1.0, start=0.5, end=0.5)
    assert (step.probability(0.49), step.probability(0.5)) == (0.0, 1.0)
    with pytest.raises(ValueError, match="progress"):
        linear.probability(math.nan)


def test_augmentation_draws_from_pool_with_scheduled_frequency():
    base = SNUMask([0.08], [4])
    pool = [SNUMask([0.08], [6]), SNUMask([0.08], [8])]
    augment = MaskAugmentation(base, pool, "linear", p_max=0.8)
    rng = np.random.default_rng(0)
    at_start = [augment(396, rng, progress=0.0).acceleration for _ in range(300)]
    assert set(at_start) == {4}
    halfway = np.array([augment(396, rng, progress=0.5).acceleration for _ in range(4000)])
    assert np.mean(halfway != 4) == pytest.approx(0.4, abs=0.03)
    assert np.mean(halfway == 6) == pytest.approx(np.mean(halfway == 8), abs=0.03)


def test_augmentation_pool_of_all_types_and_invalid_arguments():
    pool = all_mask_types([0.08], [4])
    assert [type(m) for m in pool] == list(MASK_TYPES.values())
    augment = MaskAugmentation(SNUMask([0.08], [4]), pool, "constant", p_max=1.0)
    kinds = {augment(368, np.random.default_rng(s), 0.0).mask.tobytes() for s in range(30)}
    assert len(kinds) > 5
    base = SNUMask([0.08], [4])
    for kwargs in (
        {"schedule": "cosine"},
        {"p_max": 1.5},
        {"start": 0.8, "end": 0.2},
        {"end": 1.2},
    ):
        with pytest.raises(ValueError):
            MaskAugmentation(base, pool, **kwargs)
    with pytest.raises(ValueError, match="pool"):
        MaskAugmentation(base, [], p_max=0.5)
    assert MaskAugmentation(base, [], p_max=0.0).probability(1.0) == 0.0


def test_mask_bank_one_fixed_mask_per_sample_and_acceleration():
    bank = MaskBank(accelerations=(4, 8), center_fraction=0.08, kind="snu")
    assert bank.copies == 2
    acc4, acc8 = bank.mask_for("a.h5/0", 396, 0), bank.mask_for("a.h5/0", 396, 1)
    assert (acc4.acceleration, acc8.acceleration) == (4, 8)
    assert acc4.num_sampled == 123
    with pytest.raises(IndexError):
        bank.mask_for("a.h5/0", 396, 2)

    random_bank = MaskBank(accelerations=(4, 8), kind="random")
    again = MaskBank(accelerations=(4, 8), kind="random")
    first = random_bank.mask_for("a.h5/0", 368, 0).mask
    assert (again.mask_for("a.h5/0", 368, 0).mask == first).all()  # fixed across instances
    assert (random_bank.mask_for("a.h5/0", 368, 0).mask == first).all()  # and across calls
    assert (random_bank.mask_for("b.h5/0", 368, 0).mask != first).any()  # per sample
    with pytest.raises(UserError, match="kind|mask type"):
        MaskBank(kind="poisson")
