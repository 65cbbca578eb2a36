"""One layer's DSA inputs saved from the default model, then timed on each compiled kernel family this CPU runs
(dsarag_kernels/cpu_families.py)."""

import numpy as np
import pytest
import torch

from dsarag.indexer_model.cpu_families import capture, time_families
from dsarag.kernels import cpu_dsa


@pytest.mark.needs_compiler
def test_saved_layer_inputs_time_on_every_kernel_family_here(tmp_path):
    path = tmp_path / "layer.pt"
    capture(np.arange(1000, 1300), length=300, layer=1, topk=96, out=path)
    saved = torch.load(path)
    assert saved["q"].shape == (1, 14, 300 - 96, 64) and saved["k"].shape == (1, 2, 300, 64)
    assert saved["idx_q"].dtype == torch.bfloat16 and saved["topk"] == 96
    threads = torch.get_num_threads()
    try:
        rows = time_families(path, threads=1)
    finally:
        torch.set_num_threads(threads)
    expected = ["AMX"] * cpu_dsa.amx_ready() + ["AVX512-BF16"] * cpu_dsa.avx512_bf16_ready() + ["float32"]
    assert [row["family"] for row in rows] == expected
    assert all(row["select_s"] > 0 and row["attention_s"] > 0 for row in rows)
    assert cpu_dsa.amx_ready is not None and cpu_dsa.amx_ready() == (expected[0] == "AMX")  # restored
