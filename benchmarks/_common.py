"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_evidence(path: Path, evidence: dict, device: str = "cpu") -> None:
    """Write `evidence` plus the machine facts (device name, cores, threads, versions) as
    JSON to `path` (parents created), and say where."""
    import json
    import os

    import torch

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name()
    facts = {
        "device": device, "device_name": name, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**evidence, **facts}, indent=2) + "\n")
    print(f"wrote {path}")
