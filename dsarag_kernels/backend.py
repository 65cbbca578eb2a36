"""Which kernels a model runs, resolved once when it is loaded: the one object that says so.

| name        | where                                   | selection and gather attention                 |
|-------------|-----------------------------------------|------------------------------------------------|
| `triton`    | a GPU (or the Triton interpreter)       | Triton (CUDA prefill top-k): scores, top-k, gather |
| `cpu-amx`   | a CPU with AMX, the model in bf16       | compiled C++ (cpu_dsa.cpp), AMX tile products  |
| `cpu-bf16`  | a CPU with AVX512-BF16, the model in bf16 | compiled C++, AVX512-BF16 dot products       |
| `cpu-fp32`  | any CPU with a C++ compiler             | compiled C++ in float32                        |
| `torch`     | anywhere                                | the PyTorch path (torch_dsa.py)                |

Every backend's callables share one signature per step, so `indexer_model/dsa.py` calls them without asking
which one runs. On the CPU a decode step's weight products run over int8 copies of the weights where the compiled
kernels have them (`int8_decode`; `DSARAG_DECODE_WEIGHTS=model` keeps the model's own dtype), a dense layer's whole
step in one compiled call (`decode_layer`). On a GPU the indexer's projection, each RMSNorm and each RoPE are one
Triton launch (index_projection.py, triton_rows.py): a decode step replayed from a CUDA graph is bound by its
launches. `selection` replaces the indexer's choice of keys (the oracle of `indexer_model/oracle.py`).
"""

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsarag.kernels import torch_dsa

KERNEL_CHOICES = ("auto", "triton", "triton-fp8", "native", "torch")
# The weights a CPU decode step reads: int8 copies (half of bf16's bytes) or the model's own tensors.
DECODE_WEIGHTS = ("int8", "model")

# (q, w, k, q_positions, n_keys, topk, n_sink, window) -> indices (B, T, topk), -1 for unused slots
SelectTopk = Callable[[Tensor, Tensor, Tensor, Tensor, int | None, int, int, int], Tensor]
# (q, k_cache, v_cache, indices, scale) -> out (B, Hq, T, d)
SparseAttention = Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]
# (indexer, x, positions) -> the indexer's q, w, k for the new tokens
ProjectIndex = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
# (x, weight, bias) -> F.linear(x, weight, bias)
Linear = Callable[[Tensor, Tensor, Tensor | None], Tensor]
# (x, *linears) -> their outputs on x, or one gated output (`AttentionBackend.joint_product`, `gated_product`)
JointLinear = Callable[..., Tensor | tuple[Tensor, ...]]
# (attention q of the selecting queries, their keys k_cache[:, :, :n_keys], q_positions, topk, n_sink, window)
# -> indices (B, T, topk)
Selection = Callable[[Tensor, Tensor, Tensor, int, int, int], Tensor]
# (q (B, H, 1, d), k_cache, v_cache, position on the device, scale) -> out: one query over a whole cache
DenseDecode = Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]


def each_linear(x: Tensor, *linears: nn.Module) -> tuple[Tensor, ...]:
    return tuple(linear(x) for linear in linears)


def gated_linear(x: Tensor, gate: nn.Module, up: nn.Module) -> Tensor:
    return F.silu(gate(x)) * up(x)


def _project_in_torch(indexer: nn.Module, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return indexer.project(x, positions)


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    select_topk: SelectTopk
    sparse_attention: SparseAttention
    project_index: ProjectIndex = _project_in_torch
    linear: Linear = F.linear
    dense_decode: DenseDecode | None = None  # a graph-captured decode step's dense attention (GPU)
    selection: Selection | None = None  # a custom choice of keys in place of the indexer's
    int8_decode: bool = False  # decode steps' weight products over int8 copies of the weights (cpu_dsa.cpp)
    # The module whose rows_rms_norm and rows_rope run the model's norms and RoPE: "cpu_dsa" (a decode step's rows
    # in one compiled call) or "triton_rows" (one launch on a GPU); None: PyTorch's.
    rows: str | None = None

    def rms_norm(self, fallback: Callable) -> Callable:
        """The RMSNorm (x, weight, eps) to run: `rows`' where it applies, else `fallback`."""
        if self.rows is None:
            return fallback
        return importlib.import_module(f"dsarag.kernels.{self.rows}").rows_rms_norm(fallback)

    def rope(self, fallback: Callable) -> Callable:
        """The RoPE (x, (cos, sin)) to run: `rows`' where it applies, else `fallback`."""
        if self.rows is None:
            return fallback
        return importlib.import_module(f"dsarag.kernels.{self.rows}").rows_rope(fallback)

    def product(self, weight: Tensor) -> Linear:
        """The product a Linear holding `weight` runs: `linear`, or with `int8_decode` its decode steps over an
        int8 copy of the weight made now (the prefill keeps `linear` on the weight itself)."""
        if not self.int8_decode:
            return self.linear
        from dsarag.kernels import cpu_dsa

        return cpu_dsa.int8_product(weight, self.linear)

    def joint_product(self, linears: list[nn.Linear]) -> JointLinear:
        """The product (x, *linears) -> each Linear's output on x (an attention's q, k, v): with `int8_decode` a
        decode step's in one compiled call over int8 copies of `linears`' weights, stacked now."""
        if not self.int8_decode:
            return each_linear
        from dsarag.kernels import cpu_dsa

        return cpu_dsa.int8_joint_product(linears, each_linear)

    def gated_product(self, gate: nn.Linear, up: nn.Linear) -> JointLinear:
        """The product (x, gate, up) -> silu(gate(x)) * up(x), SwiGLU's first half: with `int8_decode` a decode
        step's in one compiled call."""
        if not self.int8_decode:
            return gated_linear
        from dsarag.kernels import cpu_dsa

        return cpu_dsa.int8_joint_product([gate, up], gated_linear, gated=True)

    def decode_layer(self, block: nn.Module, fallback: Callable) -> Callable:
        """The step (block, x, rope, input_pos, n_keys) -> x of a dense layer: with `int8_decode` a decode token's
        in one compiled call (norms, products, RoPE, cache write, attention), else `fallback`. Call after the
        block's products are the backend's."""
        if not self.int8_decode:
            return fallback
        from dsarag.kernels import cpu_dsa

        return cpu_dsa.int8_decode_layer(block, fallback)

    @property
    def reads_position_on_device(self) -> bool:
        """Whether a decode step captured in a CUDA graph can run here (its position lives on the device)."""
        return self.name.startswith("triton")


TORCH = AttentionBackend("torch", torch_dsa.select_topk, torch_dsa.sparse_attention)


def _triton(fp8: bool) -> AttentionBackend:
    from dsarag.kernels.index_projection import project_index
    from dsarag.kernels.indexer import select_topk as triton_select_topk
    from dsarag.kernels.sparse_attention import dense_attention_decode
    from dsarag.kernels.sparse_attention import sparse_attention as triton_sparse_attention

    def select_topk(
        q: Tensor,
        w: Tensor,
        k: Tensor,
        q_positions: Tensor,
        n_keys: int | None,
        topk: int,
        n_sink: int,
        window: int,
    ) -> Tensor:
        if n_keys is None:  # a graph-captured step: its position on the device, every cached key a candidate
            return triton_select_topk(q, w, k, q_positions[:1], k.shape[1], topk, n_sink, window, fp8=fp8)
        # New tokens sit at consecutive positions ending at n_keys - 1 (a prefill chunk or one decode step).
        return triton_select_topk(q, w, k, n_keys - q.shape[1], n_keys, topk, n_sink, window, fp8=fp8)

    def sparse_attention(
        q: Tensor, k_cache: Tensor, v_cache: Tensor, indices: Tensor, scale: float
    ) -> Tensor:
        return triton_sparse_attention(q, k_cache, v_cache, indices.to(torch.int32), scale)

    return AttentionBackend(
        "triton-fp8" if fp8 else "triton",
        select_topk,
        sparse_attention,
        project_index=project_index,
        dense_decode=dense_attention_decode,
        rows="triton_rows",
    )


def _compiled_cpu(dtype: torch.dtype, decode_weights: str) -> AttentionBackend:
    from dsarag.kernels import cpu_dsa

    bf16 = dtype == torch.bfloat16 and cpu_dsa.avx512_bf16_ready()
    name = "cpu-fp32" if not bf16 else "cpu-amx" if cpu_dsa.amx_ready() else "cpu-bf16"
    return AttentionBackend(
        name,
        cpu_dsa.select_topk,
        cpu_dsa.sparse_attention,
        project_index=cpu_dsa.project_index,
        linear=cpu_dsa.linear if bf16 else F.linear,
        int8_decode=decode_weights == "int8" and cpu_dsa.int8_ready(),
        rows="cpu_dsa",
    )


def decode_weights_choice(decode_weights: str | None = None) -> str:
    """`decode_weights`, else $DSARAG_DECODE_WEIGHTS, else int8."""
    choice = decode_weights or os.environ.get("DSARAG_DECODE_WEIGHTS") or "int8"
    if choice not in DECODE_WEIGHTS:
        raise ValueError(
            f"decode weights {choice!r} (DSARAG_DECODE_WEIGHTS): use one of {', '.join(DECODE_WEIGHTS)}"
        )
    return choice


def resolve_backend(
    device: str | torch.device,
    dtype: torch.dtype,
    kernels: str = "auto",
    decode_weights: str | None = None,
) -> AttentionBackend:
    """The backend for a model on `device` in `dtype`. auto: Triton on a GPU; on the CPU the compiled kernels
    where a C++ compiler builds them, else PyTorch. native: the compiled kernels or an error. `decode_weights`
    (see `decode_weights_choice`): int8 runs the compiled kernels' decode steps over int8 weights."""
    decode_weights = decode_weights_choice(decode_weights)
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels {kernels!r}: use one of {', '.join(KERNEL_CHOICES)}")
    gpu = torch.device(device).type == "cuda"
    if kernels.startswith("triton") or (kernels == "auto" and gpu):
        return _triton(fp8=kernels == "triton-fp8")
    if kernels == "torch":
        return TORCH
    if gpu:
        raise ValueError("kernels 'native' are the compiled CPU kernels: use auto, triton or torch on a GPU")
    from dsarag.kernels.cpu_dsa import native_library

    if native_library() is None:
        if kernels == "native":
            raise RuntimeError("kernels 'native' need a C++ compiler (g++ or $CXX) to build them")
        return TORCH
    return _compiled_cpu(dtype, decode_weights)
