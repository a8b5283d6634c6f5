"""CUDA quant kernels vs CPU kernels vs the gguf reference (needs an NVIDIA GPU; skipped elsewhere).

The same checks run without pytest on the GPU machine through tools/gpu_check.sh.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def cuda_lib(tmp_path_factory):
    from spark_setup.engine import _lib
    from spark_setup.engine.build import build_engine
    from spark_setup.settings import load_settings

    prefix = tmp_path_factory.mktemp("cuda-engine")
    res = build_engine(load_settings({"prefix": prefix}, env={}), arch="auto", progress=False)
    if res.arch == "cpu":
        pytest.skip(f"no CUDA build possible here: {res.note}")
    return gpu_check.bind(_lib.load(res.lib_path))


@pytest.mark.gpu
@pytest.mark.parametrize("type_name", list(gpu_check.TYPES))
def test_cuda_kernels_match_cpu_and_gguf(cuda_lib, type_name):
    assert gpu_check.check_type(cuda_lib, type_name, have_gguf=True) == []


@pytest.mark.gpu
@pytest.mark.parametrize("type_name", list(gpu_check.MM_COLS))
def test_cuda_batched_product_matches_float64_and_cpu(cuda_lib, type_name):
    """The prefill's tensor-core GEMM (cuda_mm6 through ds4_matmul), dense and expert mode."""
    assert gpu_check.check_matmul(cuda_lib, type_name) == []
