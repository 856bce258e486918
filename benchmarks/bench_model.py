"""Model speed: image-embedding time, decoder prompts/s, and one embedding + K prompts against K separate
single-prompt runs (the per-crop baseline the paper compares with).

Real-size architecture (a released preset) with seeded random weights: speed does not depend on the values.

    python benchmarks/bench_model.py                       # CPU here, CUDA (bf16 autocast) when present
    python benchmarks/bench_model.py --preset tiny --prompts 64 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

import ovsam
from ovsam.config import load_config


def timed(fn, repeats: int, sync) -> float:
    """Median wall seconds of `fn` over `repeats` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="coco_rn50x16")
    parser.add_argument("--prompts", type=int, default=32, help="K, prompts per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    config, _ = load_config(args.preset)
    config = dataclasses.replace(config, weights={})  # random weights: nothing to download
    model = ovsam.build_model(config).to(args.device)
    vocabulary = ovsam.Vocabulary.from_spec(config.vocabulary or "coco")
    predictor = ovsam.Predictor(model, vocabulary, prompt_batch_size=args.prompts)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    x1y1 = rng.uniform(0, 400, (args.prompts, 2))
    boxes = np.concatenate([x1y1, x1y1 + rng.uniform(20, 200, (args.prompts, 2))], 1).astype(np.float32)
    boxes = np.minimum(boxes, [640, 480, 640, 480]).astype(np.float32)

    params = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset} ({params / 1e6:.0f}M parameters), device {args.device}, "
          f"threads {torch.get_num_threads()}, K = {args.prompts} prompts")

    embed_s = timed(lambda: predictor.set_image(image), args.repeats, sync)
    predictor.set_image(image)
    decode_s = timed(lambda: predictor.predict(boxes=boxes), args.repeats, sync)
    single_s = timed(lambda: predictor.predict(boxes=boxes[:1]), args.repeats, sync)

    batched = embed_s + decode_s
    separate = args.prompts * (embed_s + single_s)
    print(f"image embedding           {embed_s * 1e3:9.1f} ms")
    print(f"decode K prompts          {decode_s * 1e3:9.1f} ms  ({args.prompts / decode_s:.1f} prompts/s, "
          "incl. full-resolution masks)")
    print(f"decode 1 prompt           {single_s * 1e3:9.1f} ms")
    print(f"1 embedding + K prompts   {batched:9.3f} s")
    print(f"K x (embedding + 1)       {separate:9.3f} s")
    print(f"speed-up                  {separate / batched:9.1f} x")


if __name__ == "__main__":
    main()
