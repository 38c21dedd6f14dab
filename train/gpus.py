"""GPU presets: the memory, bf16 support, 16-bit tensor-core peak and GPU-to-GPU link of the GPU models
the planner plans for, and which preset a CUDA device name is.

Memory is what nvidia-smi reports (MiB / 1024); the peak is the vendor's dense 16-bit figure with fp32
accumulation and no sparsity (the MFU denominator); the link is one direction of the fastest link
between two GPUs of one machine (NVLink, else the PCIe generation's x16 bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """A GPU model: memory as nvidia-smi reports it, bf16 support, dense 16-bit tensor-core peak (fp32
    accumulate, no sparsity) and the bandwidth of the link between GPUs of one machine (GB/s, one way)."""

    name: str
    memory_gib: float
    bf16: bool
    peak_tflops: float
    link_gb_s: float
    description: str


GPU_PRESETS: dict[str, GPU] = {
    g.name: g
    for g in [
        GPU("v100", 16160 / 1024, False, 125.0, 150.0, "Tesla V100-SXM2-16GB (NVLink 2)"),
        GPU("v100s", 32510 / 1024, False, 130.0, 12.0, "Tesla V100S-PCIE-32GB (PCIe 3)"),
        GPU("t4", 15360 / 1024, False, 65.0, 12.0, "Tesla T4 16 GB (PCIe 3)"),
        GPU("a5000", 24564 / 1024, True, 111.1, 24.0, "RTX A5000 24 GB (PCIe 4)"),
        GPU("rtx4090", 24564 / 1024, True, 165.2, 24.0, "GeForce RTX 4090 24 GB (PCIe 4)"),
        GPU("rtx5090", 32607 / 1024, True, 209.5, 48.0, "GeForce RTX 5090 32 GB (PCIe 5)"),
        GPU("a100-40gb", 40960 / 1024, True, 312.0, 300.0, "A100-SXM4-40GB (NVLink 3)"),
        GPU("a100-80gb", 81920 / 1024, True, 312.0, 300.0, "A100-SXM4-80GB (NVLink 3)"),
        GPU("h100", 81559 / 1024, True, 989.4, 450.0, "H100 SXM5 80 GB (NVLink 4)"),
        GPU("h200", 143771 / 1024, True, 989.4, 450.0, "H200 SXM 141 GB (NVLink 4)"),
    ]
}
_DEVICE_NAMES = [  # substrings of torch.cuda.get_device_name(), most specific first
    ("v100s", "v100s"),
    ("v100", "v100"),
    ("t4", "t4"),
    ("a5000", "a5000"),
    ("4090", "rtx4090"),
    ("5090", "rtx5090"),
    ("a100-sxm4-40", "a100-40gb"),
    ("a100-pcie-40", "a100-40gb"),
    ("a100", "a100-80gb"),
    ("h200", "h200"),
    ("h100", "h100"),
]


def gpu_preset(name: str) -> GPU:
    """The preset called `name` (lower case); an unknown name lists the known ones."""
    if name not in GPU_PRESETS:
        raise ValueError(f"--gpu {name!r}: unknown GPU; known: {', '.join(GPU_PRESETS)}")
    return GPU_PRESETS[name]


def detect_gpu(device_name: str) -> GPU | None:
    """The preset of a CUDA device name such as 'Tesla T4' or 'NVIDIA H100 80GB HBM3', if known."""
    lowered = device_name.lower().replace(" ", "")
    for needle, preset in _DEVICE_NAMES:
        if needle in lowered:
            return GPU_PRESETS[preset]
    return None
