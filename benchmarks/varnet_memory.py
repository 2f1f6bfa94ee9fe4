"""VarNet training step with and without gradient checkpointing: step time and peak memory, as
ratios measured in one run.

    python benchmarks/varnet_memory.py --json bench-out/varnet_memory.json
    python benchmarks/varnet_memory.py --quick

Each measurement runs in its own fresh subprocess (A B A B ...), so one variant's allocator
state cannot flatter the other. Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU
(Linux) the peak resident set during the steps over the resident set just before them — the
peak is reset through /proc/self/clear_refs after a warm-up step has allocated the optimizer
state and gradient buffers, so what remains is the activations the step keeps for backward. Step time: the median
of the steps after a warm-up step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, make_parser, median, print_table, write_json  # noqa: E402

WORKER = r"""
import json, sys, time, torch
from podium.tasks.reconstruction.models.varnet import VarNet
cfg = json.loads(sys.argv[1])
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
model = VarNet(num_cascades=cfg["cascades"], chans=cfg["chans"], sens_chans=cfg["sens_chans"],
               pools=cfg["pools"], sens_pools=cfg["sens_pools"]).to(device).train()
model.set_grad_checkpointing(cfg["checkpointing"])
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
c, h, w = cfg["coils"], cfg["height"], cfg["width"]
kspace = torch.randn(1, c, h, w, 2, device=device)
mask = torch.zeros(1, 1, 1, w, 1, device=device)
mask[..., ::4, :] = 1
mask[..., w // 2 - 8: w // 2 + 8, :] = 1
target = torch.rand(1, h, w, device=device)

def step():
    out = model(kspace * mask, mask, torch.tensor([16], device=device))
    loss = (out - target).abs().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # keep gradient buffers: they are not activations

step()  # warm-up: allocates optimizer state and gradient buffers
def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
else:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak RSS (VmHWM) to now
        f.write("5")
base_rss = status_kib("VmRSS")
times = []
for _ in range(cfg["steps"]):
    t = time.perf_counter(); step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
if device.type == "cuda":
    peak = torch.cuda.max_memory_allocated() / 2**20
else:
    peak = (status_kib("VmHWM") - base_rss) / 1024
print(json.dumps({"times": times, "peak_mib": peak, "device": str(device)}))
"""


def run_once(cfg: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(cfg)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = {"cascades": 8, "chans": 18, "sens_chans": 8, "pools": 4, "sens_pools": 4, "coils": 8,
            "height": 320, "width": 256, "steps": 2}
    if args.quick:
        base.update(cascades=2, chans=8, sens_chans=4, pools=3, sens_pools=3, height=96, width=80, steps=1)
        args.rounds = 1
    runs = {False: [], True: []}
    for _ in range(args.rounds):
        for checkpointing in (False, True):
            runs[checkpointing].append(run_once({**base, "checkpointing": checkpointing}))
    figures = {}
    for checkpointing, results in runs.items():
        key = "checkpointing" if checkpointing else "plain"
        figures[key] = {"step_s": median(t for r in results for t in r["times"]),
                        "peak_mib": median(r["peak_mib"] for r in results)}
    ratio_time = figures["checkpointing"]["step_s"] / figures["plain"]["step_s"]
    ratio_mem = figures["checkpointing"]["peak_mib"] / max(figures["plain"]["peak_mib"], 1e-9)
    device = runs[False][0]["device"]
    print_table(f"VarNet {base['cascades']}/{base['chans']}/{base['sens_chans']}, {base['coils']} coils, "
                f"{base['height']}x{base['width']}, batch 1, {device}",
                ["variant", "step (s)", "peak memory (MiB)"],
                [[k, f"{v['step_s']:.3f}", f"{v['peak_mib']:.0f}"] for k, v in figures.items()],
                caption=f"checkpointing / plain: time x{ratio_time:.2f}, memory x{ratio_mem:.2f}")
    write_json(args.json, {"benchmark": "varnet_memory", "machine": machine_info(), "config": base,
                           "rounds": args.rounds, "figures": figures, "time_ratio": ratio_time,
                           "memory_ratio": ratio_mem})


if __name__ == "__main__":
    main()
