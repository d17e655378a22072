"""CPU-only speed: the BLAS MLX links, arithmetic-only kernels, weight layouts.

``blas`` must not import mlx (it runs before mlx is first imported); ``parallel`` is imported
beside it, so it imports mlx inside its functions only.
"""
