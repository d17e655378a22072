"""Shared test setup: import mlxgpt first so the fast BLAS is preloaded before mlx."""

import mlxgpt  # noqa: F401
