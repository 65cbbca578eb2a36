"""Every Triton kernel compiles for an H100 (sm_90) with the ptxas that ships with Triton: no GPU needed.

CI runs the kernels' logic in the interpreter, which accepts programs the compiler rejects (types, layouts,
shared memory); this compiles each one at the launch its wrapper uses (hopper_launches.py), so such an error
shows here and not first on a lent GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
from hopper_launches import LAUNCHES

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = [
    pytest.mark.slow,  # a few seconds a kernel on two cores
    pytest.mark.skipif(
        not (PTXAS.exists() or os.environ.get("TRITON_PTXAS_PATH")),
        reason=f"no ptxas in this Triton ({PTXAS})",
    ),
]


@pytest.fixture(scope="module")
def compiled() -> dict:
    """Each launch's result, compiled in one process without the interpreter."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("hopper_launches.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("launch", LAUNCHES)
def test_kernel_compiles_for_hopper(compiled, launch):
    assert compiled[launch] == "ok", compiled[launch]
