"""What a GPU's datasheet numbers become inside a training step: the one place the planner's
calibration is stated, each number with its source (docs/planner.md has the same table, with
the rows it was fitted on and those held out).

Measured by others (cited next to each number below):
- matmul_ceiling: the largest fraction of the dense bf16 peak one bf16 matmul reaches at its best
  shape (Maximum Achievable Matmul FLOPS over the datasheet peak): stas00/ml-engineering,
  compute/accelerator/README.md, "Maximum Achievable Matmul FLOPS comparison table".
- attention: the fraction of the peak a FlashAttention-2 kernel sustains, the causal blocks it
  skips not counted as work: on H100 "only 35% utilization" (Shah, Bikshandi, Zhang, Thakkar,
  Ramani, Dao 2024, "FlashAttention-3", arXiv 2407.08608, abstract); on A100 "50-73% of the
  theoretical maximum FLOPs/s" (Dao 2023, "FlashAttention-2", arXiv 2307.08691, abstract): its
  lower end. Its backward does 2.5 times its forward's matmul work (it recomputes the scores).
- nvlink: what a ring collective moves per GPU over NVLink, over the link's per-direction
  datasheet bandwidth (busbw at 16 GiB, stas00/ml-engineering, network/README.md, "SHARP" and
  "Inter-node speed depends on intra-node speed"). NVLink SHARP's all-reduce (480 GB/s on H200)
  is not counted: the large collectives here are reduce-scatters and all-gathers.
- network: what NCCL reaches per 400 Gb/s NDR InfiniBand NIC, "46-48GB/s per NIC" of its 50 GB/s
  (an NCCL maintainer in NVIDIA/nccl-tests issue #290): the lower end, 92 %; assumed the same
  fraction for the A100's 200 Gb/s HDR NICs.
- memory: the fraction of the datasheet HBM bandwidth a streaming kernel reaches: BabelStream's
  Triad (a[i] = b[i] + s·c[i], two reads and a write per element, as a residual add or SwiGLU),
  run on one GPU of each kind by Azure/AI-benchmarking-guide (Benchmarks/HBMBandwidth.py builds
  BabelStream for CUDA): A100-SXM4-80GB 1.70 of 2.039 TB/s (Azure_Results/ND_A100_v4_results.md),
  H100 80GB HBM3 2.97 of 3.35 TB/s ("Azure Results/ND_H100_v5_results.md"), H200 141GB 4.15 of
  4.8 TB/s (Azure_Results/ND_H200_v5_results.md). Hand-tuned memory-bound kernels reach as much
  on an H100: 3.01 TB/s, "89.7% of the peak DRAM throughput" (Dao-AILab/quack,
  media/2025-07-10-membound-sol.md). Every byte the planner moves through HBM (the memory-bound
  ops, the optimizer step, a GEMM's operands) moves at this fraction. Nothing is measured for
  torchtitan's 96 GB HBM2e part or for B200: they take the H100's.
- kernel_overhead: the time the GPU computes nothing per kernel it runs, from one kernel's last
  thread block to the next one's first: "about 1.3 microseconds per kernel" on an H100, even
  under CUDA graphs (Hazy Research, "Look Ma, No Bubbles!",
  hazyresearch.stanford.edu/blog/2025-05-27-no-bubbles); assumed the same on the other GPUs.
  Only this GPU-side gap is charged: in a training step the CPU enqueues kernels ahead of a busy
  GPU, which hides the launch call's own latency (about 20 µs for an eager PyTorch op in
  NVIDIA's "Understanding the Visualization of Overhead and Latency in NVIDIA Nsight Systems").
  How many kernels a layer runs is the code's (planner/compute.py, planner/software.py).

Fitted to published runs (planner/published.py marks them; the others are held out):
- gemm_fraction: the fraction of the matmul ceiling the GEMMs of a whole training step sustain,
  per architecture (clocks under sustained load, shapes off the best one, SMs shared with NCCL).
- eager_traffic: how many times the fused minimum of bytes eager PyTorch's elementwise ops move
  (each op reads and writes its tensors, some upcast to fp32); one value for every GPU.
- clock: the fraction of the datasheet clock a power-limited part sustains (torchtitan's 500 W
  H100s); 1 elsewhere.

Derived, not fitted: a GEMM of m x k x n computes 2mkn FLOPs and moves 2(mk + kn + mn) bytes in
bf16, an intensity I = mkn / (mk + kn + mn) FLOPs per byte. Streaming its operands once at the
HBM bandwidth reached adds to its compute time, so it reaches I / (I + ridge) of its
compute-bound speed, ridge = the matmul ceiling over that bandwidth: small GEMMs (small hidden
sizes, small micro batches, short sequences, wide tp) reach less, as Megatron-LM's README says
of its weak scaling. The memory-bound ops (norms, residual adds, activations, RoPE, attention's
inputs and outputs, the optimizer step) move their bytes at the HBM bandwidth reached;
eager_traffic carries what eager code loses on top.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_lite.planner.hardware import GPU


@dataclass(frozen=True)
class Calibration:
    matmul_ceiling: float  # best-shape matmul over the dense bf16 peak (measured)
    attention: float  # flash attention, forward and backward, over the peak (measured)
    nvlink: float  # ring collective bandwidth over the NVLink datasheet bandwidth (measured)
    network: float  # per NIC, over its line rate (measured)
    memory: float  # streaming bandwidth over the datasheet HBM bandwidth (measured)
    kernel_overhead: float  # s the GPU idles per kernel (measured)
    gemm_fraction: float  # of the matmul ceiling, a step's GEMMs (fitted)
    eager_traffic: float  # eager elementwise bytes over the fused minimum (fitted)
    clock: float = 1.0  # of the datasheet clock, what a power-limited part sustains (fitted)

    @property
    def gemm_ceiling(self) -> float:
        """Fraction of the dense peak a step's largest GEMMs reach."""
        return self.matmul_ceiling * self.gemm_fraction * self.clock

    @property
    def attention_efficiency(self) -> float:
        """Fraction of the dense peak a flash-attention kernel reaches, forward and backward."""
        return self.attention * self.clock

    def hbm_bandwidth(self, gpu: GPU) -> float:
        """Bytes/s a step's memory traffic moves at on `gpu`."""
        return gpu.hbm_bandwidth * self.memory

    def gemm_efficiency(self, gpu: GPU, intensity: float) -> float:
        """Fraction of the dense peak a GEMM of `intensity` FLOPs per byte reaches in a step."""
        ridge = self.matmul_ceiling * self.clock * gpu.peak_tflops * 1e12 / self.hbm_bandwidth(gpu)
        return self.gemm_ceiling * intensity / (intensity + ridge)


# Fitted (docs/planner.md: on which rows, and which were held out).
AMPERE_GEMM_FRACTION = 0.95
HOPPER_GEMM_FRACTION = 0.785
EAGER_TRAFFIC = 3.0
POWER_LIMITED_CLOCK = 0.82

KERNEL_OVERHEAD = 1.3e-6  # H100, CUDA graphs (Hazy Research); assumed for every GPU
# NVIDIA H100 SXM: MAMF 794.5 of 989 TFLOPS (80.3 %, "H200 is the same"); NVLink 4 all-gather
# 361.4 of 450 GB/s (80 %); BabelStream Triad 2.97 of 3.35 TB/s (88.7 %).
HOPPER = Calibration(matmul_ceiling=794.5 / 989, attention=0.35, nvlink=361.4 / 450, network=46 / 50,
                     memory=2.97 / 3.35, kernel_overhead=KERNEL_OVERHEAD, gemm_fraction=HOPPER_GEMM_FRACTION,
                     eager_traffic=EAGER_TRAFFIC)
CALIBRATIONS = {
    # NVIDIA A100 SXM: MAMF 271.2 of 312 TFLOPS (86.9 %); NVLink 3 234.89 of 300 GB/s (78 %);
    # BabelStream Triad 1.70 of 2.039 TB/s (83.4 %).
    "ampere": Calibration(matmul_ceiling=271.2 / 312, attention=0.50, nvlink=234.89 / 300, network=46 / 50,
                          memory=1.70 / 2.039, kernel_overhead=KERNEL_OVERHEAD,
                          gemm_fraction=AMPERE_GEMM_FRACTION, eager_traffic=EAGER_TRAFFIC),
    "hopper": HOPPER,
    # The H200: the H100's chip with HBM3e, BabelStream Triad 4.15 of 4.8 TB/s (86.5 %).
    "hopper-h200": dataclasses.replace(HOPPER, memory=4.15 / 4.8),
    # The 500 W H100 of torchtitan's runs (planner/hardware.py: H100-HBM2E): the clock it sustains.
    "hopper-500w": dataclasses.replace(HOPPER, clock=POWER_LIMITED_CLOCK),
    # NVIDIA B200 SXM: MAMF 1745.0 of 2250 TFLOPS (77.6 %); NVLink 5: 740.64 of 900 GB/s (82 %, a
    # ring all-reduce at 4 GiB on P6-B200). Unvalidated: no published B200 run is reproduced here,
    # so Hopper's fitted fraction, FlashAttention-2's 35 % and the H100's HBM fraction are kept.
    "blackwell": Calibration(matmul_ceiling=1745.0 / 2250, attention=0.35, nvlink=740.64 / 900, network=46 / 50,
                             memory=HOPPER.memory, kernel_overhead=KERNEL_OVERHEAD,
                             gemm_fraction=HOPPER_GEMM_FRACTION, eager_traffic=EAGER_TRAFFIC),
}


def calibration(gpu: GPU) -> Calibration:
    """The calibration of `gpu` (its own entry, else its architecture's)."""
    return CALIBRATIONS[gpu.calibration or gpu.architecture]
