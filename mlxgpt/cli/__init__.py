"""The ``mlxgpt`` command: a thin click layer over the library.

Subcommands live in their own modules and are imported only when run, so ``mlxgpt chat``
does not pay for importing the training code. Library errors (:class:`MlxgptError`) become one
line on stderr and exit status 1.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

import mlxgpt  # noqa: F401  (preloads the fast BLAS before mlx is imported)
from mlxgpt.cpu import blas
from mlxgpt.errors import MlxgptError

# command name -> "module:function" under mlxgpt.cli
COMMANDS = {
    "info": "info:info",
    "fetch": "fetch:fetch",
    "convert": "convert:convert",
    "export": "convert:export",
    "generate": "generate:generate",
    "cache-prompt": "cache_prompt:cache_prompt",
    "chat": "chat:chat",
    "pretrain": "pretrain:pretrain",
    "tokenizer": "tokenizer:tokenizer",
    "finetune": "finetune:finetune",
    "fuse": "finetune:fuse",
    "eval": "finetune:evaluate",
    "classify": "classify:classify",
    "serve": "serve:serve",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n, t in COMMANDS.items() if _module_exists(t.split(":")[0])]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None or not _module_exists(target.split(":")[0]):
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(f"mlxgpt.cli.{module}"), attr)

    def invoke(self, ctx: click.Context):
        try:
            if blas.config_error:
                raise MlxgptError(blas.config_error)
            return super().invoke(ctx)
        except MlxgptError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(f"mlxgpt.cli.{module}") is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxgpt")
def main() -> None:
    """Run, fine-tune and train GPT models (GPT-2 and Llama families) on MLX."""
