"""``iiot dagster``: the Dagster CLI with the environment of the running `iiot dev` stack."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from iiot_orchestration.cli_common import _settings, friendly_errors


@click.command(
    "dagster",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@friendly_errors
def dagster_command(args: tuple[str, ...]) -> None:
    """Run the Dagster CLI against the running `iiot dev` stack (its env file in IIOT_DATA_DIR).

    Every argument goes to `dagster`, and its exit code is this command's: `iiot dagster
    asset materialize -m iiot_orchestration.definitions --select telemetry_daily`,
    `iiot dagster run list`, `iiot dagster --help`.
    """
    from iiot_orchestration.dev import stack_environment

    env = stack_environment(_settings().data_dir)
    binary = Path(sys.executable).parent / "dagster"
    sys.stdout.flush()
    os.execve(binary, [str(binary), *args], env)  # noqa: S606 - the venv's own dagster
