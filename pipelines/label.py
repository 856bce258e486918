"""The labelling run: list → read + decode (CPU) → model actor pool → write parts, streamed by Ray Data.

`run_label` is what ``ovsam-batch label`` calls. It resumes by construction: images with a committed
images row are skipped, and an interrupted write is rolled back before the run starts (see `output`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import math
import sys
import time

import ray
import tqdm

from pipelines.config import LabelConfig
from pipelines.decode import ReadAndDecode
from pipelines.output import (PART_MAX_BYTES, Lease, OutputError, OutputStore, PartLimits, PartWriter, SendToWriter,
                              WriteFailed)
from pipelines.predict import CrashLedger, LabelImages, ShippedModel, ship_model
from pipelines.prompts import load_box_prompts
from ovsam.redaction import redact_uri
from pipelines.inputs import InputError, InputSource, InputTally, describe_input, shuffle_partitions, work_dataset
from pipelines.storage import RETRY_HINT, error_reason, is_transient
from schemas.tables import ANNOTATIONS_DIR, COCO_DIR, IMAGES_DIR, RUN_FILE, SCHEMA_VERSION

# Settings that change what a label means: a re-run into an output written with other values would mix
# two kinds of labels in one table, so it is refused.
_LABEL_SETTINGS = ("mode", "preset", "weights", "vocabulary", "prompts", "top_k")
_AUTOMATIC_SETTINGS = ("automatic",)  # the filters of automatic mode: compared only in that mode
# Model actors that one part writer serves: a writer compresses and uploads a few hundred images/s of
# box-mode rows (measured: benchmarks/bench_scale.py), more than four GPU actors make.
_MODEL_ACTORS_PER_WRITER = 4
# Progress updates at most this often (seconds) when stderr is a log file rather than a terminal.
_LOG_PROGRESS_INTERVAL_S = 30.0


# run.json's reason for a run stopped by Ctrl-C (SIGINT).
INTERRUPTED_MESSAGE = ("stopped by the user (Ctrl-C / SIGINT); what was committed stays, and the same command "
                       "resumes from it")


# Ray turns token authentication on by itself for a cluster that ray.init starts (and `ray start --head` when
# ~/.ray/auth_token exists), but never for a process joining one by an explicit address: it must be told.
_TOKEN_SOURCES = "(the RAY_AUTH_TOKEN environment variable, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)"
_AUTHENTICATION_MESSAGE = ("the Ray cluster at {} asks for token authentication: set RAY_AUTH_MODE=token and give "
                           "the cluster's token " + _TOKEN_SOURCES)
_CONNECTION_MESSAGE = ("could not join the Ray cluster at {} ({}): check the address and that the cluster is up; a "
                       "cluster with token authentication refuses a process without its token, which needs "
                       "RAY_AUTH_MODE=token and the token " + _TOKEN_SOURCES)


class LabelError(Exception):
    """The run cannot start or cannot go on; the message says why in a user's words."""


@dataclasses.dataclass
class LabelSummary:
    """What a run did. ``run_*`` counts cover this run; ``total_*`` the whole output after it."""

    listed: int
    skipped_done: int
    ignored_files: int
    unmatched_prompt_images: int
    parts_rolled_forward: int  # committed parts an interrupted run had not finished publishing
    parts_rolled_back: int  # uncommitted parts an interrupted run left, removed
    stale_lease: dict | None  # the lease of a run that died holding the output, taken over (see `Lease`)
    run_images: int
    run_ok: int
    run_errors: collections.Counter
    run_annotations: int
    run_deferred: int  # images left without a row: a transient storage fault outlasted the retries
    seconds: float
    total_images: collections.Counter
    total_annotations: int
    model_name: str
    model_trained: bool
    outputs: dict[str, str]

    @property
    def images_per_second(self) -> float:
        return self.run_images / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        values["run_errors"], values["total_images"] = dict(self.run_errors), dict(self.total_images)
        values["images_per_second"] = round(self.images_per_second, 3)
        return values


@dataclasses.dataclass(frozen=True)
class _ModelInfo:
    name: str
    trained: bool
    description: str
    image_size: int  # side S of the model input: the decode stage resizes images for it


def run_label(config: LabelConfig, show_progress: bool = True) -> LabelSummary:
    """Label ``config.input`` into ``config.output``; joins or starts Ray as ``config.address`` says.

    Raises `LabelError` with a message for the user: bad model, vocabulary, prompts or output, another run
    holding the output, or a storage fault that outlasted the retries (run.json then says ``failed``).
    """
    started = time.monotonic()
    started_at = _now()
    model, vocabulary, shipped = _resolve_model(config)
    boxes_by_name = _load_prompts(config)
    try:
        store = OutputStore(config.output, config.endpoint_url, config.storage_attempts)
        lease = Lease(store)
        stale_lease = lease.acquire()  # the first write: a missing bucket or a read-only output ends the run here
    except OutputError as err:
        raise LabelError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - unreachable store, no credentials, denied: one sentence
        raise LabelError(_output_problem(config, err)) from None
    try:
        return _run_holding_lease(config, show_progress, store, model, vocabulary, shipped, boxes_by_name, started,
                                  started_at, stale_lease)
    finally:
        try:
            lease.release()
        except Exception:  # noqa: BLE001 - an unreleased lease expires by itself (or is seen as a dead run's)
            pass


def _run_holding_lease(config: LabelConfig, show_progress: bool, store: OutputStore, model: _ModelInfo, vocabulary,
                       shipped: ShippedModel, boxes_by_name, started: float, started_at: str,
                       stale_lease: dict | None) -> LabelSummary:
    try:
        _check_same_settings(store, config)
        recovery = store.recover()
        done_parts = store.committed_parts()
    except OutputError as err:
        raise LabelError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - as above
        raise LabelError(_output_problem(config, err)) from None
    try:
        source = describe_input(config.input, config.endpoint_url, config.storage_attempts)
    except InputError as err:
        raise LabelError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - as above, for the input
        raise LabelError(f"cannot list the input {redact_uri(config.input)}: {error_reason(err)}"
                         + (RETRY_HINT if is_transient(err) else "")) from None
    _check_box_source(config, source)

    metadata = {"model": model.name, "model_trained": model.trained, "vocabulary": vocabulary.name,
                "mode": config.mode}
    record = {"status": "running", "started_at": started_at, "schema_version": SCHEMA_VERSION,
              "config": config.public_dict(), "model": dataclasses.asdict(model),
              "vocabulary": {"name": vocabulary.name, "names": list(vocabulary.names)}}
    try:
        store.write_run_record(record)
        counts, inputs = _label_inputs(config, show_progress, vocabulary, shipped, model.image_size, source,
                                       done_parts, boxes_by_name, metadata)
        if not inputs.get("listed"):
            raise InputError(f"no images found in {redact_uri(config.input)}")
        total_images, total_annotations = store.status_counts()
        outputs = {"images": store.url(IMAGES_DIR), "annotations": store.url(ANNOTATIONS_DIR),
                   "run": store.url(RUN_FILE)}
        if config.coco:
            info = {"description": f"ovsam-batch labels, model {model.name}"
                                   + ("" if model.trained else " (UNTRAINED: random weights, labels carry no meaning)"),
                    "date_created": _now(), "schema_version": SCHEMA_VERSION}
            written = store.write_coco(list(vocabulary.names), info)
            outputs["coco"] = store.url(written[0] if len(written) == 1 else COCO_DIR)
    except KeyboardInterrupt:  # Ctrl-C (SIGINT): the writers published what they held (see `_label_inputs`)
        _record_end(store, record, "interrupted", INTERRUPTED_MESSAGE)
        raise
    except LabelError as err:  # e.g. the cluster refused to be joined
        _record_end(store, record, "failed", str(err))
        raise
    except Exception as err:  # noqa: BLE001 - a storage fault that outlasted the retries, here or in a worker
        message = _failure_message(config, err)
        if message is None:
            raise
        _record_end(store, record, "failed", message)
        raise LabelError(message) from None
    unmatched = len(boxes_by_name) - inputs["prompts_matched"] if boxes_by_name is not None else 0
    summary = LabelSummary(
        listed=inputs.get("listed", 0), skipped_done=inputs.get("skipped_done", 0),
        ignored_files=inputs.get("ignored", 0), unmatched_prompt_images=unmatched,
        parts_rolled_forward=recovery.rolled_forward, parts_rolled_back=recovery.rolled_back,
        stale_lease=stale_lease, run_images=counts.ok + sum(counts.errors.values()),
        run_ok=counts.ok, run_errors=counts.errors, run_annotations=counts.annotations, run_deferred=counts.deferred,
        seconds=time.monotonic() - started, total_images=total_images, total_annotations=total_annotations,
        model_name=model.name, model_trained=model.trained, outputs={k: redact_uri(v) for k, v in outputs.items()})
    status = "incomplete" if counts.deferred else "complete"
    try:
        store.write_run_record({**record, "status": status, "finished_at": _now(), "summary": summary.as_dict()})
    except Exception as err:  # noqa: BLE001 - the labels are committed; only the record could not be written
        raise LabelError(_failure_message(config, err) or f"could not write {store.url(RUN_FILE)}: "
                                                          f"{error_reason(err)}") from None
    return summary


@dataclasses.dataclass
class _RunCounts:
    ok: int = 0
    annotations: int = 0
    deferred: int = 0
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def _label_inputs(config: LabelConfig, show_progress: bool, vocabulary, shipped: ShippedModel, image_size: int,
                  source: InputSource, done_parts: list[str], boxes_by_name: dict | None,
                  metadata: dict) -> tuple[_RunCounts, dict]:
    """Stream the input's images not yet in the output (`pipelines.inputs.work_dataset`) through Ray Data into
    committed parts; the counts of what was written, and the `InputTally` counts (``listed``, ``skipped_done``,
    ``ignored``, ``prompts_matched``). The progress bar counts the run's inputs, starting at those an earlier run
    committed, when a shuffle decided them before labelling (else it counts up without a total). ``shipped``:
    the model and its class embeddings, put in the object store once for all model actors."""
    counts = _RunCounts()
    with _ray_session(config):
        plan = _plan(config)
        tally = ray.remote(num_cpus=0)(InputTally).remote()
        work = work_dataset(
            source, box_mode=config.mode == "box", done_parts=done_parts, output=config.output,
            prompts_ref=None if boxes_by_name is None else ray.put(boxes_by_name),  # once, for every actor
            tally=tally, limit=config.limit, partitions=shuffle_partitions(ray.cluster_resources().get("CPU", 1)))
        already_done = ray.get(tally.result.remote())[0].get("skipped_done", 0)  # known when work.todo is
        total = already_done + work.todo if work.todo is not None else config.limit
        writers = _start_writers(config, plan, metadata)
        crashes = ray.remote(num_cpus=0)(CrashLedger).remote()
        dataset = _build_dataset(config, plan, vocabulary, ray.put(shipped), image_size, work.dataset, writers, crashes)
        try:
            with _progress(already_done, total, show_progress) as bar, contextlib.closing(iter(dataset.iter_rows())) as rows:
                for summary in rows:
                    if summary["write_error"]:
                        raise WriteFailed(summary["write_error"])
                    counts.ok += int(summary["ok"])
                    counts.annotations += int(summary["annotations"])
                    counts.deferred += int(summary["deferred"])
                    counts.errors.update(json.loads(summary["error_kinds"]))
                    bar.update(int(summary["images"]) + int(summary["deferred"]))
                    bar.set_postfix(errors=sum(counts.errors.values()), annotations=counts.annotations,
                                    refresh=False)
        finally:
            # Ray Data has no end-of-stream call per actor: the rows still buffered in the writers are
            # published here, also when the run stops on an error (what was labelled stays labelled).
            failures = _flush_writers(writers)
        if failures:
            raise failures[0]
        tallied, matched = ray.get(tally.result.remote())
    return counts, {**tallied, "prompts_matched": matched}


def _flush_writers(writers: list) -> list[BaseException]:
    """Ask every writer to publish what it holds; the errors of those that failed (each writer is asked)."""
    failures = []
    for ref in [writer.flush.remote() for writer in writers]:
        try:
            ray.get(ref)
        except Exception as err:  # noqa: BLE001 - reported by the caller once all writers were asked
            failures.append(err)
    return failures


def _output_problem(config: LabelConfig, err: BaseException) -> str:
    """One sentence for an output that cannot be used before any work starts."""
    import botocore.exceptions

    cause = _in_chain(err, botocore.exceptions.ClientError)
    if cause is not None and cause.response.get("Error", {}).get("Code") == "NoSuchBucket":
        return (f"cannot use the output {redact_uri(config.output)}: its bucket does not exist (ovsam-batch never "
                "creates buckets: create it, or check the name and --endpoint-url)")
    return (f"cannot use the output {redact_uri(config.output)}: {error_reason(err)}"
            + (RETRY_HINT if is_transient(err) else ""))


def _failure_message(config: LabelConfig, err: BaseException) -> str | None:
    """The sentence for a run stopped by a storage failure or an input that cannot be read (also one raised inside a
    Ray worker and wrapped by Ray); None for anything else (a bug: its traceback is the useful report)."""
    unreadable = _in_chain(err, InputError)
    if unreadable is not None:  # the input (listing, manifest) or nothing in it: fix it, then run again
        return str(getattr(unreadable, "cause", None) or unreadable)
    failed = _in_chain(err, WriteFailed) or _in_chain(err, OutputError)
    if failed is not None:
        reason = str(getattr(failed, "cause", None) or failed)  # a Ray task error keeps the writer's in `cause`
    elif isinstance(err, OSError) or is_transient(err):
        reason = (f"storage failed for the output {redact_uri(config.output)}: {error_reason(err)}"
                  + (RETRY_HINT if is_transient(err) else ""))
    else:
        return None
    return f"{reason}; the run stopped, what was committed stays, and the same command resumes from it"


def _record_end(store: OutputStore, record: dict, status: str, message: str) -> None:
    """run.json says ``status`` (``failed`` / ``interrupted``) with the reason (best effort: the storage that failed
    may refuse this too)."""
    try:
        store.write_run_record({**record, "status": status, "finished_at": _now(), "error": message})
    except Exception:  # noqa: BLE001 - the run's own message already tells the user what failed
        pass


def _in_chain(err: BaseException | None, kind: type) -> BaseException | None:
    """The first exception of type ``kind`` in ``err``'s cause chain (Ray keeps a worker's error in ``cause``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def _resolve_model(config: LabelConfig):
    """The model's name/trained flag, the run's vocabulary, and the model with its class embeddings to ship.

    The model is loaded once here, on CPU, before any worker starts: a missing, unreadable or mismatched
    checkpoint then ends the run with the model's own one-line message instead of a worker traceback. The
    model actors build from its files (through the object store), so a preset directory or weights path that
    exists only on the driver's machine, or a hub or bucket only the driver can reach, serves every node.
    """
    import ovsam

    try:
        model = ovsam.load_model(config.preset, weights=dict(config.weights) or None, device="cpu")
        vocabulary = ovsam.Vocabulary.from_spec(config.vocabulary or model.config.vocabulary or "coco")
        shipped = ship_model(model, vocabulary)  # embedded once here, not once per model actor
    except ovsam.OVSAMError as err:
        raise LabelError(str(err)) from None
    info = _ModelInfo(model.config.name, model.config.trained, model.config.description, model.config.image_size)
    return info, vocabulary, shipped


def _check_same_settings(store: OutputStore, config: LabelConfig) -> None:
    previous = store.read_run_record()
    if previous is None:
        return
    current = config.public_dict()
    keys = _LABEL_SETTINGS + (_AUTOMATIC_SETTINGS if config.mode == "auto" else ())
    differing = [key for key in keys if previous["config"].get(key) != current[key]]
    if differing:
        raise OutputError(
            f"{redact_uri(config.output)} holds labels made with other settings ({', '.join(differing)} differ "
            f"from its {RUN_FILE}); resuming would mix them: use a new --output or the same settings")


def _check_box_source(config: LabelConfig, source: InputSource) -> None:
    """Box prompts come from one place: the --prompts file or the manifest's box columns (`pipelines.inputs`)."""
    shown = redact_uri(config.input)
    if source.box_columns and config.mode != "box":
        raise LabelError(f"the manifest {shown} has box columns ({', '.join(source.box_columns)}): label it with "
                         "--mode box, or use a manifest without them for automatic mode")
    if source.box_columns and config.prompts:
        raise LabelError(f"the manifest {shown} has box columns and --prompts gives boxes too: give them one way")
    if config.mode == "box" and not config.prompts and not source.box_columns:
        raise LabelError(f"--mode box needs --prompts or a CSV/Parquet manifest with box columns "
                         f"(boxes, or x0, y0, x1, y1); {shown} has none")


def _load_prompts(config: LabelConfig):
    """The --prompts file's boxes by image name; None without one (automatic mode, or boxes in the manifest)."""
    if config.mode != "box" or not config.prompts:
        return None
    try:
        return load_box_prompts(config.prompts, config.endpoint_url, config.storage_attempts)
    except ValueError as err:
        raise LabelError(str(err)) from None


class _ray_session:
    """Joins ``config.address`` or starts a local Ray for the run; leaves an already running Ray alone."""

    def __init__(self, config: LabelConfig):
        self.config = config
        self.owned = False

    def __enter__(self):
        if not ray.is_initialized():
            if self.config.address:
                try:
                    ray.init(address=self.config.address, runtime_env=self.config.runtime_env)
                except ray.exceptions.AuthenticationError:
                    raise LabelError(_AUTHENTICATION_MESSAGE.format(redact_uri(self.config.address))) from None
                except ConnectionError as err:  # a refused token shows as this, after Ray's own retries
                    raise LabelError(_CONNECTION_MESSAGE.format(redact_uri(self.config.address),
                                                                str(err).splitlines()[0])) from None
            else:
                ray.init(include_dashboard=False, logging_level="WARNING", runtime_env=self.config.runtime_env)
            self.owned = True
        elif self.config.runtime_env:
            raise LabelError("--runtime-env applies when the run starts or joins Ray, but Ray is already "
                             "running in this process: pass the runtime_env to its ray.init instead")
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # our own bar below: images, errors, images/s
        context.print_on_execution_start = False
        return self

    def __exit__(self, *exc):
        if self.owned:
            ray.shutdown()


# Batches a GPU model actor runs at once, each in its own thread: while one batch's forward runs on the device,
# the other's masks are encoded on the host (pycocotools, Arrow), so the GPU does not wait on that host work. Two
# batches' activations are on the device at once. A CPU actor runs one: its threads already use all its cores.
MODEL_CALLS_PER_GPU_WORKER = 2


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """How the cluster's resources are split: model actors, their CPU slots (= torch threads on CPU), GPUs, and
    the batches each model actor runs at once."""

    workers: int
    cpus_per_worker: int
    gpus_per_worker: float
    decode_actors: int
    calls_per_worker: int = 1


def plan_workers(config: LabelConfig, cpus: int, gpus: float) -> WorkerPlan:
    """GPU: one CPU slot per model actor. CPU only: the model is the bottleneck (decoding a JPEG costs far less
    than a forward pass), so the model actors share all cores but one, each running that many torch threads,
    and decoding keeps at least one core; threads beyond the reserved cores would only contend."""
    if config.gpus_per_worker > 0 and gpus > 0:
        workers = config.workers or max(1, int(gpus / config.gpus_per_worker))
        return WorkerPlan(workers, 1, config.gpus_per_worker, max(1, cpus - workers), MODEL_CALLS_PER_GPU_WORKER)
    workers = config.workers or 1
    cpus_per_worker = max(1, (cpus - 1) // workers)
    return WorkerPlan(workers, cpus_per_worker, 0, max(1, cpus - workers * cpus_per_worker))


def _plan(config: LabelConfig) -> WorkerPlan:
    resources = ray.cluster_resources()
    return plan_workers(config, int(resources.get("CPU", 1)), resources.get("GPU", 0))


def _start_writers(config: LabelConfig, plan: WorkerPlan, metadata: dict) -> list:
    """`PartWriter` actors, one per `_MODEL_ACTORS_PER_WRITER` model actors (at least one). Writing is I/O wait
    and compression, not model work: zero-CPU actors never compete with decoding or the model."""
    limits = PartLimits(images=config.part_size, bytes=PART_MAX_BYTES, seconds=config.flush_interval)
    writer = ray.remote(num_cpus=0, max_restarts=0)(PartWriter)
    return [writer.remote(config.output, config.endpoint_url, config.storage_attempts, metadata, limits)
            for _ in range(math.ceil(plan.workers / _MODEL_ACTORS_PER_WRITER))]


def _build_dataset(config: LabelConfig, plan: WorkerPlan, vocabulary, model: ray.ObjectRef, image_size: int,
                   work: ray.data.Dataset, writers: list, crashes) -> ray.data.Dataset:
    dataset = work.map_batches(
        ReadAndDecode, fn_constructor_kwargs={"endpoint_url": config.endpoint_url, "input_size": image_size,
                                              "storage_attempts": config.storage_attempts},
        batch_size=config.batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.decode_actors),
        num_cpus=1)
    dataset = dataset.map_batches(
        LabelImages, batch_size=config.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"config": config, "vocabulary": vocabulary, "model": model,
                               "cpu_threads": plan.cpus_per_worker, "crashes": crashes},
        compute=ray.data.ActorPoolStrategy(size=plan.workers, max_concurrent_calls_per_actor=plan.calls_per_worker,
                                           enable_true_multi_threading=plan.calls_per_worker > 1),
        num_cpus=plan.cpus_per_worker,
        # A worker that dies is restarted and its batch given again (Ray Data's defaults); `LabelImages` bounds how
        # often (see `model_task_retries`).
        num_gpus=plan.gpus_per_worker)
    return dataset.map_batches(
        SendToWriter, batch_size=config.batch_size, batch_format="numpy", fn_constructor_kwargs={"writers": writers},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.workers), num_cpus=0)


def _progress(done: int, total: int, show: bool) -> tqdm.tqdm:
    interactive = sys.stderr.isatty()
    return tqdm.tqdm(initial=done, total=total, unit="img", desc="labelling", disable=not show, file=sys.stderr,
                     mininterval=0.5 if interactive else _LOG_PROGRESS_INTERVAL_S, dynamic_ncols=interactive)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
