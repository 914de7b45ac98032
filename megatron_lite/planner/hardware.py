"""The accelerators and clusters the planner knows: what one GPU computes and holds, and what
its links carry. Vendor datasheet numbers (dense bf16, no sparsity; HBM in decimal GB; NVLink
per GPU and direction; inter-node bandwidth per GPU: one 400 Gb/s NIC per GPU on DGX/HGX
H100, H200 and B200, one 200 Gb/s HDR NIC per GPU on DGX A100). Latencies are the per-step
alpha of a ring collective: a few microseconds on NVLink, more across InfiniBand."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # dense bf16
    memory_gb: float  # HBM, decimal GB
    hbm_bandwidth: float  # bytes/s
    nvlink_bandwidth: float  # bytes/s per GPU per direction, inside a node
    nvlink_latency: float  # s per ring step
    network_bandwidth: float  # bytes/s per GPU, between nodes
    network_latency: float  # s per ring step
    architecture: str  # ampere, hopper, blackwell: published MFU is compared within one (planner/validation.py)
    calibration: str = ""  # its entry in planner/calibration.py, if not its architecture's
    gpus_per_node: int = 8

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


GPUS = {
    "A100": GPU("A100 SXM 80GB", 312.0, 80, 2.039e12, 300e9, 5e-6, 25e9, 10e-6, "ampere"),
    "H100": GPU("H100 SXM", 989.0, 80, 3.35e12, 450e9, 4e-6, 50e9, 8e-6, "hopper"),
    # The H100 of Meta's Grand Teton hosts that torchtitan's published runs used
    # (pytorch/torchtitan, benchmarks/llama3_h100_202412_torchtitan.md): 96 GB of HBM2e at
    # 2.4 TB/s, NVLink inside the host, 400 Gb/s RDMA per GPU, a 500 W power limit. Its peak is
    # "between SXM and NVL" and not known (the file's footnote): the SXM's datasheet peak is
    # kept (MFU is stated against it, as torchtitan does), the clock its power limit sustains is
    # a fitted calibration (planner/calibration.py: hopper-500w).
    "H100-HBM2E": GPU("H100 SXM 96GB HBM2e 500W", 989.0, 96, 2.4e12, 450e9, 4e-6, 50e9, 8e-6, "hopper",
                      "hopper-500w"),
    "H200": GPU("H200 SXM", 989.0, 141, 4.8e12, 450e9, 4e-6, 50e9, 8e-6, "hopper", "hopper-h200"),
    "B200": GPU("B200", 2250.0, 180, 8.0e12, 900e9, 3e-6, 50e9, 8e-6, "blackwell"),
}
# Dense bf16 peaks by a fragment of the name torch reports (the first match wins): a run's MFU.
_PEAKS_BY_DEVICE_NAME = (("H100 PCIe", 756.0), ("GH200", 989.0), ("H200", GPUS["H200"].peak_tflops),
                         ("H100", GPUS["H100"].peak_tflops), ("H800", 989.0), ("B200", GPUS["B200"].peak_tflops),
                         ("A100", GPUS["A100"].peak_tflops), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))


def gpu(name: str) -> GPU:
    """A GPU of the table by key (A100, H100, H100-HBM2E, H200, B200), case-insensitive."""
    key = name.upper()
    if key not in GPUS:
        raise ValueError(f"--gpu={name} is unknown; allowed: {', '.join(GPUS)}")
    return GPUS[key]


def peak_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak of the accelerator torch names `device_name`; None on CPU or unknown."""
    if not device_name:
        return None
    return next((peak for fragment, peak in _PEAKS_BY_DEVICE_NAME if fragment in device_name), None)
