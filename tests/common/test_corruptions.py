"""Corruptions are deterministic per (seed, index), keep shape/dtype/type, and use no global RNG."""

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from podium.common.corruptions import CORRUPTIONS, CorruptedDataset, corrupt


def _image(dtype=torch.uint8, shape=(3, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    return torch.rand(shape, generator=g, dtype=dtype)


def test_same_rng_state_gives_same_corruption():
    img = _image()
    a = corrupt(img, np.random.default_rng([7, 3]))
    b = corrupt(img, np.random.default_rng([7, 3]))
    assert torch.equal(a, b)
    assert not torch.equal(a, img)


def test_different_seeds_give_different_corruptions():
    img = _image()
    outs = [corrupt(img, np.random.default_rng([s, 0])) for s in range(6)]
    assert len({o.numpy().tobytes() for o in outs}) > 1


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_each_op_changes_the_image_and_keeps_shape_dtype_range(name, dtype):
    img = _image(dtype)
    out = corrupt(img, np.random.default_rng(1), ops=[name])
    assert out.shape == img.shape and out.dtype == img.dtype
    assert not torch.equal(out, img)
    if dtype == torch.float32:
        assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("name", ["rotate90", "rotate_small", "blur", "contrast"])
def test_ops_work_on_grey_and_non_square_images(name):
    img = _image(shape=(1, 8, 12))
    out = corrupt(img, np.random.default_rng(2), ops=[name])
    assert out.shape == img.shape


def test_tv_tensor_type_is_kept_and_input_untouched():
    img = tv_tensors.Image(_image())
    before = img.clone()
    out = corrupt(img, np.random.default_rng(0), ops=["noise", "hflip"])
    assert isinstance(out, tv_tensors.Image)
    assert torch.equal(img, before)


def test_severity_zero_is_valid():
    img = _image(torch.float32)
    out = corrupt(img, np.random.default_rng(0), severity=0.0, ops=["noise", "blur", "rotate_small"])
    assert torch.allclose(out, img, atol=1e-5)


def test_unknown_op_is_rejected():
    with pytest.raises(ValueError, match="valid"):
        corrupt(_image(), np.random.default_rng(0), ops=["smudge"])


def test_global_rngs_are_untouched():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    corrupt(_image(), np.random.default_rng(0), ops=list(CORRUPTIONS))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()


def test_corrupted_dataset_is_deterministic_per_index():
    images = torch.stack([_image(seed=i) for i in range(5)])
    labels = torch.arange(5) % 2
    a = CorruptedDataset((images, labels), seed=11)
    b = CorruptedDataset((images, labels), seed=11)
    # Access order must not matter: item 3 first in one, last in the other.
    a3 = a[3][0]
    b_items = [b[i][0] for i in range(5)]
    assert torch.equal(a3, b_items[3])
    assert a[1][1] == 1 and a.targets == [0, 1, 0, 1, 0]
    assert a.in_chans == 3 and a.classes == ["0", "1"]
    c = CorruptedDataset((images, labels), seed=12)
    assert any(not torch.equal(c[i][0], b_items[i]) for i in range(5))


def test_corrupted_dataset_wraps_a_dataset_and_applies_the_transform():
    class Base(torch.utils.data.Dataset):
        classes = ["a", "b"]
        targets = [0, 1]
        in_chans = 3

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return _image(seed=i), self.targets[i]

        def sample_id(self, i):
            return f"base-{i}"

    ds = CorruptedDataset(Base(), seed=0, transform=lambda x: x.float() / 255)
    x, y = ds[1]
    assert x.dtype == torch.float32 and type(x) is torch.Tensor and y == 1
    assert ds.sample_id(1) == "base-1" and ds.classes == ["a", "b"] and len(ds) == 2


def test_the_corrupted_test_split_is_the_same_as_before_new_ops_were_added():
    """Sums pinned from the nine-op version: new ops join training, not the test split."""
    img = _image(shape=(3, 24, 24))
    sums = [int(corrupt(img, np.random.default_rng([1234, i])).sum()) for i in range(12)]
    assert sums == [217414, 213197, 241594, 262210, 213087, 213187, 213214, 216855, 227519, 217458,
                    217254, 217631]


def test_jpeg_skips_channel_counts_jpeg_cannot_hold():
    img = _image(shape=(4, 16, 16))
    assert torch.equal(corrupt(img, np.random.default_rng(0), ops=["jpeg"]), img)


# ---- Corrupt, the training transform --------------------------------------------------------

from podium.common.augment import build_augmentations  # noqa: E402
from podium.common.corruptions import Corrupt  # noqa: E402
from podium.errors import UserError  # noqa: E402


def test_corrupt_transform_is_reproducible_from_the_torch_seed_and_keeps_the_image_type():
    t = Corrupt(severity=1.0)
    img = tv_tensors.Image(_image())
    torch.manual_seed(5)
    a = t(img)
    torch.manual_seed(5)
    b = t(img)
    assert isinstance(a, tv_tensors.Image) and a.dtype == torch.uint8 and a.shape == img.shape
    assert torch.equal(a, b) and not torch.equal(a, img)


def test_corrupt_transform_with_p_zero_is_the_identity():
    img = tv_tensors.Image(_image())
    assert torch.equal(Corrupt(p=0.0)(img), img)


def test_corrupt_transform_refuses_geometric_ops_next_to_a_mask_and_spares_the_mask_otherwise():
    img, mask = tv_tensors.Image(_image()), tv_tensors.Mask(torch.zeros(16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="Mask"):
        Corrupt()(img, mask)
    torch.manual_seed(0)
    out_img, out_mask = Corrupt(ops=["noise", "brightness"])(img, mask)
    assert torch.equal(out_mask, mask) and not torch.equal(out_img, img)


def test_corrupt_is_an_augmentation_in_configs_and_a_bad_entry_names_it():
    (t,) = build_augmentations([{"name": "Corrupt", "ops": ["jpeg", "perspective"], "p": 0.5}], 3, 16)
    assert isinstance(t, Corrupt)
    with pytest.raises(UserError, match=r"data.augment\[0\] \(Corrupt\).*unknown corruption"):
        build_augmentations([{"name": "Corrupt", "ops": ["smudge"]}], 3, 16)


def test_corrupt_reaches_the_training_images_of_a_dataset_from_config():
    from podium.config import compose
    from podium.engine import registry

    cfg = compose(["experiment=digits", "data.image_size=16", "+data.augment=[{name: Corrupt, p: 1.0}]"])
    task = registry.build("task", cfg.task.name, cfg)
    train = task.build_datasets()["train"]
    torch.manual_seed(0)
    a, _ = train[0]
    torch.manual_seed(1)
    b, _ = train[0]
    assert not torch.equal(a, b)  # the corruption is drawn per call
