"""`ovsam-batch train ...`: the Ray Train jobs that retrain OVSAM's two transfer stages."""

from __future__ import annotations

import click

from jobs import clip2sam, sam2clip, teacher


@click.group("train")
def main() -> None:
    """Retrain SAM2CLIP or CLIP2SAM on your data (Ray Train; local or s3:// data and checkpoints)."""


main.add_command(teacher.main)
main.add_command(sam2clip.main)
main.add_command(clip2sam.main)
