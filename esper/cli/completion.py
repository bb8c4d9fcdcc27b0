"""`esper completion SHELL`: the completion script of one named shell (Typer's own `--show-completion` takes no
shell: it prints the one it detects, so `--show-completion zsh` printed bash)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer
from typer.completion import Shells, get_completion_script

Shell = Enum("Shell", {s.name: s.value for s in Shells}, type=str)  # type: ignore[misc]


def completion(
    shell: Annotated[Shell, typer.Argument(help="The shell whose completion script to print.")],  # type: ignore[valid-type]
) -> None:
    """Print the completion script for SHELL (bash, zsh, fish, powershell, pwsh): e.g.
    `esper completion zsh > ~/.zfunc/_esper`, or `eval "$(esper completion bash)"` in ~/.bashrc."""
    typer.echo(get_completion_script(prog_name="esper", complete_var="_ESPER_COMPLETE", shell=shell.value))
