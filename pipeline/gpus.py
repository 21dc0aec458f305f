"""GPU models the planner knows: memory and dense peak throughput from the vendors' datasheets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuKind:
    """One GPU model, with its vendor's dense (no structured sparsity) peak figures."""

    name: str
    memory_gb: float
    tflops: float
    """Dense FP16/BF16 tensor-core peak, TFLOP/s."""
    fp32_tflops: float = 0.0
    """Dense peak of fp32 work: TF32 tensor cores where the GPU has them (cuDNN runs fp32 convolutions in TF32 by
    default, and convolutions are most of an fp32 VAE decode; fp32 matmuls and attention stay on the slower FP32
    units unless TF32 matmuls are enabled), else plain FP32. 0: half of `tflops`, the TF32 : FP16 ratio of
    Ampere, Ada and Hopper."""

    def peak_flops(self, dtype: str) -> float:
        """FLOP/s this GPU peaks at for work in `dtype` (fp32, fp16, bf16)."""
        tflops = (self.fp32_tflops or self.tflops / 2) if dtype == "fp32" else self.tflops
        return tflops * 1e12


# Vendor datasheets; figures "with sparsity" are halved to dense. Memory as the datasheet sells it (torch sees a
# little less: a "16 GB" T4 reports 15 GiB).
GPU_KINDS: dict[str, GpuKind] = {kind.name: kind for kind in (
    # NVIDIA T4 datasheet: 65 TFLOPS mixed-precision FP16 tensor, 8.1 TFLOPS FP32 (Turing has no TF32), 16 GB.
    GpuKind("t4", 16, 65.0, fp32_tflops=8.1),
    # NVIDIA publishes no A10G datasheet; AWS G5's A10G is listed at 70 TFLOPS FP16 tensor and 35 TF32, 24 GB
    # (the A10 datasheet's 125 / 62.5 are at the A10's higher tensor clocks).
    GpuKind("a10g", 24, 70.0, fp32_tflops=35.0),
    # NVIDIA L4 datasheet: 242 FP16 tensor and 120 TF32 with sparsity, 24 GB.
    GpuKind("l4", 24, 121.0, fp32_tflops=60.0),
    # NVIDIA L40S datasheet: 733 FP16 tensor and 366 TF32 with sparsity, 48 GB.
    GpuKind("l40s", 48, 366.0, fp32_tflops=183.0),
    # NVIDIA A100 datasheet: 312 FP16 tensor, 156 TF32 (dense), 40 GB or 80 GB.
    GpuKind("a100-40gb", 40, 312.0, fp32_tflops=156.0),
    GpuKind("a100-80gb", 80, 312.0, fp32_tflops=156.0),
    # NVIDIA H100 datasheet, SXM5: 1979 FP16 tensor and 989 TF32 with sparsity, 80 GB (the PCIe card: 1513 / 756).
    GpuKind("h100-80gb", 80, 989.0, fp32_tflops=494.5),
    # NVIDIA H200 datasheet, SXM: the H100 SXM's compute with 141 GB.
    GpuKind("h200", 141, 989.0, fp32_tflops=494.5),
)}
