"""RMSNorm and RoPE on a GPU, one Triton launch each, for the Triton backend.

In PyTorch each is six to eight elementwise launches, and a decode step replayed from a CUDA graph is bound by
its launches: two norms and two rotations a layer are about half of them. The references are `rms_norm` and
`apply_rope` in indexer_model/model.py, which run wherever these do not (gradients wanted, CPU tensors outside
the interpreter); the rounding is theirs: the normed row is rounded to x's dtype before the weight multiplies it,
and the rotation runs in float32.
"""

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsarag.kernels.common import runs_in_triton


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, dim, eps, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < dim, other=0.0).to(tl.float32)
    normed = x * (1.0 / tl.sqrt(tl.sum(x * x, 0) / dim + eps))
    weight = tl.load(weight_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=cols < dim)


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, n_heads,
    stride_xb, stride_xt, stride_xh, stride_ct,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One token (row = b * n_rows + t), all its heads: x * cos + rotate_half(x) * sin in float32."""
    row = tl.program_id(0)
    batch, t = row // n_rows, row % n_rows
    heads = tl.arange(0, HEADS)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    half = HEAD_DIM // 2
    partner = tl.where(dims < half, dims + half, dims - half)
    x_row = x_ptr + batch * stride_xb + t * stride_xt + heads * stride_xh
    mask = heads < n_heads
    x = tl.load(x_row + dims, mask=mask, other=0.0).to(tl.float32)
    other = tl.load(x_row + partner, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + t * stride_ct + dims)
    sin = tl.load(sin_ptr + t * stride_ct + dims)
    rotated = x * cos + tl.where(dims < half, -other, other) * sin
    tl.store(
        out_ptr + (row * n_heads + heads) * HEAD_DIM + dims, rotated.to(out_ptr.dtype.element_ty), mask=mask
    )


def rows_rms_norm(fallback: Callable) -> Callable:
    """The RMSNorm (x, weight, eps) -> normed x: one launch on a GPU, else `fallback`."""

    def norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        dim = x.shape[-1]
        if not runs_in_triton(x, weight) or x.stride(-1) != 1 or not weight.is_contiguous():
            return fallback(x, weight, eps)
        rows = x.reshape(-1, dim)
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        block = triton.next_power_of_2(dim)
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight, out, dim, eps, rows.stride(0), BLOCK=block, num_warps=min(8, max(1, block // 256))
        )
        return out

    return norm


def rows_rope(fallback: Callable) -> Callable:
    """RoPE (x (B, T, H, D), (cos, sin) (T, D) float32) -> rotated x, contiguous: one launch on a GPU (x may be
    a view into a product's output), else `fallback`."""

    def rope(x: Tensor, cos_sin: tuple[Tensor, Tensor]) -> Tensor:
        cos, sin = cos_sin
        batch, n_rows, n_heads, head_dim = x.shape
        if (
            not runs_in_triton(x, cos, sin)
            or cos.dtype != torch.float32
            or x.stride(3) != 1
            or head_dim & (head_dim - 1)
            or cos.stride() != sin.stride()
            or cos.stride(1) != 1
        ):
            return fallback(x, cos_sin)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _rope_kernel[(batch * n_rows,)](
            x, cos, sin, out, n_rows, n_heads, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
            HEADS=triton.next_power_of_2(n_heads), HEAD_DIM=head_dim, num_warps=2,
        )  # fmt: skip
        return out

    return rope
