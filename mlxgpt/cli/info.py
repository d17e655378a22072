"""``mlxgpt info``: versions, device and the BLAS MLX's CPU matmul uses; ``--calibrate``
times the installed BLAS libraries (the one probe mlxgpt never runs by itself)."""

import platform

import click


@click.command()
@click.option("--calibrate", is_flag=True,
              help="Time the installed BLAS libraries against each other now (a few seconds, "
                   "in processes of their own) and keep the faster for later runs.")
def info(calibrate: bool) -> None:
    """Show MLX version, device, backend and BLAS."""
    import mlx.core as mx

    from mlxgpt.core.backend import default_dtype, kernels_report
    from mlxgpt.cpu import blas, parallel

    if calibrate:
        click.echo(f"calibrated  {blas.calibrate()}")

    device = mx.default_device()
    backend = "metal" if mx.metal.is_available() else ("cuda" if _cuda() else "cpu")
    click.echo(f"mlxgpt      {_version()}")
    click.echo(f"mlx         {mx.__version__}")
    system = f"{platform.system()} {platform.machine()}"
    click.echo(f"python      {platform.python_version()} ({system})")
    click.echo(f"device      {device}")
    click.echo(f"backend     {backend}")
    click.echo(f"dtype       {str(default_dtype()).removeprefix('mlx.core.')} (default for models)")
    click.echo(f"blas        {blas.blas_in_use()}")
    blas_kernels = blas.kernels_note()
    if blas_kernels:
        click.echo(f"kernels     {blas_kernels}")
    click.echo(f"model ops   {kernels_report()}")
    if device == mx.cpu:
        from mlxgpt.core.config import GPTConfig
        from mlxgpt.cpu.layout import layout_report

        click.echo(f"layout      {layout_report(GPTConfig())}")
        streams = parallel.stream_count()
        click.echo(f"training    {streams} CPU stream{'s' * (streams > 1)} "
                   f"({'rows of each batch split over them, ' if streams > 1 else ''}"
                   f"{parallel.STREAMS_ENV} overrides)")
        from mlxgpt.training.native_pass import native_report

        click.echo(f"train pass  {native_report()}")


def _cuda() -> bool:
    import mlx.core as mx

    try:
        return bool(mx.cuda.is_available())
    except AttributeError:
        return False


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlxgpt")
    except PackageNotFoundError:
        return "(source)"
