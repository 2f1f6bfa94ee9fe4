"""podium doctor's pure functions: GPU build checks, loader timing, worker choice, data paths."""

from __future__ import annotations

import torch
from rich.console import Console
from torch.utils.data import DataLoader, TensorDataset

from podium.engine.doctor import (
    REINSTALL_HINT,
    check_paths,
    default_worker_counts,
    gpu_build_problems,
    nvidia_smi_gpus,
    recommend_workers,
    render_report,
    time_loader,
    torch_build_report,
)


def fake_report(**overrides):
    report = {
        "torch": "2.6.0",
        "cuda": "12.6",
        "hip": None,
        "cudnn": 90100,
        "cuda_available": True,
        "device_count": 1,
        "devices": ["NVIDIA H100"],
        "device_capabilities": ["sm_90"],
        "cuda_arch_list": ["sm_80", "sm_86", "sm_90"],
        "cuda_visible_devices": None,
        "mps_available": False,
        "cpu_count": 8,
        "python": "3.11.0",
        "platform": "Linux",
    }
    report.update(overrides)
    return report


def test_torch_build_report_and_smi_run_here():
    report = torch_build_report()
    assert report["torch"] == torch.__version__
    assert report["cuda"] == torch.version.cuda
    assert report["cuda_available"] == torch.cuda.is_available()
    assert report["device_count"] == len(report["devices"])
    assert report["cpu_count"] >= 1 and report["python"] and report["platform"]
    assert isinstance(nvidia_smi_gpus(), list)


def test_nvidia_smi_absent(monkeypatch):
    monkeypatch.setattr("podium.engine.doctor.shutil.which", lambda name: None)
    assert nvidia_smi_gpus() == []


def test_gpu_build_problems():
    assert gpu_build_problems(fake_report(), ["NVIDIA H100"]) == []
    # A CPU machine with any build is fine.
    assert gpu_build_problems(fake_report(cuda=None, cuda_available=False, devices=[], device_capabilities=[]), []) == []
    assert gpu_build_problems(fake_report(cuda_available=False, devices=[], device_capabilities=[]), []) == []

    cpu_build = gpu_build_problems(fake_report(cuda=None, cuda_available=False), ["NVIDIA A100"])
    assert len(cpu_build) == 1
    assert REINSTALL_HINT in cpu_build[0] and "nvidia-smi" in cpu_build[0] and "A100" in cpu_build[0]

    hidden = gpu_build_problems(fake_report(cuda_available=False, cuda_visible_devices=""), ["NVIDIA A100"])
    assert len(hidden) == 1
    assert "driver" in hidden[0] and "CUDA_VISIBLE_DEVICES" in hidden[0]

    too_new = gpu_build_problems(fake_report(device_capabilities=["sm_120"]), ["NVIDIA RTX 5090"])
    assert len(too_new) == 1 and "sm_120" in too_new[0]
    # Same major, newer minor, and PTX both run.
    assert gpu_build_problems(fake_report(device_capabilities=["sm_89"]), ["x"]) == []
    ptx = fake_report(device_capabilities=["sm_120"], cuda_arch_list=["sm_90", "compute_90"])
    assert gpu_build_problems(ptx, ["x"]) == []


def test_time_loader_and_recommendation():
    dataset = TensorDataset(torch.randn(64, 3), torch.arange(64))

    def make_loader(num_workers):
        return DataLoader(dataset, batch_size=8, num_workers=num_workers)

    rows = time_loader(make_loader, [0, 1], n_batches=4, warmup=1)
    assert [row["num_workers"] for row in rows] == [0, 1]
    for row in rows:
        assert row["batches"] == 4
        assert row["seconds"] > 0
        assert abs(row["samples_per_s"] - 8 * row["batches_per_s"]) < 1e-6 * row["samples_per_s"]

    # Shorter than warmup + n_batches: times what is there.
    short = time_loader(make_loader, [0], n_batches=100, warmup=2)
    assert short[0]["batches"] == 6
    recommendation = recommend_workers(rows)
    assert recommendation["recommended"] in (0, 1)


def test_time_loader_counts_dict_batches():
    batches = [{"image": torch.zeros(5, 3), "label": torch.zeros(5)}] * 4
    rows = time_loader(lambda n: batches, [0], n_batches=2, warmup=1)
    assert rows[0]["batches"] == 2
    assert abs(rows[0]["samples_per_s"] / rows[0]["batches_per_s"] - 5) < 1e-6


def test_recommend_workers_picks_smallest_within_five_percent():
    def row(n, speed):
        return {"num_workers": n, "batches": 10, "seconds": 1.0, "batches_per_s": speed / 8, "samples_per_s": speed}

    rows = [row(0, 100), row(1, 500), row(2, 960), row(4, 1000), row(8, 990)]
    recommendation = recommend_workers(rows)
    assert recommendation["best"]["num_workers"] == 4
    assert recommendation["recommended"] == 2
    assert recommendation["recommended_row"]["samples_per_s"] == 960
    assert recommend_workers([row(0, 100), row(2, 200)])["recommended"] == 2
    assert recommend_workers([])["recommended"] is None


def test_default_worker_counts():
    assert default_worker_counts(2) == [0, 1, 2]
    assert default_worker_counts(8) == [0, 1, 2, 4, 8]
    assert default_worker_counts(6) == [0, 1, 2, 4, 6]
    assert default_worker_counts(1) == [0, 1]
    assert default_worker_counts(0) == [0]


def test_check_paths(tmp_path):
    (tmp_path / "images").mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("a,b\n")
    cfg = {
        "name": "folder",
        "root": str(tmp_path / "images"),
        "train_csv": str(labels),
        "batch_size": 8,
        "cache_dir": None,
        "image_folder": "",
        "url_path": "s3://bucket/data",
        "splits": {"val": {"root": str(tmp_path / "missing_val")}},
        "extra": [{"label_file": str(tmp_path / "missing.txt")}],
        "glob_path": str(tmp_path / "images" / "*.png"),
    }
    problems = check_paths(cfg)
    assert problems == [
        f"data.splits.val.root: path '{tmp_path / 'missing_val'}' does not exist",
        f"data.extra[0].label_file: path '{tmp_path / 'missing.txt'}' does not exist",
        f"data.glob_path: path '{tmp_path / 'images' / '*.png'}' does not exist",
    ]


def test_check_paths_accepts_omegaconf(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"base": str(tmp_path), "root": "${base}/nope", "split_file": "???"})
    assert check_paths(cfg) == [f"data.root: path '{tmp_path}/nope' does not exist"]


def test_render_report_prints_everything():
    console = Console(record=True, width=200)
    rows = [
        {"num_workers": 0, "batches": 4, "seconds": 1.0, "batches_per_s": 4.0, "samples_per_s": 32.0},
        {"num_workers": 2, "batches": 4, "seconds": 0.5, "batches_per_s": 8.0, "samples_per_s": 64.0},
    ]
    problems = ["data.root: path '/x[y]' does not exist"]
    render_report(fake_report(), problems, rows, recommend_workers(rows), console)
    text = console.export_text()
    assert "NVIDIA H100" in text and "/x[y]" in text and "trainer.num_workers=2" in text
    console = Console(record=True, width=200)
    render_report(fake_report(cuda=None), [], [], None, console)
    text = console.export_text()
    assert "No problems found" in text and "CPU-only" in text
