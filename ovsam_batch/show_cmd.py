"""`ovsam-batch show`: overlay PNGs and a contact sheet of a `label` run's masks and labels."""

from __future__ import annotations

import click

from pipelines.viz.reading import AnnotationFilter, VizError
from pipelines.viz.show import ShowConfig, show


@click.command("show")
@click.argument("output")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Local folder for the PNGs.")
@click.option("--image", "images", multiple=True,
              help="Image to draw: its image_uri or a unique end of it (file name). Repeatable. Default: a sample.")
@click.option("--sample", default=16, show_default=True, type=click.IntRange(min=1),
              help="Number of images to sample when no --image is given.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sample (same seed, same images).")
@click.option("--label", "labels", multiple=True, help="Draw only annotations with this label. Repeatable.")
@click.option("--min-score", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Draw only annotations with score >= this.")
@click.option("--max-score", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Draw only annotations with score <= this.")
@click.option("--columns", default=4, show_default=True, type=click.IntRange(min=1), help="Contact sheet columns.")
@click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL", show_envvar=True,
              help="S3-compatible endpoint (MinIO, Ceph...) for s3:// outputs and images. Default: AWS.")
def main(output: str, out_dir: str, images: tuple[str, ...], sample: int, seed: int, labels: tuple[str, ...],
         min_score: float, max_score: float, columns: int, endpoint_url: str | None) -> None:
    """Draw the masks, labels and scores of OUTPUT (the --output of `ovsam-batch label`, local or s3://).

    Writes OUT/overlays/NAME_HASH.png per image (each mask in its own colour, outlined, with its label
    and score) and OUT/contact_sheet.png with all of them. With --label/--min-score/--max-score, only
    matching annotations are drawn and the sample is taken among images that have one.

    \b
    Examples:
      ovsam-batch show demo-output --out demo-output-show
      ovsam-batch show demo-output --out demo-show --image shapes_000003.jpg --label hexagon --min-score 0.2
    """
    try:
        config = ShowConfig(
            output=output, out_dir=out_dir, images=images, sample=sample, seed=seed,
            annotation_filter=AnnotationFilter(labels=labels, min_score=min_score, max_score=max_score),
            columns=columns, endpoint_url=endpoint_url,
        )
        result = show(config)
    except VizError as err:
        raise click.ClickException(str(err)) from err
    except OSError as err:  # the --out folder cannot be written
        raise click.ClickException(f"cannot write under {out_dir}: {err}") from err
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {len(result.overlays)} overlays under {result.sheet.parent / 'overlays'} and {result.sheet}")
