"""Export and serving beyond classification: segmentation (a PNG mask) and landmarks (points in
original pixels and mm). For each family a tiny run is trained; its ONNX export must agree with
PyTorch within 1e-4 on real validation inputs, and the served answer (ONNX Runtime, the default
backend) must equal what `podium predict` writes for the same image file.
"""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from typer.testing import CliRunner

from podium.cli import app
from podium.serve.export import export_run, load_serving_module, parity
from podium.serve.server import ServeConfig, ServerProcess, free_port

CHILD_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FAST = ["trainer.batch_size=4", "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false",
        "trainer.max_epochs=1"]


def train(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output


def predict(run_dir: Path, images: list[Path], out: Path) -> Path:
    result = CliRunner().invoke(app, ["predict", str(run_dir), *map(str, images), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


# ---- segmentation ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> tuple[Path, list[Path]]:
    tmp = tmp_path_factory.mktemp("seg-serve")
    run_dir = tmp / "run"
    # 59 x 73 images (odd paddings to the 64 x 96 canvas: 2+3 rows, 11+12 columns), flip TTA in the graph
    train(["experiment=seg_synthetic", f"data.root={tmp / 'gen'}", "data.count=8", "data.size=[59,73]",
           "data.val_count=2", "data.test_count=2", "data.patch_size=[32,32]", "data.patches_per_image=2",
           "model.decoder_channels=[32,16,16,8,8]", "task.window=[64,96]", "task.tta_flips=[h]",
           *FAST, f"run.dir={run_dir}"])
    images = sorted((tmp / "gen").glob("*/images/*.tif"))[:3]
    return run_dir, images


@pytest.mark.slow
def test_segmentation_onnx_parity_and_served_masks_equal_predict(seg_run, tmp_path):
    run_dir, images = seg_run
    task, module = load_serving_module(run_dir)
    val = task.build_datasets()["val"]
    raw = [torch.from_numpy(val.display_image(i)).permute(2, 0, 1).contiguous() for i in range(len(val))]
    batch = torch.stack([task.serving_preprocess(image)[0] for image in raw])
    exported = export_run(run_dir, "onnx", tmp_path / "onnx")
    assert parity(exported, batch, module=module)["max_abs"] < 1e-4

    csv_path = predict(run_dir, images, tmp_path / "pred.csv")
    expected = {Path(r["id"]).name: r for r in csv.DictReader(csv_path.open())}
    with ServerProcess(run_dir, ServeConfig(port=free_port(), threads=1, log_level="warning", isolate_export=False), env=CHILD_ENV) as server:
        url = server.wait_until_healthy() + "/predict"
        for image in images:
            response = requests.post(url, files={"image": (image.name, image.read_bytes())})
            assert response.status_code == 200, response.text
            answer = response.json()
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask_png_base64"]))))
            written = np.asarray(Image.open(expected[image.name]["mask"]))
            assert served.shape == written.shape == (59, 73)
            # ONNX Runtime vs PyTorch differ by < 1e-4: only a pixel within that of the
            # threshold could flip
            assert (served == written).mean() >= 0.999
            assert answer["fractions"]["vessel"] == pytest.approx(float(expected[image.name]["fraction_vessel"]), abs=2e-3)
        too_big = io.BytesIO()
        Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(too_big, "PNG")
        response = requests.post(url, files={"image": ("big.png", too_big.getvalue())})
        assert response.status_code == 422 and "task.window" in response.json()["error"]
        assert requests.get(url.replace("/predict", "/health")).status_code == 200


# ---- landmarks -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def landmark_run(tmp_path_factory) -> tuple[Path, list[Path]]:
    tmp = tmp_path_factory.mktemp("lm-serve")
    run_dir = tmp / "run"
    train(["experiment=landmarks_synthetic", "data.n_train=6", "data.n_val=2", "data.n_test=2",
           "data.size=[48,40]", "data.image_size=[32,32]", "data.num_landmarks=3", "data.spacing=0.2",
           f"data.root={tmp / 'gen'}", f"data.cache_dir={tmp / 'cache'}", "model.encoder=resnet10t",
           "model.encoder_depth=3", "model.decoder_channels=[16,16,16]", *FAST, f"run.dir={run_dir}"])
    (folder,) = (tmp / "gen").glob("gen-*/test")
    images = sorted(p for p in folder.iterdir() if p.suffix == ".png")[:2]
    return run_dir, images


@pytest.mark.slow
def test_landmark_served_points_equal_predict(landmark_run, tmp_path):
    run_dir, images = landmark_run
    csv_path = predict(run_dir, images, tmp_path / "points.csv")
    expected = {Path(r["id"]).name: r for r in csv.DictReader(csv_path.open())}
    with ServerProcess(run_dir, ServeConfig(port=free_port(), threads=1, log_level="warning", isolate_export=False), env=CHILD_ENV) as server:
        url = server.wait_until_healthy() + "/predict"
        for image in images:
            response = requests.post(url, files={"image": (image.name, image.read_bytes())})
            assert response.status_code == 200, response.text
            row = expected[image.name]
            for point in response.json()["landmarks"]:
                name = point["name"]
                assert point["x_px"] == pytest.approx(float(row[f"{name}_x_px"]), abs=0.02)
                assert point["y_px"] == pytest.approx(float(row[f"{name}_y_px"]), abs=0.02)
                assert point["x_mm"] == pytest.approx(float(row[f"{name}_x_mm"]), abs=0.005)


# ---- reconstruction --------------------------------------------------------------------------


def undersampled_kspace(c=4, h=48, w=40, shift=0.0) -> np.ndarray:
    """An ellipse seen by c coils with phase ramps, every 4th column plus a 6-column centre."""
    from podium.tasks.reconstruction.fft import fft2c_np

    y, x = np.mgrid[:h, :w]
    obj = (((y - h / 2 - shift) / 18) ** 2 + ((x - w / 2) / 15) ** 2 < 1).astype(np.complex64)
    maps = np.stack([np.exp(1j * k + 0.03 * (x - 10 * k)) for k in range(c)])
    mask = np.zeros(w, bool)
    mask[::4] = True
    mask[17:23] = True
    return (fft2c_np(maps * obj) * mask).astype(np.complex64)


@pytest.fixture(scope="module")
def recon_run(varnet_run) -> Path:
    return varnet_run  # tests/conftest.py: 48 x 40, 4 coils, one cascade; read only


@pytest.mark.slow
def test_reconstruction_served_image_equals_predict(recon_run, tmp_path):
    import h5py

    from podium.errors import UserError

    scans = {}
    for i, shift in enumerate((0.0, 3.0)):
        scans[f"scan{i}.npy"] = tmp_path / f"scan{i}.npy"
        np.save(scans[f"scan{i}.npy"], undersampled_kspace(shift=shift))
    out = predict(recon_run, list(scans.values()), tmp_path / "recon.h5")
    # TorchScript exports (the FFTs have no ONNX opset-17 export: a clear error says so)
    exported = export_run(recon_run, "torchscript", tmp_path / "ts")
    assert (exported / "model.pt").is_file()
    with pytest.raises(UserError, match="torchscript"):
        export_run(recon_run, "onnx", tmp_path / "onnx")
    with h5py.File(out) as f, ServerProcess(recon_run, ServeConfig(port=free_port(), threads=1, log_level="warning", isolate_export=False),
                                            env=CHILD_ENV) as server:
        url = server.wait_until_healthy() + "/predict"
        for name, path in scans.items():
            response = requests.post(url, files={"image": (name, path.read_bytes())})
            assert response.status_code == 200, response.text
            image = np.load(io.BytesIO(base64.b64decode(response.json()["image_npy_base64"])))
            expected = f[f"reconstruction/{name}"][0]
            np.testing.assert_allclose(image, expected, atol=1e-5 * float(expected.max()))
        # a .npz with an explicit mask answers like the bare array
        packed = io.BytesIO()
        np.savez(packed, kspace=undersampled_kspace(), mask=(np.abs(undersampled_kspace()).sum((0, 1)) > 0).astype(np.uint8))
        response = requests.post(url, files={"image": ("scan.npz", packed.getvalue())})
        assert response.status_code == 200, response.text
        image = np.load(io.BytesIO(base64.b64decode(response.json()["image_npy_base64"])))
        np.testing.assert_allclose(image, f["reconstruction/scan0.npy"][0], atol=1e-5 * float(image.max()))
        # bad inputs: 4xx JSON errors, and the server keeps serving
        real = io.BytesIO()
        np.save(real, np.abs(undersampled_kspace()))
        full = io.BytesIO()
        np.save(full, np.ones((4, 48, 40), np.complex64))
        for body, fragment in ((b"\x89PNG not k-space", "k-space"), (real.getvalue(), "complex"),
                               (full.getvalue(), "undersampled")):
            response = requests.post(url, files={"image": ("bad.npy", body)})
            assert response.status_code == 422 and fragment in response.json()["error"], response.text
        response = requests.post(url, json={"array": [[1, 2], [3, 4]]})
        assert response.status_code == 422
        assert requests.get(url.replace("/predict", "/health")).status_code == 200
