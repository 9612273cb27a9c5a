"""Compile analysis of the CUDA kernels: PTX per architecture, ptxas resource usage,
theoretical occupancy and arithmetic intensity. Needs no GPU (and must run with the CUDA
simulator off: ``NUMBA_ENABLE_CUDASIM`` unset).

    python -m cnn.bench.ptx [--out results/gpu_kernels.csv] [--json]

For every kernel of :mod:`cnn.backends.cuda.kernels` and :mod:`cnn.backends.cuda.layer_kernels`
and every architecture in ``ARCHS``:
``numba.cuda.compile_ptx`` with the float32 signature the backend launches it with, then
``ptxas -v -arch=sm_XX``, whose report gives registers per thread, static shared memory per
block and spill stores/loads (bytes).

**Theoretical occupancy** (active warps / maximum warps per SM), as the CUDA occupancy
calculator computes it from the kernel's resources alone::

    warps/block   = ceil(threads / 32)
    regs/warp     = ceil(registers * 32 / 256) * 256           (allocation granularity)
    blocks/SM     = min(max_blocks,
                        max_warps // warps/block,
                        (65536 // regs/warp) // warps/block,
                        smem_per_SM // (smem/block + reserved))  (reserved: 1 KB from sm_80)
    occupancy     = blocks/SM * warps/block / max_warps

**Arithmetic intensity** = FLOPs / bytes of compulsory DRAM traffic (every operand read once,
every result written once; float32 data, int32 argmax, int64 labels), on the reference
shapes of a CIFAR conv layer: x (N=128, C=32, H=W=15), w (F=64, C, 3, 3), stride 1, 'same'
padding (so Ho = Wo = 15), followed by a 2x2/2 max pool (-> 7x7) and a dense layer
D = 64*7*7 = 3136 -> M = 10. Per kernel (P = Ho*Wo, Q = C*KH*KW):

- conv forward: ``2*N*F*P*Q + N*F*P`` FLOPs over ``4*(N*C*H*W + F*Q + F + N*F*P)`` bytes;
- conv backward to input: ``2*N*C*H*W*F*KH*KW`` over ``4*(N*F*P + F*Q + N*C*H*W)``;
- conv backward to weight and bias: ``2*F*(Q+1)*N*P`` over ``4*(N*F*P + N*C*H*W + F*Q + F)``;
- column sums (dense bias gradient, dout (N, M)): ``N*M`` over ``4*(N*M + M)``;
- max pool forward: ``N*F*7*7*(2*2 - 1)`` comparisons over ``4*(N*F*P) + 8*N*F*7*7``;
- max pool backward: ``N*F*7*7`` adds over ``8*N*F*7*7 + 4*N*F*P``;
- relu forward / backward on the conv output (L = N*F*P): ``L`` over ``8*L`` / ``12*L``;
- matmul (dense forward x @ w + b): ``2*N*D*M + N*M`` over ``4*(N*D + D*M + M + N*M)``;
- softmax cross-entropy (N=128, K=10): ``8*N*K`` (max, 2 exps, sums, scale; exp counted as
  one) over ``4*2*N*K + 8*N + 8``;
- SGD on the conv weights (L = F*Q): ``2*L`` over ``12*L``; with momentum ``4*L`` over ``20*L``;
- fill zero (L = F*Q, the velocity initialisation): 0 FLOPs over ``4*L``.

The kernels of :mod:`cnn.backends.cuda.layer_kernels`, on the same reference shapes (the conv
output L = N*F*P for activations and batch norm over its F channels, the dense input N*D for
dropout, the conv weights F*Q for the penalties, N = 128 logits for binary cross-entropy; a
transcendental function counts as one FLOP, dropout's integer hash as none):

- sigmoid forward ``4*L`` over ``8*L``, backward ``3*L`` over ``12*L``; tanh forward ``L`` over
  ``8*L``, backward ``3*L`` over ``12*L``;
- dropout forward ``N*D`` over ``9*N*D`` (x, out, a uint8 mask), backward likewise;
- batch norm: channel sums ``L`` over ``4*L + 4*F``; squared deviations ``3*L`` over ``4*L +
  8*F``; normalisation ``4*L`` over ``12*L + 16*F``; running update ``6*F`` over ``24*F``;
  backward sums ``3*L`` over ``8*L + 8*F``; backward dx ``5*L`` over ``12*L + 16*F``;
- binary cross-entropy ``10*N`` over ``16*N + 8``;
- weight penalty ``4*F*Q`` over ``4*F*Q + 8``; its gradient ``5*F*Q`` over ``12*F*Q``;
- a residual block's sum with its ReLU on the conv output: ``2*L`` over ``12*L``; option A's
  shortcut of the layer's input x, stride 2, its C channels zero-padded to 2C (-> 8 x 8): no
  FLOPs over ``12*N*C*64``, its backward none over ``4*N*C*(64 + H*W)``;
- global average pooling of the conv output: ``L`` over ``4*L + 4*N*F``, its backward
  likewise.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write

COLUMNS = ["kernel", "arch", "registers", "smem_bytes", "spill_stores", "spill_loads",
           "threads_per_block", "occupancy", "arithmetic_intensity"]


@dataclass(frozen=True)
class Arch:
    max_warps: int  # resident warps per SM
    max_blocks: int  # resident blocks per SM
    smem_per_sm: int  # bytes of shared memory per SM (largest carve-out)
    reserved_smem: int  # bytes the runtime reserves per block
    regs_per_sm: int = 65536
    reg_granularity: int = 256  # registers are allocated per warp in units of this


ARCHS = {
    (7, 5): Arch(max_warps=32, max_blocks=16, smem_per_sm=64 * 1024, reserved_smem=0),
    (8, 0): Arch(max_warps=64, max_blocks=32, smem_per_sm=164 * 1024, reserved_smem=1024),
    (9, 0): Arch(max_warps=64, max_blocks=32, smem_per_sm=228 * 1024, reserved_smem=1024),
}

# Reference shapes (see the module docstring).
N, C, H, W, F, KH, KW = 128, 32, 15, 15, 64, 3, 3
P = H * W  # 'same' padding, stride 1: Ho = Wo = 15
Q = C * KH * KW
POOLED = 7 * 7
D, M = F * POOLED, 10


@dataclass(frozen=True)
class KernelSpec:
    name: str
    signature: tuple  # float32 numba types, in launch order
    threads_per_block: int
    flops: float
    bytes: float


def kernel_specs() -> list[KernelSpec]:
    """Every kernel (every ``*_kernel`` of :mod:`cnn.backends.cuda.kernels`; one without a
    spec is an error) with the float32 signature the backend launches it with."""
    from numba import boolean, float32, int32, int64, uint8, uint64

    from ..backends.cuda import kernels as K
    from ..backends.cuda import layer_kernels as LK

    a1, a2 = float32[::1], float32[:, ::1]
    a4, a5 = float32[:, :, :, ::1], float32[:, :, :, :, ::1]
    a3, i3 = float32[:, :, ::1], int32[:, :, ::1]
    gemm = K.TILE * K.TILE
    elem = K.ELEMENTWISE_THREADS
    col_sum = K.COLUMN_SUM_COLS * K.COLUMN_SUM_ROWS
    conv_out = N * F * P
    specs = [
        ("fill_zero_kernel", (a1,), elem, 0, 4 * F * Q),
        ("conv2d_forward_kernel", (a4, a4, a1, int64, int64, int64, a4), gemm,
         2 * N * F * P * Q + N * F * P, 4 * (N * C * H * W + F * Q + F + N * F * P)),
        ("conv2d_backward_input_kernel", (a4, a4, int64, int64, int64, a4), gemm,
         2 * N * C * H * W * F * KH * KW, 4 * (N * F * P + F * Q + N * C * H * W)),
        ("conv2d_backward_weight_kernel", (a4, a4, int64, int64, int64, int64, a5, a2), gemm,
         2 * F * (Q + 1) * N * P, 4 * (N * F * P + N * C * H * W + F * Q + F)),
        ("column_sums_kernel", (a2, a1), col_sum, N * M, 4 * (N * M + M)),
        ("maxpool2d_forward_kernel", (a3, int64, int64, a3, i3), elem,
         N * F * POOLED * 3, 4 * conv_out + 8 * N * F * POOLED),
        ("maxpool2d_backward_kernel", (a3, i3, int64, int64, a3), elem,
         N * F * POOLED, 8 * N * F * POOLED + 4 * conv_out),
        ("relu_forward_kernel", (a1, a1), elem, conv_out, 8 * conv_out),
        ("relu_backward_kernel", (a1, a1, a1), elem, conv_out, 12 * conv_out),
        ("matmul_kernel", (a2, a2, a1, boolean, boolean, a2), gemm,
         2 * N * D * M + N * M, 4 * (N * D + D * M + M + N * M)),
        ("softmax_xent_kernel", (a2, int64[::1], float32, a2, a1, int32[::1]), K.XENT_THREADS,
         8 * N * M, 4 * 2 * N * M + 8 * N + 8),
        ("axpby_kernel", (a1, float32, a1, float32), elem, 3 * F * Q, 12 * F * Q),
        ("axpby_square_kernel", (a1, float32, a1, float32), elem, 4 * F * Q, 12 * F * Q),
        ("axpby_ratio_kernel", (a1, float32, float32, a1, a1, float32, boolean, a1, boolean),
         elem, 8 * F * Q, 20 * F * Q),
        # cuda/layer_kernels.py
        ("sigmoid_forward_kernel", (a1, a1), elem, 4 * conv_out, 8 * conv_out),
        ("sigmoid_backward_kernel", (a1, a1, a1), elem, 3 * conv_out, 12 * conv_out),
        ("tanh_forward_kernel", (a1, a1), elem, conv_out, 8 * conv_out),
        ("tanh_backward_kernel", (a1, a1, a1), elem, 3 * conv_out, 12 * conv_out),
        ("dropout_forward_kernel", (a2, uint64, uint64, int64, float32, a2, uint8[:, ::1]),
         elem, N * D, 9 * N * D),
        ("dropout_backward_kernel", (a1, uint8[::1], float32, a1), elem, N * D, 9 * N * D),
        ("channel_sums_kernel", (a3, a1), LK.CHANNEL_THREADS, conv_out, 4 * conv_out + 4 * F),
        ("channel_sq_dev_sums_kernel", (a3, a1, float32, a1), LK.CHANNEL_THREADS,
         3 * conv_out, 4 * conv_out + 8 * F),
        ("batchnorm_normalize_kernel", (a3, a1, a1, float32, float32, a1, a1, a3, a3, a1), elem,
         4 * conv_out, 12 * conv_out + 16 * F),
        ("batchnorm_running_kernel", (a1, a1, a1, a1, float32, float32, float32, a1, a1), elem,
         6 * F, 24 * F),
        ("batchnorm_backward_sums_kernel", (a3, a3, a1, a1), LK.CHANNEL_THREADS, 3 * conv_out,
         8 * conv_out + 8 * F),
        ("batchnorm_backward_dx_kernel", (a3, a3, a1, a1, a1, a1, float32, a3), elem,
         5 * conv_out, 12 * conv_out + 16 * F),
        ("bce_kernel", (a2, int64[::1], float32, a2, a1, int32[::1]), LK.BCE_THREADS, 10 * N,
         16 * N + 8),
        ("weight_penalty_kernel", (a1, float32, float32, a1, a1), LK.PENALTY_THREADS,
         4 * F * Q, 4 * F * Q + 8),
        ("weight_penalty_grad_kernel", (a1, a1, float32, float32), elem, 5 * F * Q, 12 * F * Q),
        ("residual_add_kernel", (a1, a1, boolean, a1), elem, 2 * conv_out, 12 * conv_out),
        ("shortcut_pad_kernel", (a4, int64, int64, a4), elem, 0, 12 * N * C * 64),
        ("shortcut_unpad_kernel", (a4, int64, int64, a4), elem, 0, 4 * N * C * (64 + H * W)),
        ("plane_means_kernel", (a2, a1), LK.PLANE_THREADS, conv_out, 4 * conv_out + 4 * N * F),
        ("spread_means_kernel", (a1, a2), elem, conv_out, 4 * conv_out + 4 * N * F),
    ]
    names = {n for module in (K, LK) for n in dir(module) if n.endswith("_kernel")}
    missing = sorted(names - {s[0] for s in specs})
    if missing:
        raise RuntimeError(f"kernels without a report spec: {missing}")
    return [KernelSpec(*s) for s in specs]


def ptxas_path() -> str:
    """ptxas from the ``nvidia-cuda-nvcc`` wheel, else from PATH."""
    try:
        import nvidia.cuda_nvcc

        for root in nvidia.cuda_nvcc.__path__:
            candidate = Path(root) / "bin" / "ptxas"
            if candidate.is_file():
                return str(candidate)
    except ImportError:
        pass
    found = shutil.which("ptxas")
    if found is None:
        raise RuntimeError("ptxas not found: install nvidia-cuda-nvcc-cu12 or put ptxas on PATH")
    return found


def assemble(ptx: str, cc: tuple[int, int], ptxas: str) -> dict:
    """Run ``ptxas -v`` on ``ptx``; registers, smem and spill bytes of its one entry."""
    arch = f"sm_{cc[0]}{cc[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", f"-arch={arch}", str(src), "-o",
                               str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas -arch={arch} failed:\n{proc.stderr}")
    log = proc.stderr

    def grab(pattern: str) -> int:
        hit = re.search(pattern, log)
        return int(hit.group(1)) if hit else 0  # ptxas omits a zero smem figure

    return {"registers": grab(r"Used (\d+) registers"),
            "smem_bytes": grab(r"(\d+) bytes smem"),
            "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads")}


def occupancy(arch: Arch, registers: int, smem_bytes: int, threads: int) -> float:
    """Theoretical occupancy (see the module docstring)."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(registers * 32 / arch.reg_granularity) * arch.reg_granularity
    limits = [arch.max_blocks, arch.max_warps // warps]
    if regs_per_warp:
        limits.append((arch.regs_per_sm // regs_per_warp) // warps)
    if smem_bytes + arch.reserved_smem:
        limits.append(arch.smem_per_sm // (smem_bytes + arch.reserved_smem))
    return min(limits) * warps / arch.max_warps


# float64 instructions in a float32 kernel mean an accidental promotion (a Python float
# literal, or int/float mixing): 1/32 to 1/64 of the float32 rate on most GPUs.
_FP64 = re.compile(r"^\s*[a-z]+(\.[a-z0-9]+)*\.f64\b", re.MULTILINE)


def analyse(cc_list=tuple(ARCHS)) -> list[dict]:
    """One row per (kernel, arch): the ``COLUMNS`` plus ``fp64_instructions``."""
    from numba import cuda

    from ..backends.cuda import kernels as K
    from ..backends.cuda import layer_kernels as LK

    ptxas = ptxas_path()
    rows = []
    for spec in kernel_specs():
        kernel = getattr(K, spec.name, None) or getattr(LK, spec.name)
        for cc in cc_list:
            ptx, _ = cuda.compile_ptx(kernel.py_func, spec.signature, cc=cc)
            res = assemble(ptx, cc, ptxas)
            rows.append({
                "kernel": spec.name,
                "arch": f"sm_{cc[0]}{cc[1]}",
                **res,
                "threads_per_block": spec.threads_per_block,
                "occupancy": round(occupancy(ARCHS[cc], res["registers"], res["smem_bytes"],
                                             spec.threads_per_block), 3),
                "arithmetic_intensity": round(spec.flops / spec.bytes, 3),
                "fp64_instructions": len(_FP64.findall(ptx)),
            })
    return rows


def format_table(rows: list[dict]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnn.bench.ptx",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="CSV file to write (directories are created)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead")
    args = parser.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        parser.error("unset NUMBA_ENABLE_CUDASIM: PTX compilation needs the real CUDA target")
    rows = analyse()
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(out, text.getvalue())
    print(json.dumps(rows) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
