"""What every kernel shares: the tensor-core dot, with the interpreter's bf16 bug worked around."""

import os

import triton
import triton.language as tl

# Triton's CPU interpreter (3.9) multiplies bf16 operands of tl.dot as raw integers; upcasting to fp32 there
# keeps the CPU tests meaningful. Compiled kernels keep bf16 / fp8 operands for the tensor cores.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)
