"""The model stage's hot path on its device: images/s, time per stage, host work per image, device busy
fraction, MFU, and the pipeline's model stage against a bare model loop.

Real-size architecture (a released preset) with seeded random weights (speed does not depend on the values),
on synthetic 1600x1200 photos (JPEG):

    python benchmarks/bench_gpu.py                              # CUDA (bf16 autocast) when present, else CPU
    python benchmarks/bench_gpu.py --images 1 --grids 16        # a quick look on a CPU

Modes: box (``--boxes`` prompts per image) and automatic (each ``--grids`` side: a side x side point grid).

* stage times: the real code path (`Predictor`, `AutomaticLabeller`, `AnnotationColumns`), each stage timed
  where it is called: device stages with CUDA events on a GPU (device time), perf_counter on a CPU; host
  stages in CPU time of the calling thread.
* host ms per image in the model actor apart from device ops: the stages that are host work only
  (preparing the input, compressing run lengths with pycocotools, building and serialising the annotation
  rows); the device stages' kernel launches are not in it.
* device busy: the device stages' time over the wall time of the loop.
* MFU: FLOPs of one image (torch's FlopCounterMode) x images/s over the device's dense bf16 peak (GPU only:
  a CPU has no bf16 peak to compare with, and counting costs one more forward).
* model stage vs bare loop: `pipelines.predict.LabelImages` called in this process on batches as the decode
  stage gives them (a local Ray holds its crash ledger), against a loop over the same predictor calls on
  decoded images (`predict_images` / `generate_images` and the masks' run lengths, nothing else); and the stage
  with two batches at once in threads, as a GPU model actor runs them (`MODEL_CALLS_PER_GPU_WORKER`: one batch's
  host work overlaps the other's device work; on a CPU the two only share the cores).
* host rows of object masks: random weights give speckled masks (hundreds of thousands of runs each, which no
  trained model writes), so the host ms of the annotation rows are also measured on disc-shaped masks of the
  box mode's and automatic mode's object counts (``--boxes``, ``--auto-objects``).
* ``--compile``: the image embedding eager against ``torch.compile`` (inductor), and the first compiled
  call's time (what each model actor pays once).
* what travels from decode to model stage: the bytes per image of the JPEG, the decoded RGB and the RGB
  resized to the model input, and the host ms to decode and to resize (one CPU thread).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import ovsam
import ovsam.automatic
import ovsam.predictor
from ovsam.config import load_config
from ovsam.images import decode_image
from ovsam.transforms import ImageFrame, ResizedImage, resize_for_model
from schemas.annotations import AnnotationColumns

IMAGE_HW = (1200, 1600)
JPEG_QUALITY = 90  # a typical camera / web photo
# Dense bf16 tensor-core peak FLOP/s by device name (vendor data sheets, SXM parts, no sparsity).
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


class StageClock:
    """Per-stage times: device stages by CUDA events on a GPU (else wall time), host stages by thread CPU time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host_s: dict[str, float] = defaultdict(float)
        self.device_s: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._depth = 0

    @contextlib.contextmanager
    def stage(self, name: str, on_device: bool):
        """Time the body as ``name``; a stage inside another stage counts as part of the outer one."""
        if self._depth:
            yield
            return
        self._depth += 1
        try:
            with self._timed(name, on_device):
                yield
        finally:
            self._depth -= 1

    @contextlib.contextmanager
    def _timed(self, name: str, on_device: bool):
        if on_device and self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
            return
        # Host stages in CPU time of this thread (a loaded machine does not inflate them), device stages on a CPU
        # in wall time (torch's threads).
        clock = time.perf_counter if on_device else time.thread_time
        started = clock()
        yield
        (self.device_s if on_device else self.host_s)[name] += clock() - started

    def collect(self) -> None:
        """Add the recorded CUDA events (synchronises)."""
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self.device_s[name] += start.elapsed_time(end) / 1e3
            self._events.clear()

    def reset(self) -> None:
        self.collect()
        self.host_s.clear()
        self.device_s.clear()


def wrap(owner, name: str, clock: StageClock, stage: str, on_device: bool):
    """Time every call of ``owner.name`` as ``stage`` (the real code path, no copy of it)."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        with clock.stage(stage, on_device):
            return original(*args, **kwargs)

    setattr(owner, name, timed)
    return original


def synthetic_photo(rng: np.random.Generator) -> bytes:
    """A JPEG of 1600x1200 smooth shading, shapes and sensor noise: compresses like a photo."""
    h, w = IMAGE_HW
    image = cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(30):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if rng.random() < 0.5:
            cv2.circle(image, centre, int(rng.integers(20, 250)), colour, -1)
        else:
            size = rng.integers(40, 400, 2)
            cv2.rectangle(image, centre, (centre[0] + int(size[0]), centre[1] + int(size[1])), colour, -1)
    noisy = np.clip(image.astype(np.int16) + rng.normal(0, 4, image.shape).astype(np.int16), 0, 255)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(noisy.astype(np.uint8), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    return data.tobytes()


def random_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    h, w = IMAGE_HW
    x1y1 = rng.uniform(0, [w - 100, h - 100], (count, 2))
    x2y2 = np.minimum(x1y1 + rng.uniform(40, 600, (count, 2)), [w, h])
    return np.concatenate([x1y1, x2y2], 1).astype(np.float32)


class CachedRuns:
    """A prediction whose run lengths were computed already: times the host rows apart from the device."""

    def __init__(self, prediction: ovsam.Prediction, runs: list[np.ndarray]) -> None:
        self._prediction, self._runs = prediction, runs

    def __getattr__(self, name):
        return getattr(self._prediction, name)

    def __len__(self) -> int:
        return len(self._prediction)

    def run_lengths(self) -> list[np.ndarray]:
        return self._runs


def rows(predictions: list, clock: StageClock, names: list[str]) -> int:
    """Masks to run lengths (device) and annotation rows (host) as the model stage makes them; objects made."""
    from pipelines.predict import serialize

    objects = 0
    for i, prediction in enumerate(predictions):
        with clock.stage("run lengths", on_device=True):
            runs = prediction.run_lengths()
        with clock.stage("rows (pycocotools + Arrow)", on_device=False):
            columns = AnnotationColumns.from_prediction(f"bench://{i}", CachedRuns(prediction, runs), names)
            serialize(columns)
        objects += len(columns)
    return objects


def object_mask_rows(count: int, input_size: int, device, names: list[str]) -> dict:
    """Run lengths (device) and annotation rows (host) of ``count`` disc-shaped masks on a 1600x1200 image."""
    frame = ImageFrame.for_image(*IMAGE_HW, input_size)
    side = input_size // 4  # the head's low-res logits
    rng = np.random.default_rng(1)
    rh, rw = (s // 4 for s in frame.resized_size)
    centres = torch.as_tensor(rng.uniform(0.1, 0.9, (count, 2)) * np.array([rw, rh]), dtype=torch.float32)
    radii = torch.as_tensor(rng.uniform(3, rh / 4, count), dtype=torch.float32)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    distance = ((xx[None] - centres[:, 0, None, None]) ** 2 + (yy[None] - centres[:, 1, None, None]) ** 2).sqrt()
    logits = (radii[:, None, None] - distance)[:, None].to(device)
    zeros = np.zeros(count, np.int64)
    prediction = ovsam.Prediction(logits, frame, zeros, np.ones(count, np.float32), zeros[:, None],
                                  np.ones((count, 1), np.float32), np.zeros(count, np.float32), "box",
                                  np.zeros((count, 4), np.float32))
    clock = StageClock(device)
    rows([prediction], clock, names)  # warm-up
    clock.reset()
    rows([prediction], clock, names)
    clock.collect()
    runs = prediction.run_lengths()
    return {"objects": count, "runs_per_mask": float(np.mean([len(r) for r in runs])),
            "run_lengths_device_ms": round(1e3 * clock.device_s["run lengths"], 2),
            "rows_host_ms": round(1e3 * clock.host_s["rows (pycocotools + Arrow)"], 2)}


def flops_per_image(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS.items() if key in name), None)


def measure_mode(name: str, run_batch, images: list[ResizedImage], batch: int, clock: StageClock, device,
                 sync) -> dict:
    """Run ``run_batch`` over ``images`` in batches (after one warm-up batch); stage times per image."""
    run_batch(images[:batch])
    sync()
    clock.reset()
    objects = 0
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        objects += run_batch(images[start:start + batch])
    sync()
    wall = time.perf_counter() - started
    clock.collect()
    n = len(images)
    device_s = sum(clock.device_s.values())
    host_s = sum(clock.host_s.values())
    result = {
        "mode": name, "images": n, "images_per_s": n / wall, "ms_per_image": 1e3 * wall / n,
        "objects_per_image": objects / n,
        "device_stages_ms_per_image": {k: round(1e3 * v / n, 2) for k, v in clock.device_s.items()},
        "host_stages_ms_per_image": {k: round(1e3 * v / n, 2) for k, v in clock.host_s.items()},
        "host_ms_per_image": 1e3 * host_s / n,
        "device_busy_fraction": device_s / wall,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="coco_rn50x16")
    parser.add_argument("--images", type=int, default=2, help="timed images per mode (after one warm-up batch)")
    parser.add_argument("--batch", type=int, default=1, help="images per model call")
    parser.add_argument("--boxes", type=int, default=20, help="box prompts per image in box mode")
    parser.add_argument("--auto-objects", type=int, default=64,
                        help="objects per image of automatic mode for the object-mask host rows")
    parser.add_argument("--grids", default="32,16", help="automatic-mode grid sides, comma-separated")
    parser.add_argument("--skip-pipeline", action="store_true", help="no model stage vs bare loop")
    parser.add_argument("--compile", action="store_true",
                        help="also time the image embedding under torch.compile against eager")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)

    config, _ = load_config(args.preset)
    config = dataclasses.replace(config, weights={})  # random weights: nothing to download
    preset_file = Path(tempfile.mkdtemp(prefix="bench_gpu_")) / "preset.json"
    preset_file.write_text(json.dumps(config.to_dict()))
    model = ovsam.load_model(preset_file, device=device)
    vocabulary = ovsam.Vocabulary.from_spec(config.vocabulary or "coco")
    predictor = ovsam.Predictor(model, vocabulary)
    names = vocabulary.names
    params = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset} ({params / 1e6:.0f}M parameters, random weights), device {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"torch threads {torch.get_num_threads()}, images {IMAGE_HW[1]}x{IMAGE_HW[0]}", flush=True)

    rng = np.random.default_rng(0)
    count = args.images + args.batch  # the first batch warms up
    encoded = [synthetic_photo(rng) for _ in range(count)]
    decoded = [decode_image(data) for data in encoded]
    results = {"transfer": transfer_costs(encoded, decoded, model.config.image_size)}
    # The decode stage resizes (`pipelines.decode`): the model stage gets these.
    images = [resize_for_model(image, model.config.image_size) for image in decoded]
    boxes = [random_boxes(rng, args.boxes) for _ in range(count)]
    box_of = {id(image): b for image, b in zip(images, boxes)}
    print(json.dumps(results["transfer"]), flush=True)

    if args.compile:  # before the stage clocks wrap embed_image: torch.compile sees the model's own method
        results["compile"] = compile_gain(predictor, images[:args.batch], sync)
        print(json.dumps(results["compile"]), flush=True)

    clock = StageClock(device)
    wrap(ovsam.predictor, "model_input", clock, "to device + normalise + pad", on_device=True)
    wrap(model, "embed_image", clock, "embed", on_device=True)
    wrap(predictor, "decode", clock, "decode + recognise (box)", on_device=True)
    wrap(ovsam.automatic, "select_masks", clock, "area + mask NMS", on_device=True)
    wrap(predictor, "recognise", clock, "recognise survivors", on_device=True)

    def box_batch(batch: list[np.ndarray]) -> int:
        return rows(predictor.predict_images(batch, [box_of[id(i)] for i in batch]), clock, names)

    peak = peak_flops(device)
    modes = [("box", box_batch)]
    for side in (int(s) for s in args.grids.split(",") if s):
        grid_labeller = ovsam.AutomaticLabeller(predictor, ovsam.AutomaticConfig(points_per_side=side))
        wrap(grid_labeller, "mask_candidates", clock, "grid decode + stability", on_device=True)
        modes.append((f"auto {side}x{side}",
                      lambda batch, lab=grid_labeller: rows(lab.generate_images(batch), clock, names)))
    results["modes"] = []
    for name, run_batch in modes:
        result = measure_mode(name, run_batch, images, args.batch, clock, device, sync)
        if peak:  # counting FLOPs costs one more forward: only where there is a peak to compare with
            flops = flops_per_image(lambda: run_batch(images[:1]))
            result["gflop_per_image"] = flops / 1e9
            result["mfu_bf16"] = flops * result["images_per_s"] / peak
        embed_ms = result["device_stages_ms_per_image"]["embed"]
        result["time_over_one_embedding"] = result["ms_per_image"] / embed_ms
        results["modes"].append(result)
        print(json.dumps(result), flush=True)

    results["object_masks"] = [object_mask_rows(count, model.config.image_size, device, names)
                               for count in (args.boxes, args.auto_objects)]
    for result in results["object_masks"]:
        print(json.dumps(result), flush=True)

    if not args.skip_pipeline:
        results["model_stage_vs_bare"] = model_stage_vs_bare(preset_file, predictor, encoded, images, boxes,
                                                             args, sync)
        print(json.dumps(results["model_stage_vs_bare"]), flush=True)
    print(json.dumps(results))


def compile_gain(predictor: ovsam.Predictor, batch: list[ResizedImage], sync, repeats: int = 3) -> dict:
    """ms per image of `Predictor.embed_images` (the image encoder: CLIP tower, SAM2CLIP, FPN) eager and with
    ``compile_encoder`` (torch.compile, inductor), and the first compiled call's time."""
    compiled = ovsam.Predictor(predictor.model, predictor.vocabulary, class_embeddings=predictor.class_embeddings,
                               compile_encoder=True)

    def timed_s(run) -> float:
        sync()
        started = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - started

    def ms_per_image(p: ovsam.Predictor) -> float:
        return 1e3 * timed_s(lambda: [p.embed_images(batch) for _ in range(repeats)]) / (repeats * len(batch))

    predictor.embed_images(batch)  # warm-up
    eager_ms = ms_per_image(predictor)
    first_call_s = timed_s(lambda: compiled.embed_images(batch))
    compiled_ms = ms_per_image(compiled)
    return {"embed_eager_ms_per_image": eager_ms, "embed_compiled_ms_per_image": compiled_ms,
            "eager_over_compiled": eager_ms / compiled_ms, "first_compiled_call_s": first_call_s}


def transfer_costs(encoded: list[bytes], images: list[np.ndarray], input_size: int) -> dict:
    """Bytes per image of what the decode stage could hand on, and host CPU ms to decode / resize (1 thread)."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    started = time.thread_time()  # CPU time: a loaded machine does not inflate it
    for data in encoded:
        decode_image(data)
    decode_ms = 1e3 * (time.thread_time() - started) / len(encoded)
    started = time.thread_time()
    for image in images:
        resized = resize_for_model(image, input_size).pixels
    resize_ms = 1e3 * (time.thread_time() - started) / len(images)
    cv2.setNumThreads(threads)
    return {"jpeg_bytes": int(np.mean([len(d) for d in encoded])), "rgb_bytes": images[0].nbytes,
            "resized_rgb_bytes": resized.nbytes, "decode_ms": decode_ms, "resize_ms": resize_ms}


def model_stage_vs_bare(preset_file: Path, predictor: ovsam.Predictor, encoded: list[bytes],
                        images: list[ResizedImage], boxes: list[np.ndarray], args, sync) -> dict:
    """images/s of `LabelImages` (box mode) on decode-stage batches against the bare predictor loop."""
    import ray

    from pipelines.config import LabelConfig
    from pipelines.label import MODEL_CALLS_PER_GPU_WORKER
    from pipelines.predict import CrashLedger, LabelImages, ship_model

    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        config = LabelConfig(input="bench-in", output="bench-out", mode="box", prompts="bench.json",
                             preset=str(preset_file), batch_size=args.batch)
        shipped = ray.put(ship_model(predictor.model, predictor.vocabulary))
        stage = LabelImages(config, predictor.vocabulary, shipped,
                            torch.get_num_threads(), ray.remote(num_cpus=0)(CrashLedger).remote())
        batches = []
        for start in range(0, len(images), args.batch):
            part = range(start, min(start + args.batch, len(images)))
            batches.append({
                "image_uri": np.array([f"bench://{i}" for i in part], dtype=object),
                "width": np.array([images[i].frame.original_size[1] for i in part], np.int32),
                "height": np.array([images[i].frame.original_size[0] for i in part], np.int32),
                "pixels": np.array([images[i].pixels.tobytes() for i in part], dtype=object),
                "error_kind": np.array([""] * len(part), dtype=object),
                "error": np.array([""] * len(part), dtype=object),
                "prompt_boxes": np.array([boxes[i].tobytes() for i in part], dtype=object),
            })

        def stage_loop():
            for batch in batches[1:]:
                out = stage(batch)
                assert all(s == "ok" for s in out["status"]), out["error"]

        def stage_calls_at_once():  # as a GPU model actor runs its batches (`MODEL_CALLS_PER_GPU_WORKER` threads)
            with ThreadPoolExecutor(MODEL_CALLS_PER_GPU_WORKER) as pool:
                for out in pool.map(stage, batches[1:]):
                    assert all(s == "ok" for s in out["status"]), out["error"]

        def bare_loop():
            for start in range(args.batch, len(images), args.batch):
                part = slice(start, start + args.batch)
                for prediction in predictor.predict_images(images[part], boxes[part]):
                    prediction.run_lengths()

        stage(batches[0])  # warm-up
        timings = {}
        for name, loop in (("bare", bare_loop), ("model_stage", stage_loop), ("model_stage_calls_at_once",
                                                                               stage_calls_at_once),
                           ("bare_again", bare_loop)):
            sync()
            started = time.perf_counter()
            loop()
            sync()
            timings[name] = (len(images) - args.batch) / (time.perf_counter() - started)
    finally:
        ray.shutdown()
    bare = (timings["bare"] + timings["bare_again"]) / 2
    return {"mode": "box", "bare_images_per_s": bare, "model_stage_images_per_s": timings["model_stage"],
            "model_stage_over_bare": timings["model_stage"] / bare,
            "model_stage_calls_at_once_over_bare": timings["model_stage_calls_at_once"] / bare}


if __name__ == "__main__":
    main()
