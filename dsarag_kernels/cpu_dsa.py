"""DSA on the CPU through compiled C++ (cpu_dsa.cpp): fused index scores + exact top-k, gather attention, and the
indexer's projection, RMSNorm and RoPE of a decode step; on CPUs with AVX512-BF16 its bf16 weight products too; with
AVX2 its int8 weight products and a dense layer's whole decode step (`int8_decode_layer`).

The source is compiled once per machine with the system C++ compiler (g++ -O3 -march=native -fopenmp, about 2 s)
into `cache_dir()/kernels/` and loaded with ctypes; no network, no PyTorch headers. `DSARAG_CPU_ISA=avx2` builds
for AVX2, FMA and F16C only (`cpu_isa()`), as on most laptops: no AVX512-BF16, VNNI or AMX kernels, and the model
in float32. Without a compiler, or when compiling fails, `native_library()` returns None and the model keeps the
PyTorch path (torch_dsa.py), saying so once on stderr. The kernels run in float32: bf16 inputs are converted per call,
except on CPUs with AVX512-BF16 (where the model runs in bf16), which take bf16 kernels (`avx512_bf16_ready()`), on
AMX tile products where the CPU has AMX too (`amx_ready()`). Same signatures as the PyTorch path, so an
`AttentionBackend` (backend.py) holds either.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsarag.kernels.torch_dsa import check_topk_holds_forced, wants_gradient

SOURCE = Path(__file__).with_name("cpu_dsa.cpp")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
# $DSARAG_CPU_ISA -> the instruction sets the kernels are built for. avx2 (x86-64-v3: AVX2, FMA, F16C, BMI2) caps a
# bigger CPU to a laptop's, to measure that class of machine here; PyTorch's own kernels take
# ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 for the same.
CPU_ISA_FLAGS = {"native": "-march=native", "avx2": "-march=x86-64-v3"}
KEY_TILE = 24  # cpu_dsa.cpp kKeyTile: the index keys are laid out in tiles of this many keys
HEAD_GROUP = 4  # cpu_dsa.cpp kHeadGroup: index heads are padded to a multiple of it
# Fewer queries (a decode step) score a float32 index key cache row by row: tiling it in PyTorch would copy the whole
# cache per layer at every step. The bf16 kernels without AMX pack their tiles themselves, in one pass.
FEW_QUERIES = 8
INT8_BLOCK = 32  # cpu_dsa.cpp kQ8Block: int8 weights per fp16 scale
AMX_ROWS, AMX_DEPTH = 16, 32  # an AMX tile: 16 rows of 32 bf16 values
# The bf16 gather attention: query heads per kv head (one register's lanes), head sizes (AMX: 64 only).
BF16_MAX_GROUP, BF16_HEAD_DIMS, AMX_HEAD_DIM = 16, (64, 128), 64
log = logging.getLogger(__name__)

_i64, _int, _float, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
# x, positions, rows, dim; wq, wk, wp; heads, head dim, weights; LayerNorm: weight, bias, eps; RoPE dims, base;
# w scale; q, k, w out; threads
_INDEX_PROJECT = [_ptr, _ptr, _i64, _int, *[_ptr] * 3, *[_int] * 3, _ptr, _ptr, _float, _int, _float, _float]
_INDEX_PROJECT += [*[_ptr] * 3, _int]
# x, dim, norm weights, eps; q/k/v weights, bias, heads, kv heads, head dim; cos, sin; caches, head stride, position;
# o, gate/up weights, hidden size, down weights; bf16, threads
_DECODE_LAYER = [_ptr, _int, _ptr, _ptr, _float, _ptr, _ptr, _ptr, _int, _int, _int, _ptr, _ptr, _ptr, _ptr]
_DECODE_LAYER += [_i64, _i64, _ptr, _ptr, _ptr, _ptr, _int, _ptr, _ptr, _int, _int]
_SIGNATURES = {  # pointers, then sizes, as declared in cpu_dsa.cpp
    "dsa_select_topk": [_ptr] * 3 + [_i64, _ptr, _i64] + [_int] * 5 + [_ptr, _int],
    "dsa_select_topk_rows": [_ptr] * 3 + [_i64, _ptr, _i64] + [_int] * 5 + [_ptr],
    "dsa_sparse_attention": [_ptr] * 3 + [_i64, _ptr, _i64] + [_int] * 5 + [_float, _ptr, _int],
    "dsa_index_project": _INDEX_PROJECT,
    "dsa_index_project_bf16": _INDEX_PROJECT,
    "dsa_select_topk_bf16": [_ptr] * 3 + [_i64, _ptr, _i64] + [_int] * 5 + [_ptr, _int],
    "dsa_select_topk_amx": [_ptr] * 3 + [_i64, _ptr, _i64] + [_int] * 5 + [_ptr, _int],
    "dsa_sparse_attention_amx": [_ptr] * 3 + [_i64, _i64, _ptr, _i64] + [_int] * 4 + [_float, _ptr, _int],
    "dsa_select_topk_amx_rows": [_ptr] * 3 + [_i64, _ptr, _i64] + [_int] * 5 + [_ptr, _int],
    "dsa_sparse_attention_rows_bf16": [_ptr] * 3 + [_i64, _ptr, _i64] + [_int] * 5 + [_float, _ptr, _int],
    "dsa_linear_rows_bf16": [_ptr] * 3 + [_i64, _i64, _int, _ptr, _int],
    "dsa_linear_rows_int8": [_ptr] * 4 + [_i64, _i64, _int, _int, _int, _ptr, _int],
    "dsa_quantize_int8": [_ptr, _int, _i64, _int, _ptr, _ptr, _int],
    "dsa_rms_norm_rows": [_ptr, _ptr, _float, _i64, _int, _int, _ptr],
    "dsa_rope_rows": [_ptr, _i64, _i64, _int, _int, _ptr, _ptr, _int, _ptr],
    "dsa_decode_layer_int8": _DECODE_LAYER,
}


def cpu_isa() -> str:
    """$DSARAG_CPU_ISA, else native: the one place that reads it."""
    from dsarag.base.errors import BadInputError

    choice = os.environ.get("DSARAG_CPU_ISA") or "native"
    if choice not in CPU_ISA_FLAGS:
        raise BadInputError(f"DSARAG_CPU_ISA={choice!r}: use one of {', '.join(CPU_ISA_FLAGS)}, or unset it")
    return choice


def compile_flags(isa: str) -> list[str]:
    return [*FLAGS, CPU_ISA_FLAGS[isa]]


def _machine_tag() -> str:
    """-march=native code runs only on CPUs with the same instruction sets: key the build by them."""
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _build(compiler: str, flags: list[str], target: Path) -> None:
    """Compile to a temporary file beside target, then rename: a concurrent or killed build leaves no half file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [compiler, *flags, "-o", str(built), str(SOURCE)], check=True, capture_output=True, text=True
        )
        os.replace(built, target)


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The compiled kernels for `cpu_isa()`, built on first use; None where they cannot be built (the PyTorch path
    runs)."""
    from dsarag.base.paths import cache_dir

    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        log.warning("no C++ compiler (g++ or $CXX) found: DSA on the CPU runs its slower PyTorch path")
        return None
    flags = compile_flags(cpu_isa())
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags, _machine_tag()]).encode())
    target = cache_dir() / "kernels" / f"cpu_dsa-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            _build(compiler, flags, target)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or str(error)
            log.warning(
                "building %s failed (%s): DSA on the CPU runs its PyTorch path", SOURCE.name, detail[-300:]
            )
            return None
    library = ctypes.CDLL(str(target))
    for name, argtypes in _SIGNATURES.items():
        if hasattr(library, name):  # bf16 kernels exist only where the CPU has AVX512-BF16, int8 with AVX2
            getattr(library, name).argtypes = argtypes
            getattr(library, name).restype = None
    library.dsa_amx_ready.restype = _int
    library.amx = bool(library.dsa_amx_ready())
    library.avx512_bf16 = hasattr(library, "dsa_select_topk_bf16")  # built where the CPU has AVX512-BF16
    return library


def amx_ready() -> bool:
    """Whether the bf16 kernels run here: built for a CPU with AMX and AVX512-BF16, tile state granted."""
    library = native_library()
    return library is not None and library.amx


def avx512_bf16_ready() -> bool:
    """Whether the AVX512-BF16 kernels run here: selection and gather attention on bf16 inputs where the CPU has no
    AMX (a decode step's gather attention where it has), and a decode step's weight products (`linear_rows`)."""
    library = native_library()
    return library is not None and library.avx512_bf16


def _all_bf16(*tensors: Tensor) -> bool:
    return all(x.dtype == torch.bfloat16 for x in tensors)


def _f32(x: Tensor) -> Tensor:
    return x.to(torch.float32).contiguous()


def _rows(cache: Tensor) -> Tensor:
    """A (heads, keys, d) cache prefix whose rows are contiguous; the heads may sit apart (a slice of a
    preallocated cache is passed as it is, with its head stride)."""
    return cache if cache.stride(2) == 1 and cache.stride(1) == cache.shape[2] else cache.contiguous()


def _f32_rows(cache: Tensor) -> Tensor:
    return _rows(cache.to(torch.float32))


def projects_natively(indexer: nn.Module, x: Tensor) -> bool:
    """Whether `index_projection` serves x: a few new tokens (a decode step) on the CPU, in float32 or bf16 like
    the indexer's weights, with no gradient wanted (the kernel has no backward)."""
    params = (indexer.wq.weight, indexer.wk.weight, indexer.weights_proj.weight, *indexer.k_norm.parameters())
    return (
        x.device.type == "cpu"
        and x.shape[1] < FEW_QUERIES
        and x.dtype in (torch.float32, torch.bfloat16)
        and all(p.dtype == x.dtype and p.is_contiguous() for p in params)
        and not wants_gradient(x, *params)
    )


def index_projection(indexer: nn.Module, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """indexer.project(x, positions) in one compiled call: q, w, k in x's dtype (see `projects_natively`).

    A decode step's projection is about ten PyTorch calls on tiny tensors, 0.3-0.6 ms a layer in bf16: about as
    long as the step's selection and attention (benchmarks/dsa_cpu_decode.py)."""
    library = native_library()
    batch, n_rows, dim = x.shape
    n_weights = indexer.weights_proj.out_features
    rows = x.reshape(batch * n_rows, dim).contiguous()
    row_positions = positions.to(torch.int64).expand(batch, n_rows).contiguous()
    q = torch.empty(batch, n_rows, indexer.n_heads, indexer.head_dim, dtype=x.dtype)
    k = torch.empty(batch, n_rows, indexer.head_dim, dtype=x.dtype)
    w = torch.empty(batch, n_rows, n_weights, dtype=x.dtype)
    kernel = library.dsa_index_project_bf16 if x.dtype == torch.bfloat16 else library.dsa_index_project
    weights = (indexer.wq.weight, indexer.wk.weight, indexer.weights_proj.weight)
    kernel(
        rows.data_ptr(), row_positions.data_ptr(), batch * n_rows, dim, *(p.data_ptr() for p in weights),
        indexer.n_heads, indexer.head_dim, n_weights, indexer.k_norm.weight.data_ptr(),
        indexer.k_norm.bias.data_ptr(), indexer.k_norm.eps, indexer.rope_dims, indexer.rope_base,
        indexer.weight_scale, q.data_ptr(), k.data_ptr(), w.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if indexer.index_sets > 1:
        w = w.view(batch, n_rows, indexer.index_sets, indexer.n_heads)
    return q, w, k


def project_index(indexer: nn.Module, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The indexer's q, w, k for the new tokens (indexer.project): a decode step's in one compiled call."""
    if projects_natively(indexer, x):
        return index_projection(indexer, x, positions)
    return indexer.project(x, positions)


def runs_linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether `linear_rows` serves F.linear(x, weight, bias): a decode step's few rows in bf16 on a CPU with
    AVX512-BF16 (`avx512_bf16_ready`), the inner size a multiple of 32, no gradient wanted."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        x.device.type == "cpu"
        and x.numel() < FEW_QUERIES * x.shape[-1]
        and x.shape[-1] % AMX_DEPTH == 0
        and _all_bf16(*tensors)
        and weight.is_contiguous()
        and not wants_gradient(*tensors)
        and avx512_bf16_ready()
    )


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias) in one compiled call (see `runs_linear_rows`): PyTorch's bf16 product reads a
    decode step's weights at 6-7 GB/s on such CPUs, this one at 13-16 (benchmarks/dsa_cpu_decode.py)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype)
    native_library().dsa_linear_rows_bf16(
        rows.data_ptr(), weight.data_ptr(), None if bias is None else bias.contiguous().data_ptr(),
        rows.shape[0], weight.shape[0], weight.shape[1], out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear, a decode step's bf16 products in one compiled call each (see `runs_linear_rows`)."""
    if runs_linear_rows(x, weight, bias):
        return linear_rows(x, weight, bias)
    return F.linear(x, weight, bias)


def _runs_rows(x: Tensor, n_rows: int, *others: Tensor) -> bool:
    """Whether a decode step's row kernel (norm, RoPE) serves x: fewer than FEW_QUERIES rows on the CPU in float32
    or bf16 (others in the same dtype), no gradient wanted."""
    return (
        x.device.type == "cpu"
        and n_rows < FEW_QUERIES
        and x.dtype in (torch.float32, torch.bfloat16)
        and all(t.dtype == x.dtype for t in others)
        and not wants_gradient(x, *others)
    )


def rows_rms_norm(fallback: Callable) -> Callable:
    """The RMSNorm (x, weight, eps) -> normed x: a decode step's rows in one compiled call, others `fallback`."""

    def norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        if not _runs_rows(x, x.numel() // x.shape[-1], weight):
            return fallback(x, weight, eps)
        rows = x.contiguous()
        out = torch.empty_like(rows)
        native_library().dsa_rms_norm_rows(
            rows.data_ptr(), weight.contiguous().data_ptr(), eps, rows.numel() // x.shape[-1], x.shape[-1],
            int(x.dtype == torch.bfloat16), out.data_ptr(),
        )  # fmt: skip
        return out

    return norm


def rows_rope(fallback: Callable) -> Callable:
    """RoPE (x (B, T, H, D), (cos, sin) (T, D) float32) -> rotated x: a decode step's heads in one compiled call
    (x may be a view into a joint product's output), others `fallback`."""

    def rope(x: Tensor, cos_sin: tuple[Tensor, Tensor]) -> Tensor:
        batch, n_rows, n_heads, head_dim = x.shape
        if not _runs_rows(x, batch * n_rows) or cos_sin[0].dtype != torch.float32:
            return fallback(x, cos_sin)
        if x.stride(3) != 1 or x.stride(2) != head_dim or x.stride(0) != n_rows * x.stride(1):
            x = x.contiguous()
        cos, sin = (t.contiguous() if batch == 1 else t.repeat(batch, 1) for t in cos_sin)
        out = torch.empty(x.shape, dtype=x.dtype)
        native_library().dsa_rope_rows(
            x.data_ptr(), x.stride(1), batch * n_rows, n_heads, head_dim, cos.data_ptr(), sin.data_ptr(),
            int(x.dtype == torch.bfloat16), out.data_ptr(),
        )  # fmt: skip
        return out

    return rope


def int8_ready() -> bool:
    """Whether the int8 decode products run here: built for a CPU with AVX2, FMA and F16C."""
    return hasattr(native_library(), "dsa_linear_rows_int8")


@dataclass(frozen=True)
class Int8Weight:
    """A weight (n, k) as int8 values and one fp16 scale per block of 32 along k: weight ~ q * scale."""

    q: Tensor  # (n, k) int8
    scales: Tensor  # (n, k / 32) float16

    def dequantize(self) -> Tensor:
        n, k = self.q.shape
        blocks = self.q.view(n, k // INT8_BLOCK, INT8_BLOCK).float() * self.scales.float()[..., None]
        return blocks.view(n, k)


def quantize_int8_reference(weight: Tensor) -> Int8Weight:
    """Per block of 32: scale = max |w| / 127 rounded to fp16, q = round(w * (1 / scale)) clamped to +-127 (0 in
    a block of zeros)."""
    n, k = weight.shape
    blocks = weight.float().view(n, k // INT8_BLOCK, INT8_BLOCK)
    scales = (blocks.abs().amax(-1) / 127).to(torch.float16)
    wide = scales.float()[..., None]
    inverse = torch.where(wide > 0, 1 / wide, 0.0)
    levels = (blocks * inverse).clamp(-127, 127).round()
    return Int8Weight(levels.to(torch.int8).view(n, k), scales)


def quantize_int8(weight: Tensor) -> Int8Weight:
    """quantize_int8_reference in one compiled pass (about 0.2 s for the default model's 494M weights)."""
    n, k = weight.shape
    source = weight.detach().contiguous()
    packed = Int8Weight(
        torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // INT8_BLOCK, dtype=torch.float16)
    )
    native_library().dsa_quantize_int8(
        source.data_ptr(), int(source.dtype == torch.bfloat16), n, k, packed.q.data_ptr(),
        packed.scales.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return packed


def rounds_x_per_block() -> bool:
    """Whether this build's int8 products round x to int8 per block of 32 (AVX512-VNNI: llama.cpp's Q8_0 x Q8_0),
    else to int16 with one scale per row."""
    return bool(native_library().dsa_int8_rounds_x_per_block())


def round_x_reference(x: Tensor, per_block: bool) -> Tensor:
    """x in float32 as the int8 kernel sees it: per block of 32, round(x * 127 / max |x|) * max |x| / 127, or per
    row with 32767 levels."""
    wide = x.float()
    groups = wide.view(*x.shape[:-1], -1, INT8_BLOCK) if per_block else wide[..., None, :]
    levels = 127.0 if per_block else 32767.0
    most = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(most > 0, torch.full_like(most, levels) / most, 0.0)  # a division, as the kernel's
    return ((groups * inverse).round() * (most / levels)).view(x.shape)


def linear_int8_reference(x: Tensor, weight: Int8Weight, bias: Tensor | None, x_per_block: bool) -> Tensor:
    """F.linear over the dequantized weight and x rounded as the kernel rounds it (`round_x_reference`), in
    float32, the result in x's dtype."""
    wide_bias = None if bias is None else bias.float()
    return F.linear(round_x_reference(x, x_per_block), weight.dequantize(), wide_bias).to(x.dtype)


def runs_int8_rows(x: Tensor, bias: Tensor | None) -> bool:
    """Whether `linear_rows_int8` serves x: a decode step's few rows on the CPU in float32 or bf16 (the bias in
    the same dtype), no gradient wanted."""
    tensors = (x,) if bias is None else (x, bias)
    return (
        x.device.type == "cpu"
        and x.numel() < FEW_QUERIES * x.shape[-1]
        and x.dtype in (torch.float32, torch.bfloat16)
        and all(t.dtype == x.dtype for t in tensors)
        and not wants_gradient(*tensors)
    )


def linear_rows_int8(x: Tensor, weight: Int8Weight, bias: Tensor | None, gated: bool = False) -> Tensor:
    """linear_int8_reference in one compiled call: a decode step reads half the bytes of bf16 weights. `gated`:
    the weight stacks an MLP's gate and up projections and the result is silu(gate) * up (no bias)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    n, k = weight.q.shape
    out = torch.empty(*x.shape[:-1], n // 2 if gated else n, dtype=x.dtype)
    native_library().dsa_linear_rows_int8(
        rows.data_ptr(), weight.q.data_ptr(), weight.scales.data_ptr(),
        None if bias is None else bias.contiguous().data_ptr(), rows.shape[0], n, k,
        int(x.dtype == torch.bfloat16), int(gated), out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def _int8_takes(weight: Tensor) -> bool:
    """Whether the int8 kernel takes `weight`: on the CPU, float32 or bf16, rows a multiple of 32 long."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.shape[1] % INT8_BLOCK == 0
    )


def int8_product(weight: Tensor, fallback: Callable) -> Callable:
    """The product of a Linear holding `weight`: decode steps over an int8 copy made here, once; other calls
    (a prefill's many rows, gradients) through `fallback` on the weight itself. Weights the kernel cannot take
    (see `_int8_takes`) keep `fallback`."""
    if not _int8_takes(weight):
        return fallback
    packed = quantize_int8(weight)

    def product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if runs_int8_rows(x, bias):
            return linear_rows_int8(x, packed, bias)
        return fallback(x, weight, bias)

    product.packed = packed  # read by int8_decode_layer
    return product


def int8_joint_product(linears: list[nn.Linear], fallback: Callable, gated: bool = False) -> Callable:
    """The product (x, *linears) -> the Linears' outputs on x: a decode step's in one compiled call over int8 copies
    of their weights made here, stacked (one pass over x, one parallel region); other calls through `fallback`.
    `gated` (a gate and an up projection, no biases): silu(gate(x)) * up(x) in that one call."""
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears]
    one_input = all(_int8_takes(w) and w.shape[1] == weights[0].shape[1] for w in weights)
    gate_and_up = len(weights) == 2 and weights[0].shape == weights[1].shape and biases == [None, None]
    if not one_input or (gated and not gate_and_up):
        return fallback
    copies = [quantize_int8(w) for w in weights]
    packed = Int8Weight(torch.cat([c.q for c in copies]), torch.cat([c.scales for c in copies]))
    sizes = [w.shape[0] for w in weights]
    bias = None
    if any(b is not None for b in biases):
        stacked = [
            w.new_zeros(w.shape[0]) if b is None else b.detach() for w, b in zip(weights, biases, strict=True)
        ]
        bias = torch.cat(stacked)

    def product(x: Tensor, *linears: nn.Module) -> Tensor | tuple[Tensor, ...]:
        trains = torch.is_grad_enabled() and any(p.requires_grad for lin in linears for p in lin.parameters())
        if trains or not runs_int8_rows(x, bias):
            return fallback(x, *linears)
        if gated:
            return linear_rows_int8(x, packed, None, gated=True)
        return linear_rows_int8(x, packed, bias).split(sizes, dim=-1)

    product.packed, product.bias = packed, bias  # read by int8_decode_layer
    return product


# The compiled layer's attention reads a kv head's keys once per query head: past about 3K cached keys PyTorch's
# SDPA is the faster attention (a step on one thread of the AMX Xeon, compiled against op by op: 2K keys 59 / 63 ms,
# 4K 72 / 69, 8K 102 / 79).
COMPILED_LAYER_MAX_KEYS = 3072  # between 2K (compiled 6 % faster) and 4K (5 % slower)


def int8_decode_layer(block: nn.Module, fallback: Callable) -> Callable:
    """A dense layer's decode step (block, x, rope, input_pos, n_keys) -> x in one compiled call (cpu_dsa.cpp
    dsa_decode_layer_int8) over the int8 copies its products hold (`int8_product`, `int8_joint_product`): one token,
    batch 1, a KV cache in x's dtype, at most COMPILED_LAYER_MAX_KEYS keys; other calls through `fallback`. Blocks whose products are not all int8 keep
    `fallback`."""
    attention, feed_forward = block.attention, block.feed_forward
    products = (
        attention.qkv_product,
        attention.o_proj.product,
        feed_forward.gated_product,
        feed_forward.down_proj.product,
    )
    if not all(hasattr(p, "packed") for p in products) or attention.head_dim > 256:
        return fallback
    qkv, o, gate_up, down = (p.packed for p in products)
    qkv_bias = attention.qkv_product.bias

    def step(block: nn.Module, x: Tensor, rope: tuple[Tensor, Tensor], input_pos: Tensor, n_keys: int | None):
        attention = block.attention
        cache, norms = attention.kv_cache, (block.attention_norm.weight, block.ffn_norm.weight)
        if (
            x.shape[:2] != (1, 1)
            or n_keys is None
            or n_keys > COMPILED_LAYER_MAX_KEYS
            or cache is None
            or not runs_int8_rows(x, qkv_bias)
            or any(t.dtype != x.dtype for t in (*norms, cache.k_cache))
            or not cache.k_cache.is_contiguous()
        ):
            return fallback(block, x, rope, input_pos, n_keys)
        if attention.index_cache is not None:  # a dense step: the indexer's keys go stale from here
            attention.index_cache.invalidate_from(n_keys - 1)
        out = x.contiguous().clone()
        cos, sin = (t.contiguous() for t in rope)
        native_library().dsa_decode_layer_int8(
            out.data_ptr(), x.shape[-1], norms[0].data_ptr(), norms[1].data_ptr(), block.attention_norm.eps,
            qkv.q.data_ptr(), qkv.scales.data_ptr(), None if qkv_bias is None else qkv_bias.data_ptr(),
            attention.n_head, attention.n_kv_head, attention.head_dim, cos.data_ptr(), sin.data_ptr(),
            cache.k_cache.data_ptr(), cache.v_cache.data_ptr(), cache.k_cache.stride(1), n_keys - 1,
            o.q.data_ptr(), o.scales.data_ptr(), gate_up.q.data_ptr(), gate_up.scales.data_ptr(),
            gate_up.q.shape[0] // 2, down.q.data_ptr(), down.scales.data_ptr(), int(x.dtype == torch.bfloat16),
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    return step


def select_topk(
    q: Tensor,
    w: Tensor,
    k: Tensor,
    q_positions: Tensor,
    n_keys: int,
    topk: int,
    n_sink: int = 4,
    window: int = 64,
) -> Tensor:
    """torch_dsa.select_topk in one fused pass per query: indices (B, T, topk) int64, ascending, -1 padding.

    q (B, T, H_I, d_I), w (B, T, H_I), k (B, >= n_keys, d_I), q_positions (T,) below n_keys."""
    check_topk_holds_forced(topk, n_sink, window)
    library = native_library()
    batch, n_queries, n_heads, dim = q.shape
    n_tiles = -(-n_keys // KEY_TILE)
    pad_heads = -n_heads % HEAD_GROUP  # zero-weight heads add nothing to a score
    positions = q_positions.to(torch.int64).contiguous()
    out = torch.empty(batch, n_queries, topk, dtype=torch.int64)
    few = n_queries < FEW_QUERIES
    bf16_inputs = _all_bf16(q, k) and dim % AMX_DEPTH == 0  # read as they are, no float32 copy
    amx = bf16_inputs and amx_ready() and (not few or n_heads <= AMX_ROWS)
    bf16 = bf16_inputs and not amx and avx512_bf16_ready()
    for b in range(batch):
        if amx:  # decode steps: the cache's rows are the tiles; prefill: whole blocks of 16 queries
            blocks = n_queries if few else -(-n_queries // AMX_ROWS) * AMX_ROWS
            q_b = torch.nn.functional.pad(q[b], (0, 0, 0, 0, 0, blocks - n_queries)).contiguous()
            w_b = torch.nn.functional.pad(w[b].float(), (0, 0, 0, blocks - n_queries)).contiguous()
            keys = k[b, :n_keys].contiguous()
            kernel = library.dsa_select_topk_amx_rows if few else library.dsa_select_topk_amx
            kernel(
                q_b.data_ptr(), w_b.data_ptr(), keys.data_ptr(), n_keys, positions.data_ptr(),
                n_queries, n_heads, dim, topk, n_sink, window, out[b].data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
            continue
        q_b = torch.nn.functional.pad(q[b], (0, 0, 0, pad_heads)).contiguous()
        w_b = _f32(torch.nn.functional.pad(w[b], (0, pad_heads)))
        if bf16:  # AVX512-BF16 dot products over key tiles packed in the kernel, a decode step's too
            keys = k[b, :n_keys].contiguous()
            library.dsa_select_topk_bf16(
                q_b.data_ptr(), w_b.data_ptr(), keys.data_ptr(), n_keys, positions.data_ptr(), n_queries,
                n_heads + pad_heads, dim, topk, n_sink, window, out[b].data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
            continue
        q_b = _f32(q_b)
        if few:  # decode: score the cache's rows as they are
            keys = _f32(k[b, :n_keys])
            library.dsa_select_topk_rows(
                q_b.data_ptr(), w_b.data_ptr(), keys.data_ptr(), n_keys, positions.data_ptr(),
                n_queries, n_heads + pad_heads, dim, topk, n_sink, window, out[b].data_ptr(),
            )  # fmt: skip
            continue
        tiles = torch.zeros(n_tiles * KEY_TILE, dim, dtype=torch.float32)
        tiles[:n_keys] = k[b, :n_keys]
        tiles = tiles.view(n_tiles, KEY_TILE, dim).transpose(1, 2).contiguous()  # (n_tiles, dim, KEY_TILE)
        library.dsa_select_topk(
            q_b.data_ptr(), w_b.data_ptr(), tiles.data_ptr(), n_tiles, positions.data_ptr(),
            n_queries, n_heads + pad_heads, dim, topk, n_sink, window, out[b].data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return out


def sparse_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, indices: Tensor, scale: float) -> Tensor:
    """torch_dsa.sparse_attention with exact per-query work: out (B, Hq, T, d) in q's dtype.

    indices (B, T, k) or (B, sets, T, k) into the caches (B, Hkv, S, d); every query needs one valid index."""
    library = native_library()
    batch, n_q_heads, n_queries, dim = q.shape
    n_kv_heads = k_cache.shape[1]
    sets = indices if indices.dim() == 4 else indices[:, None]
    out = torch.empty(batch, n_q_heads, n_queries, dim, dtype=torch.float32)
    group = n_q_heads // n_kv_heads
    bf16_inputs = _all_bf16(q, k_cache, v_cache) and dim in BF16_HEAD_DIMS and group <= BF16_MAX_GROUP
    amx = bf16_inputs and dim == AMX_HEAD_DIM and amx_ready()
    bf16 = bf16_inputs and avx512_bf16_ready()
    for b in range(batch):
        if bf16:  # bf16 as they are
            q_b, k_b, v_b = q[b].contiguous(), _rows(k_cache[b]), _rows(v_cache[b])
        else:
            q_b, k_b, v_b = _f32(q[b]), _f32_rows(k_cache[b]), _f32_rows(v_cache[b])
        sets_b = sets[b].to(torch.int64).contiguous()
        if k_b.stride(0) != v_b.stride(0):  # one head stride serves both caches
            k_b, v_b = k_b.contiguous(), v_b.contiguous()
        caches = (q_b.data_ptr(), k_b.data_ptr(), v_b.data_ptr(), k_b.stride(0))
        if bf16 and (not amx or n_queries < FEW_QUERIES):  # per query exactly its rows, heads in lanes
            library.dsa_sparse_attention_rows_bf16(
                *caches, sets_b.data_ptr(), n_queries, n_q_heads, n_kv_heads, sets_b.shape[0], dim,
                sets_b.shape[-1], scale, out[b].data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
        elif amx:
            library.dsa_sparse_attention_amx(
                *caches, k_b.shape[1], sets_b.data_ptr(), n_queries, n_q_heads, n_kv_heads, sets_b.shape[0],
                sets_b.shape[-1], scale, out[b].data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
        else:
            library.dsa_sparse_attention(
                *caches, sets_b.data_ptr(), n_queries, n_q_heads, n_kv_heads, sets_b.shape[0], dim,
                sets_b.shape[-1], scale, out[b].data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
    return out.to(q.dtype)
