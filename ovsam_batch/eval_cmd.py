"""`ovsam-batch eval`: the paper's metrics of a `label` run against COCO-format ground truth."""

from __future__ import annotations

import click


@click.command("eval")
@click.argument("outputs")
@click.option("--gt", "ground_truth", required=True, help="COCO instances JSON (local path or URL) of the same images.")
@click.option(
    "--split",
    default=None,
    help='Base/novel split: coco | lvis (the built-in open-vocabulary splits) or a JSON file '
    '{"base": [names], "novel": [names]} (local path or URL).',
)
def main(outputs: str, ground_truth: str, split: str | None) -> None:
    """Evaluate the label outputs under OUTPUTS (the --output of `ovsam-batch label`).

    Box-prompted runs: mean mask IoU and recognition accuracy, overall, per class and base/novel with
    --split. Automatic runs: COCO mask AP. Prints a table and writes OUTPUTS/eval.json.

    \b
    Examples:
      ovsam-batch eval demo-box --gt examples/boxes.json
      ovsam-batch eval s3://bucket/labels --gt instances_val2017.json --split coco
    """
    from jobs import eval as evaluation  # torch and pyarrow load only when the command runs

    try:
        config = evaluation.EvalConfig(
            outputs=outputs,
            ground_truth=ground_truth,
            split=evaluation.load_split(split) if split else None,
        )
        report = evaluation.evaluate(config)
        path = evaluation.write_report(report, outputs)
    except evaluation.EvalError as err:
        raise click.ClickException(str(err)) from err
    click.echo(evaluation.format_report(report))
    click.echo(f"wrote {path}")
