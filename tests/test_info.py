"""``mlxgpt info`` and the BLAS preload it reports."""

import os
import sys

import pytest

from mlxgpt.cpu import blas


@pytest.fixture
def info(mlxgpt_process):
    """``mlxgpt info`` in a fresh process (the BLAS preload happens at import)."""

    def run(**env) -> str:
        p = mlxgpt_process("info", env={**os.environ, **env}, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout

    return run


def test_info_names_versions_device_and_blas(info):
    out = info()
    for key in ("mlxgpt", "mlx", "device", "backend", "blas", "model ops"):
        assert any(line.startswith(key + " ") for line in out.splitlines()), out


@pytest.mark.skipif(blas.find_openblas() is None or not sys.platform.startswith("linux"),
                    reason="needs Linux with OpenBLAS installed")
def test_preload_is_used_and_can_be_turned_off(info):
    assert "OpenBLAS" in info() and "preloaded by mlxgpt" in info()
    off = info(MLXGPT_NO_BLAS_PRELOAD="1")
    line = next(line for line in off.splitlines() if line.startswith("blas"))
    assert "reference BLAS" in line and "disabled by MLXGPT_NO_BLAS_PRELOAD" in line
    assert blas.INSTALL_HINT in line
