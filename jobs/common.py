"""Plumbing shared by the Ray Train jobs: run configuration, storage, checkpoints, schedule, fault hook.

A checkpoint of either job is a model directory as written by `ovsam.save_model` (so `ovsam.load_model`,
`ovsam-batch label --preset DIR` and `--weights ROLE=DIR/FILE` read it as they read the release), plus
`TRAIN_STATE_FILE` with what resuming needs (optimiser, scheduler, next epoch).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import fsspec
import pyarrow.fs
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import ovsam

TRAIN_STATE_FILE = "train_state.pt"
# The release's schedule: 12 epochs with the learning rate divided by 10 after epochs 8 and 11. Other
# epoch counts keep the same fractions.
RELEASE_EPOCHS = 12
RELEASE_MILESTONES = (8, 11)
LR_DECAY = 0.1
# Checkpoints kept in storage: the latest to resume from and one before it in case the latest is partial.
CHECKPOINTS_KEPT = 2
# Worker errors carry whole tracebacks; the command shows their start (the worker logs keep the rest).
_MAX_ERROR_CHARS = 2000


class JobError(ValueError):
    """A training job cannot start or finish; the message says why in plain words."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How a job runs on Ray, shared by both jobs.

    ``storage``: where checkpoints and results go (local path or ``s3://bucket/prefix``); ``name``: the run's
    folder under it (a re-run with the same name resumes); ``export``: local directory that receives the
    final model directory (optional); ``epochs``, ``batch_size`` (images per worker per step), ``lr``,
    ``weight_decay``: the optimisation; ``num_workers``/``use_gpu``/``cpus_per_worker``: the Ray Train
    scaling (a CPU worker runs torch on ``cpus_per_worker`` threads);
    ``max_failures``: worker-group restarts from the last checkpoint before giving up; ``address``: Ray
    cluster to join (None = the one already initialised or a new local one); ``max_steps``: stop each epoch
    after this many steps (for smoke runs; None = whole epoch).
    """

    storage: str
    name: str
    epochs: int = RELEASE_EPOCHS
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.05
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 3
    seed: int = 0
    export: str | None = None
    address: str | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        for field in ("epochs", "batch_size", "num_workers", "cpus_per_worker"):
            if getattr(self, field) < 1:
                raise JobError(f"{field} must be at least 1, got {getattr(self, field)}")
        if self.lr <= 0:
            raise JobError(f"lr must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise JobError(f"max_steps must be at least 1, got {self.max_steps}")


def milestones(epochs: int) -> list[int]:
    """Epochs after which the learning rate drops, the release's 8/12 and 11/12 scaled to ``epochs``."""
    scaled = {max(1, round(epochs * m / RELEASE_EPOCHS)) for m in RELEASE_MILESTONES}
    return sorted(m for m in scaled if m < epochs)


def make_optimiser(params: list[torch.nn.Parameter], settings: RunSettings) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (lr, wd of the release) and its per-epoch MultiStep schedule."""
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones(settings.epochs), gamma=LR_DECAY)
    return optimiser, scheduler


def storage_filesystem(storage: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray Train's (storage_path, storage_filesystem) for a local path or an fsspec URL.

    Remote storage goes through fsspec (s3fs honours ``AWS_ENDPOINT_URL`` and the usual credential chain,
    which pyarrow's own S3 client does not).
    """
    if "://" not in storage or storage.startswith("file://"):
        return os.path.abspath(storage.removeprefix("file://")), None
    fs, path = fsspec.core.url_to_fs(storage)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def check_storage_reachable(storage: str) -> None:
    """Fail early, in plain words, when the storage location cannot be written."""
    if "://" not in storage:
        return
    try:
        fs, path = fsspec.core.url_to_fs(storage)
        fs.ls(path.split("/", 1)[0])
    except Exception as err:  # credential, DNS, HTTP and permission errors come in many library types
        raise JobError(f"storage {storage} is not reachable: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err


def save_checkpoint(model: ovsam.OVSAM, optimiser: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, next_epoch: int, directory: str) -> None:
    """Write a resumable checkpoint: a model directory plus the training state."""
    ovsam.save_model(model, directory)
    torch.save({"optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(), "next_epoch": next_epoch},
               os.path.join(directory, TRAIN_STATE_FILE))


def load_train_state(directory: str) -> dict:
    """The training state of a checkpoint, read without running code from the file."""
    return torch.load(os.path.join(directory, TRAIN_STATE_FILE), map_location="cpu", weights_only=True)


def start_worker(spec: str, settings: RunSettings, job: str) -> tuple[torch.device, ovsam.OVSAM, dict | None]:
    """Seed torch with ``settings.seed`` and return what a worker starts from: its device; the model it trains,
    on the CPU, from Ray Train's latest checkpoint when the run resumes (after a worker failure or a re-run),
    else from `spec` and named by `trained_identity`; and that checkpoint's training state (None when new)."""
    torch.manual_seed(settings.seed)
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        model = ovsam.load_model(spec, device="cpu")
        model.config = trained_identity(model.config, settings.name, job)
        return device, model, None
    with checkpoint.as_directory() as directory:
        return device, ovsam.load_model(directory, device="cpu"), load_train_state(directory)


def trained_identity(parent: ovsam.OVSAMConfig, name: str, job: str) -> ovsam.OVSAMConfig:
    """The config of a model that ``job`` (e.g. ``"clip2sam"``) trains from ``parent`` in the run ``name``: named
    after the run, and saying what it came from (what exported configs, ``label``'s run.json and outputs show)."""
    return dataclasses.replace(parent, name=name, description=f"{name} (fine-tuned from {parent.name} by {job})")


def autocast(device: torch.device) -> torch.autocast:
    """The forward's precision: bf16 autocast on CUDA (weights, gradients and optimiser state stay float32, and
    bf16's float32 range needs no loss scaling); float32 elsewhere, since CPUs without bf16 instructions run bf16
    convolutions and matrix products emulated, many times slower than float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_only(model: torch.nn.Module, modules: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """Make ``modules`` the trained part of ``model`` and return their parameters.

    Everything else is frozen *and* left in eval mode: CLIP's ResNet has BatchNorm, whose running
    statistics would otherwise drift with every batch although its weights are frozen (mmdet's
    ``norm_eval``).
    """
    model.eval().requires_grad_(False)
    for module in modules:
        module.train().requires_grad_(True)
    return [p for module in modules for p in module.parameters()]


def worker_loader(dataset: torch.utils.data.Dataset, settings: RunSettings, num_workers: int,
                  collate_fn: Callable | None = None) -> tuple[torch.utils.data.DistributedSampler, torch.utils.data.DataLoader]:
    """This worker's shard of ``dataset`` (shuffled by seed; call ``sampler.set_epoch`` each epoch) and its loader
    of ``settings.batch_size`` items."""
    context = ray.train.get_context()
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=context.get_world_size(),
                                                  rank=context.get_world_rank(), shuffle=True, seed=settings.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler,
                                         num_workers=num_workers, collate_fn=collate_fn)
    return sampler, loader


def restore_optimiser(state: dict | None, optimiser: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Load the optimiser and schedule of a resumed run; return the epoch to start from."""
    if state is None:
        return 0
    optimiser.load_state_dict(state["optimiser"])
    scheduler.load_state_dict(state["scheduler"])
    return state["next_epoch"]


def finish_epoch(sums: torch.Tensor, optimiser: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """End an epoch: step the schedule, sum this worker's metric ``sums`` over all workers (in place) and
    return the learning rate the epoch ran at."""
    lr = optimiser.param_groups[0]["lr"]
    scheduler.step()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    return lr


def report_epoch(metrics: dict, model: ovsam.OVSAM, optimiser: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, next_epoch: int) -> None:
    """Report one epoch's metrics from every worker; rank 0 attaches the checkpoint."""
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(model, optimiser, scheduler, next_epoch, directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    else:
        ray.train.report(metrics)


def run(loop: Callable[[dict], None], loop_config: dict, settings: RunSettings) -> ray.train.Result:
    """Run ``loop`` on ``settings.num_workers`` Ray Train workers and return the result.

    A re-run with the same storage and name resumes from the latest checkpoint; after the run, the final
    model directory is copied to ``settings.export`` when given.
    """
    check_storage_reachable(settings.storage)
    if settings.address is not None or not ray.is_initialized():
        ray.init(address=settings.address, ignore_reinit_error=True)
    storage_path, filesystem = storage_filesystem(settings.storage)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                     resources_per_worker={"CPU": settings.cpus_per_worker}),
        run_config=RunConfig(
            name=settings.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise JobError(f"training failed after {settings.max_failures} restarts: {str(err)[:_MAX_ERROR_CHARS]}") from err
    if settings.export is not None and result.checkpoint is not None:
        export_model(result.checkpoint, settings.export)
    return result


def export_model(checkpoint: ray.train.Checkpoint, directory: str) -> None:
    """Copy the model directory of ``checkpoint`` (without the training state) to ``directory``."""
    with checkpoint.as_directory() as source:
        target = pathlib.Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        for path in pathlib.Path(source).iterdir():
            if path.name != TRAIN_STATE_FILE and path.is_file():
                shutil.copy2(path, target / path.name)


def echo_result(result: ray.train.Result, settings: RunSettings) -> None:
    """Tell the user where a finished run left its metrics, checkpoint and exported model."""
    import click

    click.echo(f"final metrics: {result.metrics}")
    click.echo(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    if settings.export:
        click.echo(f"model directory: {settings.export}")


def run_options(command: Callable) -> Callable:
    """The click options of `RunSettings`, shared by both training commands (the command gets ``settings``)."""
    import functools

    import click

    options = [
        click.option("--storage", required=True, help="Checkpoints and results: local path or s3://bucket/prefix."),
        click.option("--name", required=True, help="Run name (folder under --storage); re-running the same name resumes."),
        click.option("--export", default=None, type=click.Path(file_okay=False),
                     help="Local directory that receives the final model directory (load it with --preset DIR)."),
        click.option("--epochs", default=RELEASE_EPOCHS, show_default=True, type=click.IntRange(min=1),
                     help="Passes over the data; the learning rate drops x0.1 after 8/12 and 11/12 of them."),
        click.option("--batch-size", default=2, show_default=True, type=click.IntRange(min=1), help="Images per worker per step."),
        click.option("--lr", default=1e-4, show_default=True, type=float, help="AdamW learning rate (the release's 1e-4)."),
        click.option("--weight-decay", default=0.05, show_default=True, type=float,
                     help="AdamW weight decay (the release's 0.05)."),
        click.option("--num-workers", default=1, show_default=True, type=click.IntRange(min=1), help="Ray Train workers."),
        click.option("--gpu/--cpu", "use_gpu", default=False, show_default=True, help="One GPU per worker (NCCL) or CPU (gloo)."),
        click.option("--cpus-per-worker", default=1, show_default=True, type=click.IntRange(min=1),
                     help="CPU slots (and torch threads) per worker."),
        click.option("--max-failures", default=3, show_default=True, type=click.IntRange(min=0),
                     help="Restarts from the last checkpoint after a worker dies."),
        click.option("--seed", default=0, show_default=True, type=int,
                     help="Seed of the data order and of newly initialised weights (same seed, same run)."),
        click.option("--max-steps", default=None, type=click.IntRange(min=1), help="Stop each epoch after this many steps."),
        click.option("--address", default=None, help="Ray cluster address (default: local Ray)."),
    ]
    names = ("storage", "name", "export", "epochs", "batch_size", "lr", "weight_decay", "num_workers", "use_gpu",
             "cpus_per_worker", "max_failures", "seed", "max_steps", "address")

    @functools.wraps(command)
    def wrapper(**kwargs):
        settings = RunSettings(**{name: kwargs.pop(name) for name in names})
        return command(settings=settings, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
