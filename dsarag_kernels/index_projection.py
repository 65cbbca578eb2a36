"""The lightning indexer's projection of new tokens on a GPU: its three products, then one Triton kernel.

`LightningIndexer.project` (indexer_model/indexer.py) is the reference: the products, the key LayerNorm, RoPE on
the first half of every query and key vector, the head weights' scale. In PyTorch the steps after the products are
about twenty launches a layer, which dominate the indexer's share of a decode step replayed from a CUDA graph;
here they are one launch, each program one token. Same rounding as the reference: the normed key is rounded to
the model's dtype before its rotation, and every rotation runs in float32.
"""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn

from dsarag.kernels.common import runs_in_triton
from dsarag.kernels.torch_dsa import rope_inverse_frequencies


@triton.jit
def _rope(x, partner, dims, position, inv_freq_ptr, HALF: tl.constexpr):
    """x (float32) at within-head `dims` after the half-split RoPE of each head's first 2 x HALF dims, given the
    values of their rotation partners (dim i < HALF pairs with i + HALF)."""
    rotated = dims < 2 * HALF
    angle = position * tl.load(inv_freq_ptr + dims % HALF, mask=rotated, other=0.0)
    turned = tl.where(dims < HALF, -partner, partner)
    return tl.where(rotated, x * tl.cos(angle) + turned * tl.sin(angle), x)


@triton.jit
def _layer_normed(row_ptr, cols, mean, rstd, weight_ptr, bias_ptr, out_ptr):
    """LayerNorm of the row's `cols` in float32, rounded to out_ptr's dtype (as nn.LayerNorm returns it)."""
    value = (tl.load(row_ptr + cols).to(tl.float32) - mean) * rstd
    value = value * tl.load(weight_ptr + cols).to(tl.float32) + tl.load(bias_ptr + cols).to(tl.float32)
    return value.to(out_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _index_rows_kernel(
    q_ptr, k_ptr, w_ptr, positions_ptr, inv_freq_ptr, norm_weight_ptr, norm_bias_ptr,
    q_out_ptr, k_out_ptr, w_out_ptr,
    seq_len, n_weights, eps, weight_scale,
    stride_q, stride_k, stride_w,
    N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, WEIGHTS: tl.constexpr,
):  # fmt: skip
    """One token (row = b * seq_len + t): q (N_HEADS, HEAD_DIM) rotated, k LayerNormed then rotated, w scaled."""
    row = tl.program_id(0)
    position = tl.load(positions_ptr + row % seq_len).to(tl.float32)
    dims = tl.arange(0, HEAD_DIM)
    partner = tl.where(dims < HALF, dims + HALF, dims - HALF)  # unrotated dims ignore theirs

    heads = tl.arange(0, N_HEADS)[:, None] * HEAD_DIM
    q_row = q_ptr + row * stride_q
    q = tl.load(q_row + heads + dims[None, :]).to(tl.float32)
    q_partner = tl.load(q_row + heads + partner[None, :]).to(tl.float32)
    q = _rope(q, q_partner, dims[None, :], position, inv_freq_ptr, HALF=HALF)
    tl.store(q_out_ptr + row * N_HEADS * HEAD_DIM + heads + dims[None, :], q.to(q_out_ptr.dtype.element_ty))

    # The key is LayerNormed, then rotated: each rotation partner's normed value is computed from its raw one.
    k_row = k_ptr + row * stride_k
    raw = tl.load(k_row + dims).to(tl.float32)
    mean = tl.sum(raw, 0) / HEAD_DIM
    rstd = 1.0 / tl.sqrt(tl.sum((raw - mean) * (raw - mean), 0) / HEAD_DIM + eps)
    normed = _layer_normed(k_row, dims, mean, rstd, norm_weight_ptr, norm_bias_ptr, k_out_ptr)
    normed_partner = _layer_normed(k_row, partner, mean, rstd, norm_weight_ptr, norm_bias_ptr, k_out_ptr)
    k = _rope(normed, normed_partner, dims, position, inv_freq_ptr, HALF=HALF)
    tl.store(k_out_ptr + row * HEAD_DIM + dims, k.to(k_out_ptr.dtype.element_ty))

    slots = tl.arange(0, WEIGHTS)
    weights = tl.load(w_ptr + row * stride_w + slots, mask=slots < n_weights, other=0.0).to(tl.float32)
    tl.store(
        w_out_ptr + row * n_weights + slots,
        (weights * weight_scale).to(w_out_ptr.dtype.element_ty),
        mask=slots < n_weights,
    )


@functools.cache
def _inverse_frequencies(rope_dims: int, base: float, device: torch.device) -> Tensor:
    return rope_inverse_frequencies(rope_dims, base, device)


def projects_fused(indexer: nn.Module, x: Tensor) -> bool:
    """Whether `index_projection` serves x: on a GPU (or the Triton interpreter), no gradient wanted (the kernel
    has no backward), power-of-two head shapes with RoPE on the first half of each head."""
    params = (indexer.wq.weight, indexer.wk.weight, indexer.weights_proj.weight, *indexer.k_norm.parameters())
    n_heads, head_dim = indexer.n_heads, indexer.head_dim
    return (
        runs_in_triton(x, *params)
        and n_heads & (n_heads - 1) == 0
        and head_dim & (head_dim - 1) == 0
        and indexer.rope_dims * 2 == head_dim
    )


def index_projection(indexer: nn.Module, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """indexer.project(x, positions): q (B, T, H_I, d_I), w (B, T, H_I) or (B, T, sets, H_I), k (B, T, d_I), in
    x's dtype (see `projects_fused`). positions (T,) may live on the device (a captured decode step)."""
    batch, seq_len, _ = x.shape
    n_heads, head_dim = indexer.n_heads, indexer.head_dim
    n_weights = indexer.weights_proj.out_features
    q_raw = F.linear(x, indexer.wq.weight).view(batch * seq_len, -1)
    k_raw = F.linear(x, indexer.wk.weight).view(batch * seq_len, -1)
    w_raw = F.linear(x, indexer.weights_proj.weight).view(batch * seq_len, -1)
    q = torch.empty(batch, seq_len, n_heads, head_dim, dtype=q_raw.dtype, device=x.device)
    k = torch.empty(batch, seq_len, head_dim, dtype=k_raw.dtype, device=x.device)
    w = torch.empty(batch, seq_len, n_weights, dtype=w_raw.dtype, device=x.device)
    inv_freq = _inverse_frequencies(indexer.rope_dims, indexer.rope_base, x.device)
    _index_rows_kernel[(batch * seq_len,)](
        q_raw, k_raw, w_raw, positions, inv_freq, indexer.k_norm.weight, indexer.k_norm.bias, q, k, w,
        seq_len, n_weights, indexer.k_norm.eps, indexer.weight_scale,
        q_raw.stride(0), k_raw.stride(0), w_raw.stride(0),
        N_HEADS=n_heads, HEAD_DIM=head_dim, HALF=indexer.rope_dims // 2,
        WEIGHTS=triton.next_power_of_2(n_weights), num_warps=1,
    )  # fmt: skip
    if indexer.index_sets > 1:
        w = w.view(batch, seq_len, indexer.index_sets, n_heads)
    return q, w, k


def project_index(indexer: nn.Module, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The indexer's q, w, k for the new tokens: `index_projection` where it serves, else indexer.project."""
    if projects_fused(indexer, x):
        return index_projection(indexer, x, positions)
    return indexer.project(x, positions)
