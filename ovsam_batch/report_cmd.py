"""`ovsam-batch report`: one self-contained HTML page about a `label` run."""

from __future__ import annotations

import click

from pipelines.viz.reading import VizError
from pipelines.viz.report import ReportConfig, default_report_file, write_report


@click.command("report")
@click.argument("output")
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False),
              help="Local HTML file to write. Default: OUTPUT-report.html next to a local OUTPUT, else "
                   "NAME-report.html in the current folder (NAME: the output's last path part).")
@click.option("--top", "top_labels", default=25, show_default=True, type=click.IntRange(min=1),
              help="Labels shown as bars; the rest are summed as 'other (long tail)'.")
@click.option("--gallery-labels", default=12, show_default=True, type=click.IntRange(min=1),
              help="Most frequent labels that get a gallery.")
@click.option("--per-label", default=6, show_default=True, type=click.IntRange(min=1),
              help="Sampled objects per label in the gallery.")
@click.option("--seed", default=0, show_default=True, help="Seed of the gallery sample.")
@click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL", show_envvar=True,
              help="S3-compatible endpoint (MinIO, Ceph...) for s3:// outputs and images. Default: AWS.")
def main(output: str, out_file: str | None, top_labels: int, gallery_labels: int, per_label: int, seed: int,
         endpoint_url: str | None) -> None:
    """Write an HTML report of OUTPUT (the --output of `ovsam-batch label`, local or s3://).

    Run summary, label histogram, score and mask-area distributions, a gallery per label, the errors,
    and the metrics of `ovsam-batch eval` when OUTPUT/eval.json exists. The page is one file that
    needs no network: pictures and charts are embedded.

    \b
    Examples:
      ovsam-batch report demo-output --out demo-report.html
      ovsam-batch report s3://bucket/labels --out labels-report.html --top 40
    """
    if out_file is None:
        out_file = default_report_file(output)
    try:
        config = ReportConfig(output=output, out_file=out_file, top_labels=top_labels, gallery_labels=gallery_labels,
                              per_label=per_label, seed=seed, endpoint_url=endpoint_url)
        path = write_report(config)
    except VizError as err:
        raise click.ClickException(str(err)) from err
    except OSError as err:  # the --out file cannot be written
        raise click.ClickException(f"cannot write {out_file}: {err}") from err
    click.echo(f"wrote {path}")
