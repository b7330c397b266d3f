"""ImageNet-size pruning on the CPU: ResNet-50 at 224 x 224 with 1000 classes.

Each method runs in its own process, so its peak memory is its own: the peak resident set
(VmHWM, /proc) of the whole process, and the peak above the resident set just before
pruning (reset with /proc/self/clear_refs), i.e. what pruning itself needs.

NTK-SAP at reduced settings (stated in the output): its cost is linear in rounds x resamples
x noise images (every draw costs the same), so the time per noise image is measured and the
full-setting time extrapolated from it. SynFlow runs its full T = 100.

    python benchmarks/scale_resnet50.py                       # ntksap and synflow
    python benchmarks/scale_resnet50.py --ntksap-rounds 2 --noise 32 --batch 16

Writes JSON evidence to benchmarks/results/scale_resnet50.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import write_evidence

SHAPE = (3, 224, 224)
SPARSITY = 0.8926  # the paper's first ImageNet sparsity


def _kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise KeyError(key)


def child(method: str, settings: dict) -> None:
    """Run one pruning job in this process and print its figures as one JSON line."""
    import warnings

    import ntksap
    from ntksap import models

    warnings.simplefilter("ignore", ntksap.LayerCollapseWarning)
    net = models.create("resnet50", num_classes=1000)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _kib("VmRSS:")
    t = time.perf_counter()
    masks = ntksap.prune(net, method, sparsity=SPARSITY, input_shape=SHAPE, seed=0, **settings)
    seconds = time.perf_counter() - t
    print(json.dumps({
        "method": method, "settings": settings, "seconds": round(seconds, 2),
        "peak_rss_mib": round(_kib("VmHWM:") / 1024), "rss_before_mib": round(before / 1024),
        "peak_above_before_mib": round((_kib("VmHWM:") - before) / 1024),
        "kept": masks.num_kept, "num_total": masks.num_total,
        "collapsed": masks.collapsed(),
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ntksap-rounds", type=int, default=2)
    ap.add_argument("--resamples", type=int, default=1)
    ap.add_argument("--noise", type=int, default=32, help="noise images per resample")
    ap.add_argument("--batch", type=int, default=16, help="noise images per forward")
    ap.add_argument("--synflow-rounds", type=int, default=100)
    ap.add_argument("--methods", default="ntksap,synflow")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("results") / "scale_resnet50.json"
    )
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "SETTINGS_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], json.loads(args.child[1]))
        return
    settings = {
        "ntksap": {"rounds": args.ntksap_rounds, "resamples": args.resamples,
                   "num_samples": args.noise, "batch_size": args.batch},
        "synflow": {"rounds": args.synflow_rounds},
    }  # fmt: skip
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        print(f"{method}: {settings[method]} ...", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", method, json.dumps(settings[method])],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        if method == "ntksap":
            s = settings["ntksap"]
            images = s["rounds"] * s["resamples"] * s["num_samples"]
            row["seconds_per_noise_image"] = round(row["seconds"] / images, 3)
            # The paper's largest setting (Tiny-ImageNet: T=100, R=1, 10 x classes noise
            # images) applied to 1000 classes would be 100 x 10,000 images.
            row["extrapolated_T100_R1_10000_images_h"] = round(
                row["seconds_per_noise_image"] * 100 * 10_000 / 3600, 1
            )
        rows.append(row)
        print(f"  {row}", flush=True)
    evidence = {"benchmark": "scale_resnet50", "input": list(SHAPE), "classes": 1000,
                "sparsity": SPARSITY, "results": rows}  # fmt: skip
    write_evidence(args.out, evidence)


if __name__ == "__main__":
    main()
