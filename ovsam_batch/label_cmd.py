"""``ovsam-batch label``: parse options into a `LabelConfig`, run the pipeline, print the summary."""

from __future__ import annotations

import os
import signal

import click

from ovsam.config import AutomaticConfig
from pipelines.config import MODES, ConfigError, LabelConfig, load_runtime_env
from pipelines.storage import STORAGE_ATTEMPTS

# The models a fresh machine can run offline: the small model trained on synthetic shapes when the package
# ships it, else the seeded random-weight preset (every output made with it is marked untrained).
TRAINED_OFFLINE_PRESET, UNTRAINED_OFFLINE_PRESET = "shapes", "tiny"


_AUTO = AutomaticConfig()  # the defaults of automatic mode's options
_EXIT_INTERRUPTED = 128 + signal.SIGINT  # the shells' exit code for a process stopped by SIGINT


def _default_preset() -> str:
    import ovsam

    return TRAINED_OFFLINE_PRESET if TRAINED_OFFLINE_PRESET in ovsam.preset_names() else UNTRAINED_OFFLINE_PRESET


def _parse_weights(ctx, param, values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for value in values:
        part, sep, source = value.partition("=")
        if not sep or not source:
            raise click.BadParameter(f"expected PART=SOURCE (e.g. clip2sam=s3://bucket/clip2sam.pth), got {value!r}")
        pairs.append((part, source))
    return tuple(pairs)


@click.command("label")
@click.argument("input_spec", metavar="INPUT")
@click.option("-o", "--output", required=True,
              help="Output prefix, local or object storage (e.g. s3://bucket/labels/run1). Re-running the same "
                   "command resumes into it.")
@click.option("--mode", type=click.Choice(MODES), default="auto", show_default=True,
              help="auto: find and name every object (point grid). box: one object per box of --prompts.")
@click.option("--prompts", help="Box mode: COCO JSON (images[].file_name + annotations[].bbox) or Parquet "
                                "(columns image, bbox) of [x, y, w, h] boxes per image, e.g. examples/boxes.json.")
@click.option("--vocabulary", help="Class names: coco | lvis | a .txt/.json file | a comma list "
                                   "('cat,dog,traffic light'). Default: the model's own vocabulary.")
@click.option("--preset", default=_default_preset, show_default="shapes if shipped, else tiny",
              help="Model: preset name (coco_rn50x16, lvis_rn50x16, shapes, tiny), a preset .json or a model "
                   "directory (ovsam.save_model / training jobs).")
@click.option("--weights", multiple=True, callback=_parse_weights, metavar="PART=SOURCE",
              help="Override one checkpoint of the model: sam2clip|clip2sam|sam|clip = path, s3://, hf://... "
                   "Repeatable, e.g. --weights clip2sam=s3://models/clip2sam.pth")
@click.option("--coco", is_flag=True, help="Also write OUTPUT/coco.json (COCO instances, loads in pycocotools).")
@click.option("--address", help="Ray cluster to join: 'auto' or 'ray://head:10001'. Default: start a local Ray "
                                "for the run.")
@click.option("--runtime-env", type=click.Path(exists=True, dir_okay=False),
              help="JSON file with a Ray runtime_env for the run's workers, e.g. {\"pip\": [\"ovsam-batch==0.1\"]} "
                   "to install the package on every node of an --address cluster.")
@click.option("--gpus-per-worker", type=float, default=1.0, show_default=True,
              help="GPUs per model worker when the cluster has GPUs (e.g. 0.5 puts two workers on a GPU).")
@click.option("--workers", type=int, help="Model workers. Default: one per GPU (by --gpus-per-worker), else 1.")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Images per model call.")
@click.option("--part-size", type=int, default=5000, show_default=True,
              help="Images per output Parquet part: a writer publishes a part once it holds this many (less than "
                   "a batch more) or 256 MB, e.g. 20000 for fewer, larger files.")
@click.option("--flush-interval", type=float, default=60.0, show_default=True,
              help="Seconds after which each writer publishes what it holds: the most work a kill can lose "
                   "per writer, e.g. 300.")
@click.option("--limit", type=int,
              help="Label at most N images the output does not hold yet (of a folder into a new output: the first "
                   "N listed; otherwise any N), e.g. --limit 10 to try a command.")
@click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL", show_envvar=True,
              help="S3-compatible endpoint (MinIO, Ceph...), e.g. http://127.0.0.1:9000. Credentials come from "
                   "the standard AWS chain (env, ~/.aws, instance role), never from options.")
@click.option("--points-per-side", type=click.IntRange(min=1), default=_AUTO.points_per_side, show_default=True,
              help="Auto mode: the point grid is N×N prompts per image (e.g. 8 for a quick try).")
@click.option("--stability", type=click.FloatRange(0, 1), default=_AUTO.stability, show_default=True,
              help="Auto mode: minimum SAM stability score of a mask (IoU of the mask at logit -1 and +1, on the "
                   "model's 256² logits); lower finds more objects and more fragments.")
@click.option("--min-area", type=click.IntRange(min=1), default=_AUTO.min_area, show_default=True,
              help="Auto mode: minimum mask area in pixels of the image as stored; no written mask is smaller.")
@click.option("--nms-iou", type=click.FloatRange(0, 1, min_open=True), default=_AUTO.nms_iou, show_default=True,
              help="Auto mode: a mask overlapping a better one by more mask IoU than this, or lying inside it "
                   "for more than this share of its area, is dropped as a duplicate or fragment.")
@click.option("--max-background", type=click.FloatRange(0, 1), default=_AUTO.max_background, show_default=True,
              help="Auto mode: drop masks whose probability of being background (no class) is above this.")
@click.option("--max-objects", type=click.IntRange(min=1), default=_AUTO.max_objects, show_default=True,
              help="Auto mode: keep at most this many masks per image, the best first.")
@click.option("--top-k", type=int, default=5, show_default=True, help="Ranked labels kept per object.")
@click.option("--storage-attempts", type=int, default=STORAGE_ATTEMPTS, show_default=True,
              help="Tries per storage request (reads, listings, writes) on throttling, 5xx, resets and timeouts, "
                   "with exponential backoff and jitter; e.g. 20 for a flaky store.")
@click.option("--compile", "compile_encoder", is_flag=True,
              help="Run the image encoder under torch.compile in each model worker: its first batch waits for the "
                   "compilation (about 100 s for the released model on a CPU), later ones embed faster (1.2x on a CPU).")
def label(input_spec: str, output: str, mode: str, prompts: str | None, vocabulary: str | None, preset: str,
          weights: tuple[tuple[str, str], ...], coco: bool, address: str | None, runtime_env: str | None,
          gpus_per_worker: float,
          workers: int | None, batch_size: int, part_size: int,
          flush_interval: float, limit: int | None, endpoint_url: str | None,
          points_per_side: int, stability: float, min_area: int, nms_iou: float, max_background: float,
          max_objects: int, top_k: int, storage_attempts: int, compile_encoder: bool) -> None:
    """Segment and name the objects of every image in INPUT; write Parquet tables (and COCO JSON) to OUTPUT.

    INPUT is a local folder, a file:// or s3:// (any fsspec) prefix with an optional glob, or a manifest
    file listing one image URI per line. Every input ends up labelled or as an error row with a reason; an
    image whose read kept failing transiently is left for the next run (exit code 75, EX_TEMPFAIL).

    \b
    Examples:
      ovsam-batch label examples/images --output demo-output --coco
      ovsam-batch label examples/images -o out --mode box --prompts examples/boxes.json
      ovsam-batch label 's3://bucket/photos/**/*.jpg' -o s3://bucket/labels --address auto
      ovsam-batch label imgs/ -o out --preset lvis_rn50x16 --vocabulary lvis --gpus-per-worker 0.5
      ovsam-batch label manifest.txt -o out --limit 10 --points-per-side 8
    """
    try:
        config = LabelConfig(
            input=input_spec, output=output, mode=mode, prompts=prompts, vocabulary=vocabulary, preset=preset,
            weights=weights, coco=coco, address=address,
            runtime_env=load_runtime_env(runtime_env) if runtime_env else None, gpus_per_worker=gpus_per_worker,
            workers=workers,
            batch_size=batch_size, part_size=part_size, flush_interval=flush_interval,
            limit=limit, endpoint_url=endpoint_url, top_k=top_k, storage_attempts=storage_attempts,
            compile=compile_encoder,
            automatic=AutomaticConfig(points_per_side=points_per_side, stability=stability, min_area=min_area,
                                      nms_iou=nms_iou, max_background=max_background, max_objects=max_objects))
    except ConfigError as err:
        raise click.UsageError(str(err)) from None

    from pipelines.label import INTERRUPTED_MESSAGE, LabelError, run_label  # imports Ray: only once options are valid

    try:
        summary = run_label(config)
    except KeyboardInterrupt:
        click.echo(f"Interrupted: {INTERRUPTED_MESSAGE}.", err=True)
        raise SystemExit(_EXIT_INTERRUPTED) from None
    except LabelError as err:
        raise click.ClickException(str(err)) from None
    except Exception as err:  # noqa: BLE001 - a model error raised inside a Ray worker reaches us wrapped
        if (message := _user_error(err)) is None:
            raise
        raise click.ClickException(message) from None
    _print_summary(summary)
    if summary.run_deferred:
        raise SystemExit(os.EX_TEMPFAIL)  # "try again later": the same command labels the images left over


def _user_error(err: BaseException) -> str | None:
    """The message of the first `ovsam.OVSAMError` in ``err``'s cause chain (Ray wraps worker errors)."""
    import ovsam

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ovsam.OVSAMError):
            return str(err).strip().splitlines()[-1]
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def _print_summary(summary) -> None:
    errors = ", ".join(f"{kind} {count}" for kind, count in sorted(summary.run_errors.items())) or "none"
    lines = [
        f"Labelled {summary.run_images} images in {summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s): "
        f"{summary.run_ok} ok, {sum(summary.run_errors.values())} errors ({errors}), "
        f"{summary.run_annotations} annotations.",
    ]
    if summary.run_deferred:
        lines.append(f"{summary.run_deferred} images not labelled this run, will be retried: transient storage "
                     "faults outlasted the retries; run the same command again to label them.")
    if summary.stale_lease:
        lines.append(f"Took over the output from a run that stopped without releasing it (host "
                     f"{summary.stale_lease.get('host', '?')}, pid {summary.stale_lease.get('pid', '?')}).")
    if summary.skipped_done:
        lines.append(f"Skipped {summary.skipped_done} images already in the output (resumed).")
    if summary.parts_rolled_forward or summary.parts_rolled_back:
        lines.append(f"Recovered from an interrupted run: finished publishing {summary.parts_rolled_forward} "
                     f"committed part(s), removed {summary.parts_rolled_back} unfinished part(s).")
    if summary.ignored_files:
        lines.append(f"Ignored {summary.ignored_files} files without an image suffix in the input folder.")
    if summary.unmatched_prompt_images:
        lines.append(f"Warning: the prompts file names {summary.unmatched_prompt_images} images that are not "
                     "among the inputs.")
    total_ok = summary.total_images.get("ok", 0)
    lines.append(f"Output now holds {sum(summary.total_images.values())} images ({total_ok} ok) and "
                 f"{summary.total_annotations} annotations:")
    lines += [f"  {name:12s} {location}" for name, location in summary.outputs.items()]
    if not summary.model_trained:
        lines.append(f"Note: model {summary.model_name!r} is UNTRAINED (random weights): its masks and labels "
                     "carry no meaning; outputs are marked so.")
    click.echo("\n".join(lines))
