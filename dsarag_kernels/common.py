"""What every kernel shares: the tensor-core dot, with the interpreter's bf16 bug worked around, and where a
Triton kernel may take a call."""

import os

import triton
import triton.language as tl
from torch import Tensor

from dsarag.kernels.torch_dsa import wants_gradient

# Triton's CPU interpreter (3.9) multiplies bf16 operands of tl.dot as raw integers; upcasting to fp32 there
# keeps the CPU tests meaningful. Compiled kernels keep bf16 / fp8 operands for the tensor cores.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


def runs_in_triton(*tensors: Tensor) -> bool:
    """Whether a Triton kernel with no backward may take a call on these tensors: on a GPU (or under the
    interpreter), no gradient wanted."""
    return all(t.is_cuda or INTERPRETED for t in tensors) and not wants_gradient(*tensors)
