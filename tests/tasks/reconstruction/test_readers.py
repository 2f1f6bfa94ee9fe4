"""k-space readers: fastMRI HDF5 round trips and header parsing, the handle cache, SNU pairs, raw
.npy/.npz/.mat/.cfl files, the slice index cache, every user error, and the two real files in
../shared/data/mri (skipped without them)."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from podium.errors import UserError
from podium.tasks.reconstruction import readers
from podium.tasks.reconstruction.readers import (
    SliceIndex,
    VolumeInfo,
    close_all,
    read_slice,
    read_snu_info,
    read_snu_slice,
    read_volume_info,
    snu_volume_pairs,
    write_fastmri_h5,
)  # fmt: skip
from podium.tasks.reconstruction.rawfiles import read_cfl, read_kspace_file, write_cfl

MRI_DATA = (Path(__file__).parents[3] / ".." / "shared" / "data" / "mri").resolve()
NS = "{http://www.ismrm.org/ISMRMRD}"


@pytest.fixture(autouse=True)
def _close_handles():
    yield
    close_all()


def complex_array(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


@pytest.fixture
def volume(tmp_path):
    """S=2, C=3, H=16, W=12; target 8 x 6; columns 2..9 acquired; a test-style mask."""
    kspace = complex_array((2, 3, 16, 12))
    target = np.random.default_rng(1).random((2, 8, 6)).astype(np.float32)
    mask = np.zeros(12, bool)
    mask[[2, 5, 6, 9]] = True
    path = write_fastmri_h5(tmp_path / "vol.h5", kspace, target, padding=(2, 10),
                            acquisition="AXT2", attrs={"acceleration": 4}, mask=mask)
    return path, kspace, target, mask


# ---- fastMRI HDF5 ---------------------------------------------------------------------------


def test_write_read_volume_info_roundtrip(volume):
    path, _, target, mask = volume
    info = read_volume_info(path)
    assert (info.num_slices, info.num_coils, info.shape) == (2, 3, (16, 12))
    assert info.recon_size == (8, 6)
    assert (info.padding_left, info.padding_right) == (2, 10)
    assert info.acquisition == "AXT2" and info.anatomy == "brain"
    assert info.max_value == pytest.approx(float(target.max()))
    assert info.norm == pytest.approx(float(np.linalg.norm(target)), rel=1e-6)
    assert info.has_target and info.target_key == "reconstruction_rss"
    assert info.acceleration == 4 and info.target_path is None
    np.testing.assert_array_equal(info.mask, mask)


def test_header_is_ismrmrd_xml_parsed_the_fastmri_way(volume):
    path = volume[0]
    with h5py.File(path, "r") as f:
        raw = f["ismrmrd_header"][()]
        assert isinstance(raw, bytes)
        assert f.attrs["patient_id"] == "vol"
    root = ET.fromstring(raw)
    assert root.tag == NS + "ismrmrdHeader"
    value = lambda p: int(root.find("/".join(NS + t for t in p.split("/"))).text)
    enc, rec = "encoding/encodedSpace/matrixSize", "encoding/reconSpace/matrixSize"
    assert (value(enc + "/x"), value(enc + "/y"), value(enc + "/z")) == (16, 12, 1)
    assert (value(rec + "/x"), value(rec + "/y")) == (8, 6)
    center = value("encoding/encodingLimits/kspace_encoding_step_1/center")
    limit = value("encoding/encodingLimits/kspace_encoding_step_1/maximum") + 1
    left = value(enc + "/y") // 2 - center
    assert (left, left + limit) == (2, 10)


def test_defaults_without_target_padding_or_mask(tmp_path):
    path = write_fastmri_h5(tmp_path / "file1000001.h5", complex_array((1, 2, 8, 6)), None,
                            acquisition="CORPD_FBK")
    info = read_volume_info(path)
    assert (info.padding_left, info.padding_right) == (0, 6)
    assert info.recon_size == (8, 6)
    assert not info.has_target and info.target_key is None and info.max_value is None
    assert info.mask is None and info.anatomy == "knee"
    assert read_slice(path, 0)["target"] is None


def test_write_is_atomic_and_leaves_no_temp_files(volume):
    path = volume[0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["vol.h5"]
    with pytest.raises(ValueError):
        write_fastmri_h5(path, complex_array((1, 1, 4, 4)), None, padding=(3, 2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["vol.h5"]
    assert read_volume_info(path).num_slices == 2  # the failed write did not touch it


def test_read_slice_values(volume):
    path, kspace, target, mask = volume
    sample = read_slice(path, 1)
    assert sample["kspace"].dtype == np.complex64 and sample["kspace"].shape == (3, 16, 12)
    np.testing.assert_array_equal(sample["kspace"], kspace[1])
    assert sample["target"].dtype == np.float32
    np.testing.assert_array_equal(sample["target"], target[1])
    np.testing.assert_array_equal(sample["mask"], mask)
    attrs = sample["attrs"]
    assert attrs["acquisition"] == "AXT2" and attrs["acceleration"] == 4
    assert (attrs["padding_left"], attrs["padding_right"], attrs["recon_size"]) == (2, 10, (8, 6))
    np.testing.assert_array_equal(read_slice(path, -1)["kspace"], kspace[1])
    with pytest.raises(IndexError, match="vol.h5"):
        read_slice(path, 2)


def test_handle_cache_reuse_close_all_and_fork(volume, monkeypatch):
    path = volume[0]
    read_slice(path, 0)
    handle = readers._handles[str(path.absolute())]
    read_slice(path, 1)
    assert readers._handles[str(path.absolute())] is handle and len(readers._handles) == 1
    close_all()
    assert not readers._handles and not handle.id.valid
    read_slice(path, 0)
    parent_handle = readers._handles[str(path.absolute())]
    monkeypatch.setattr(readers.os, "getpid", lambda: -12345)  # as in a forked worker
    read_slice(path, 0)
    child_handle = readers._handles[str(path.absolute())]
    assert child_handle is not parent_handle and parent_handle.id.valid
    close_all()
    assert not child_handle.id.valid


def test_rewriting_a_cached_file_serves_the_new_data(volume):
    path, kspace = volume[0], volume[1]
    read_slice(path, 0)
    write_fastmri_h5(path, 2 * kspace, None)
    np.testing.assert_array_equal(read_slice(path, 0)["kspace"], 2 * kspace[0])


def test_missing_kspace_names_file_and_key(tmp_path):
    path = tmp_path / "nokspace.h5"
    with h5py.File(path, "w") as f:
        f["reconstruction_rss"] = np.zeros((1, 4, 4), np.float32)
    for call in (lambda: read_volume_info(path), lambda: read_slice(path, 0)):
        with pytest.raises(UserError, match=r"nokspace\.h5.*'kspace'"):
            call()


def test_non_complex_kspace_names_file_key_and_dtype(tmp_path):
    path = tmp_path / "real.h5"
    with h5py.File(path, "w") as f:
        f["kspace"] = np.zeros((1, 2, 4, 4), np.float32)
    with pytest.raises(UserError, match=r"real\.h5, key 'kspace'.*got float32"):
        read_volume_info(path)


def test_nan_in_slice_names_file_key_and_slice(tmp_path):
    kspace = complex_array((2, 1, 4, 4))
    kspace[1, 0, 2, 2] = np.nan
    path = write_fastmri_h5(tmp_path / "nan.h5", kspace, None)
    read_slice(path, 0)  # only the bad slice is refused
    with pytest.raises(UserError, match=r"nan\.h5, key 'kspace', slice 1"):
        read_slice(path, 1)


def test_mask_width_mismatch_names_both_widths(tmp_path):
    path = write_fastmri_h5(tmp_path / "mask.h5", complex_array((1, 1, 4, 12)), None)
    with h5py.File(path, "a") as f:
        f["mask"] = np.ones(10, np.float32)
    for call in (lambda: read_volume_info(path), lambda: read_slice(path, 0)):
        with pytest.raises(UserError, match=r"mask\.h5.*10 columns.*W is 12"):
            call()


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(UserError, match="absent.h5"):
        read_volume_info(tmp_path / "absent.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="text.h5"):
        read_slice(tmp_path / "text.h5", 0)


# ---- SNU layout -----------------------------------------------------------------------------


def write_snu(root, name, slices=2, coils=2, H=8, W=10, mask_width=None, image=True, seed=0):
    (root / "kspace").mkdir(parents=True, exist_ok=True)
    kspace = complex_array((slices, coils, H, W), seed)
    mask = np.zeros(mask_width or W, np.float32)
    mask[::2] = 1
    with h5py.File(root / "kspace" / name, "w") as f:
        f["kspace"], f["mask"] = kspace, mask
    label = np.random.default_rng(seed).random((slices, 384, 384)).astype(np.float32)
    if image:
        (root / "image").mkdir(exist_ok=True)
        with h5py.File(root / "image" / name, "w") as f:
            f["image_label"], f["image_input"] = label, label / 2
            f.attrs["max"] = float(label.max())
    return kspace, mask, label


def test_snu_pairs_match_by_name(tmp_path):
    write_snu(tmp_path, "knee_acc8_2.h5")
    write_snu(tmp_path, "brain_acc4_1.h5")
    pairs = snu_volume_pairs(tmp_path)
    assert [(v.name, v.anatomy, v.acceleration) for v in pairs] == [
        ("brain_acc4_1", "brain", 4), ("knee_acc8_2", "knee", 8)]
    assert pairs[0].kspace_path == tmp_path / "kspace" / "brain_acc4_1.h5"
    assert pairs[0].image_path == tmp_path / "image" / "brain_acc4_1.h5"


def test_snu_leaderboard_acceleration_from_folder(tmp_path):
    root = tmp_path / "leaderboard" / "acc8"
    write_snu(root, "brain_test1.h5")
    (volume,) = snu_volume_pairs(root)
    assert (volume.name, volume.anatomy, volume.acceleration) == ("brain_test1", "brain", 8)


def test_snu_missing_partner_names_the_file(tmp_path):
    write_snu(tmp_path, "brain_acc4_1.h5")
    write_snu(tmp_path, "brain_acc4_2.h5", image=False)
    with pytest.raises(UserError, match="brain_acc4_2.h5"):
        snu_volume_pairs(tmp_path)
    assert snu_volume_pairs(tmp_path, require_images=False)[1].image_path is None
    (tmp_path / "kspace" / "brain_acc4_1.h5").unlink()
    with pytest.raises(UserError, match=r"image/brain_acc4_1\.h5 has no k-space"):
        snu_volume_pairs(tmp_path, require_images=False)


def test_snu_slice_and_info(tmp_path):
    kspace, mask, label = write_snu(tmp_path, "brain_acc4_1.h5")
    (volume,) = snu_volume_pairs(tmp_path)
    sample = read_snu_slice(volume.kspace_path, volume.image_path, 1)
    np.testing.assert_array_equal(sample["kspace"], kspace[1])
    assert sample["kspace"].dtype == np.complex64 and sample["mask"].dtype == bool
    np.testing.assert_array_equal(sample["mask"], mask != 0)
    assert sample["target"].shape == (384, 384) and sample["target"].dtype == np.float32
    np.testing.assert_array_equal(sample["target"], label[1])
    np.testing.assert_allclose(sample["input"], label[1] / 2)
    assert sample["max_value"] == pytest.approx(float(label.max()))
    info = read_snu_info(volume.kspace_path, volume.image_path)
    assert (info.num_slices, info.num_coils, info.shape, info.recon_size) == (2, 2, (8, 10),
                                                                              (384, 384))
    assert info.target_key == "image_label" and info.target_path == volume.image_path
    assert (info.acceleration, info.anatomy) == (4, "brain")
    assert info.max_value == pytest.approx(float(label.max()))
    no_image = read_snu_slice(volume.kspace_path, None, 0)
    assert no_image["target"] is None and no_image["max_value"] is None


def test_snu_mask_width_mismatch(tmp_path):
    write_snu(tmp_path, "knee_acc4_1.h5", W=10, mask_width=12)
    (volume,) = snu_volume_pairs(tmp_path)
    for call in (lambda: read_snu_slice(volume.kspace_path, volume.image_path, 0),
                 lambda: read_snu_info(volume.kspace_path)):
        with pytest.raises(UserError, match=r"knee_acc4_1\.h5.*12 columns.*W is 10"):
            call()


# ---- raw k-space files ----------------------------------------------------------------------


def test_npy_axes_auto_and_explicit(tmp_path):
    chw = complex_array((4, 10, 6))
    np.save(tmp_path / "hwc.npy", chw.transpose(1, 2, 0))
    out = read_kspace_file(tmp_path / "hwc.npy")
    assert out.dtype == np.complex64 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, chw)
    np.testing.assert_array_equal(read_kspace_file(tmp_path / "hwc.npy", axes="HWC"), chw)
    np.save(tmp_path / "hcw.npy", chw.transpose(1, 0, 2))  # coils (the smallest axis) in the middle
    np.testing.assert_array_equal(read_kspace_file(tmp_path / "hcw.npy"), chw)
    np.save(tmp_path / "chw.npy", chw[:, None].astype(np.complex128))
    np.testing.assert_array_equal(read_kspace_file(tmp_path / "chw.npy", axes="C1HW"), chw)
    np.save(tmp_path / "wh.npy", chw[0].T)  # one coil, transposed: the axes string fixes it
    np.testing.assert_array_equal(read_kspace_file(tmp_path / "wh.npy", axes="WH"), chw[:1])
    np.testing.assert_array_equal(read_kspace_file(tmp_path / "wh.npy"), chw[:1].transpose(0, 2, 1))


def test_npz_key_choice(tmp_path):
    chw = complex_array((2, 5, 7))
    np.savez(tmp_path / "k.npz", a=chw, b=chw)
    np.testing.assert_array_equal(read_kspace_file(tmp_path / "k.npz", key="b", axes="CHW"), chw)
    with pytest.raises(UserError, match=r"k\.npz.*\['a', 'b'\]"):
        read_kspace_file(tmp_path / "k.npz")


@pytest.mark.parametrize(
    "array, axes, message",
    [
        (np.zeros((4, 5, 3)), "auto", "expected complex k-space, got float64"),
        (np.full((4, 5, 3), np.nan + 0j), "auto", "NaN or Inf"),
        (np.zeros((2, 3, 4, 5), np.complex64), "auto", "2-D or 3-D"),
        (np.zeros((4, 4, 5), np.complex64), "auto", "no single smallest"),
        (np.zeros((4, 5, 3), np.complex64), "HW", "must name each"),
        (np.zeros((4, 5, 3), np.complex64), "HHC", "exactly one H"),
        (np.zeros((4, 5, 3), np.complex64), "H1W", "non-singleton"),
    ],
)
def test_raw_file_errors_name_the_file(tmp_path, array, axes, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(UserError, match=message) as excinfo:
        read_kspace_file(tmp_path / "bad.npy", axes=axes)
    assert "bad.npy" in str(excinfo.value)


def test_pickled_or_foreign_numpy_files_are_user_errors_naming_the_file(tmp_path):
    """An object array (e.g. another task's table saved with pickling) is refused, never
    unpickled; a file that is not numpy at all likewise."""
    np.save(tmp_path / "objects.npy", np.array([{"landmarks": [1, 2]}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "objects.npz", kspace=np.array([None, 1], dtype=object))
    (tmp_path / "text.npy").write_text("not numpy")
    for name in ("objects.npy", "objects.npz", "text.npy"):
        with pytest.raises(UserError, match="complex multi-coil k-space") as excinfo:
            read_kspace_file(tmp_path / name)
        assert name in str(excinfo.value)


def test_h5_of_another_task_names_the_datasets_it_has(tmp_path):
    path = tmp_path / "segmentation.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((4, 4), np.float32)
        f["label"] = np.zeros((4, 4), np.uint8)
    with pytest.raises(UserError, match=r"segmentation\.h5.*\['image', 'label'\].*expects") as excinfo:
        read_volume_info(path)
    assert "kspace" in str(excinfo.value)


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "k.txt").write_text("1 2 3")
    with pytest.raises(UserError, match="unsupported"):
        read_kspace_file(tmp_path / "k.txt")
    with pytest.raises(UserError, match="absent.npy"):
        read_kspace_file(tmp_path / "absent.npy")


def test_mat_v5_roundtrip_and_key_errors(tmp_path):
    chw = complex_array((3, 10, 8))
    scipy.io.savemat(tmp_path / "one.mat", {"DATA": chw.transpose(1, 2, 0)})
    np.testing.assert_array_equal(read_kspace_file(tmp_path / "one.mat"), chw)
    scipy.io.savemat(tmp_path / "two.mat", {"DATA": chw.transpose(1, 2, 0), "mask": np.ones(8)})
    with pytest.raises(UserError, match=r"two\.mat.*DATA.*mask"):
        read_kspace_file(tmp_path / "two.mat")
    with pytest.raises(UserError, match=r"two\.mat.*'mask'.*got float64"):
        read_kspace_file(tmp_path / "two.mat", key="mask")
    with pytest.raises(UserError, match=r"two\.mat: no variable 'kspace'"):
        read_kspace_file(tmp_path / "two.mat", key="kspace")
    np.testing.assert_array_equal(read_kspace_file(tmp_path / "two.mat", key="DATA"), chw)


def write_mat73(path, name, array):
    """What MATLAB's `save -v7.3` writes: HDF5 after a 512-byte MAT header, axes reversed,
    complex as a (real, imag) compound."""
    compound = np.dtype([("real", "<f8"), ("imag", "<f8")])
    data = np.empty(array.T.shape, compound)
    data["real"], data["imag"] = array.T.real, array.T.imag
    with h5py.File(path, "w", userblock_size=512) as f:
        f[name] = data
        f[name].attrs["MATLAB_class"] = np.bytes_("double")
        f.create_group("#refs#")
    with open(path, "r+b") as out:
        out.write(b"MATLAB 7.3 MAT-file".ljust(116) + bytes(8) + b"\x00\x02IM")


def test_mat_v73_complex_compound_and_transposed(tmp_path):
    hwc = complex_array((10, 8, 3)).astype(np.complex128)
    write_mat73(tmp_path / "v73.mat", "DATA", hwc)
    assert scipy.io.matlab.matfile_version(tmp_path / "v73.mat")[0] == 2
    out = read_kspace_file(tmp_path / "v73.mat")
    assert out.shape == (3, 10, 8)
    np.testing.assert_array_equal(out, hwc.transpose(2, 0, 1).astype(np.complex64))


def test_cfl_roundtrip_and_bart_axes(tmp_path):
    bart = complex_array((1, 9, 7, 4))  # [read=1, phase1, phase2, coil]
    write_cfl(tmp_path / "ksp", bart)
    assert (tmp_path / "ksp.hdr").read_text().splitlines()[1] == "1 9 7 4"
    np.testing.assert_array_equal(read_cfl(tmp_path / "ksp"), bart)
    np.testing.assert_array_equal(read_cfl(tmp_path / "ksp.cfl"), bart)
    expected = bart[0].transpose(2, 0, 1)
    for path in ("ksp", "ksp.cfl", "ksp.hdr"):
        np.testing.assert_array_equal(read_kspace_file(tmp_path / path), expected)
    np.testing.assert_array_equal(read_kspace_file(tmp_path / "ksp", axes="bart"), expected)
    np.testing.assert_array_equal(read_kspace_file(tmp_path / "ksp", axes="1WHC"),
                                  expected.transpose(0, 2, 1))
    write_cfl(tmp_path / "readout", bart.reshape(9, 7, 1, 4))  # [read, phase1, 1, coil]
    np.testing.assert_array_equal(read_kspace_file(tmp_path / "readout", axes="bart"), expected)


def test_cfl_size_mismatch(tmp_path):
    write_cfl(tmp_path / "ksp", complex_array((1, 4, 4, 2)))
    (tmp_path / "ksp.hdr").write_text("# Dimensions\n1 4 4 3\n")
    with pytest.raises(UserError, match=r"ksp\.cfl: 32 complex values.*\[1, 4, 4, 3\]"):
        read_cfl(tmp_path / "ksp")


# ---- slice index ------------------------------------------------------------------------------


def test_slice_index_lists_pairs_and_caches_metadata(tmp_path, monkeypatch):
    a = write_fastmri_h5(tmp_path / "a.h5", complex_array((2, 1, 4, 6)), None)
    b = write_fastmri_h5(tmp_path / "b.h5", complex_array((3, 1, 4, 6)), None,
                         mask=np.arange(6) % 2 == 0)
    cache = tmp_path / "cache"
    index = SliceIndex.build([a, b], cache_dir=cache)
    assert len(index) == 5 and [v.path for v in index.volumes] == [a, b]
    info, slice_index = index[3]
    assert info.path == b and slice_index == 1 and index[-1][1] == 2
    assert json.loads((cache / "volume_info.json").read_text())["version"] == 1

    def must_not_open(path):
        raise AssertionError(f"read_volume_info({path}) called despite the cache")

    monkeypatch.setattr(readers, "read_volume_info", must_not_open)
    again = SliceIndex.build([a, b], cache_dir=cache)
    assert len(again) == 5
    np.testing.assert_array_equal(again.volumes[1].mask, np.arange(6) % 2 == 0)
    assert again.volumes[1].to_json() == index.volumes[1].to_json()
    monkeypatch.chdir(tmp_path)  # a relative name of a cached file keeps the caller's name
    assert SliceIndex.build(["a.h5"], cache_dir=cache).volumes[0].path == Path("a.h5")
    with pytest.raises(UserError, match="absent.h5"):
        SliceIndex.build([tmp_path / "absent.h5"], cache_dir=cache)

    calls = []
    monkeypatch.setattr(readers, "read_volume_info",
                        lambda p: calls.append(p) or VolumeInfo.from_json(
                            index.volumes[0].to_json() | {"path": str(p), "num_slices": 4}))
    write_fastmri_h5(a, complex_array((4, 1, 4, 6)), None)  # size and mtime change
    changed = SliceIndex.build([a, b], cache_dir=cache)
    assert calls == [a] and len(changed) == 7


def test_slice_index_without_cache_and_with_snu(tmp_path):
    write_snu(tmp_path, "brain_acc4_1.h5", slices=3)
    index = SliceIndex.build(snu_volume_pairs(tmp_path))
    assert len(index) == 3 and index[2][0].target_key == "image_label"
    cached = SliceIndex.build(snu_volume_pairs(tmp_path), cache_dir=tmp_path / "c")
    assert SliceIndex.build(snu_volume_pairs(tmp_path), cache_dir=tmp_path / "c").volumes[0] \
        .target_path == cached.volumes[0].target_path == tmp_path / "image" / "brain_acc4_1.h5"


# ---- real data --------------------------------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.skipif(not MRI_DATA.is_dir(), reason=f"{MRI_DATA} is not available")
def test_real_espirit_mat_is_zero_padded_outside_columns_44_to_211():
    kspace = read_kspace_file(MRI_DATA / "espirit_brain_8ch.mat")  # DATA: readout x phase x coil
    assert kspace.shape == (8, 320, 256) and kspace.dtype == np.complex64
    energy = (np.abs(kspace) ** 2).sum(axis=(0, 1))
    outside = energy[:44].sum() + energy[212:].sum()
    assert outside <= 1e-12 * energy.sum()
    assert (energy[44:212] > 0).all()


@pytest.mark.realdata
@pytest.mark.skipif(not MRI_DATA.is_dir(), reason=f"{MRI_DATA} is not available")
def test_real_bart_cfl_shape_and_sampling():
    kspace = read_kspace_file(MRI_DATA / "bart_brain_undersampled" / "ksp")  # 1 x 180 x 230 x 8
    assert kspace.shape == (8, 180, 230) and kspace.dtype == np.complex64
    assert np.array_equal(kspace, read_kspace_file(MRI_DATA / "bart_brain_undersampled" / "ksp",
                                                   axes="bart"))
    assert (kspace != 0).mean() == pytest.approx(0.127, abs=0.002)  # about 12.7 % kept
