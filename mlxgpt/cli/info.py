"""``mlxgpt info``: versions, device and the device's backend record (dtype, BLAS, kernels,
layout, training streams and pass); ``--calibrate`` measures again what is kept for the machine:
the installed BLAS libraries against each other (the one probe mlxgpt never runs by itself) and
quantized against float32 matmuls."""

import platform

import click


@click.command()
@click.option("--calibrate", is_flag=True,
              help="Time the installed BLAS libraries against each other now (a few seconds, "
                   "in processes of their own), and quantized against float32 matmuls, and "
                   "keep the answers for later runs.")
def info(calibrate: bool) -> None:
    """Show MLX version, device, backend and BLAS."""
    import mlx.core as mx

    from mlxgpt.core.backend import backend, calibrate_quantized
    from mlxgpt.cpu import blas

    record = backend()
    if calibrate:
        click.echo(f"calibrated  {blas.calibrate()}")
        if record.on_cpu:
            click.echo(f"calibrated  {calibrate_quantized()}")

    kind = "metal" if mx.metal.is_available() else ("cuda" if _cuda() else "cpu")
    lines = [("mlxgpt", _version()), ("mlx", mx.__version__),
             ("python", f"{platform.python_version()} ({platform.system()} {platform.machine()})"),
             ("device", str(record.device)), ("backend", kind), *record.describe()]
    for label, text in lines:
        click.echo(f"{label:<12}{text}")


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
