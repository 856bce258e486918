"""`ovsam-batch train ...`: the Ray Train jobs that retrain OVSAM's two transfer stages."""

from __future__ import annotations

import importlib

import click

# Subcommand name -> module whose `main` implements it. Imported on use: the jobs pull in torch and Ray
# Train, which `ovsam-batch --help` should not wait for.
JOBS = {"precompute-teacher": "jobs.teacher", "sam2clip": "jobs.sam2clip", "clip2sam": "jobs.clip2sam"}


class _JobsGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(JOBS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return importlib.import_module(JOBS[name]).main if name in JOBS else None


@click.group("train", cls=_JobsGroup)
def main() -> None:
    """Retrain SAM2CLIP or CLIP2SAM on your data (Ray Train; local or s3:// data and checkpoints)."""
