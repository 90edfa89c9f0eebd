"""Latency of every Walkthrough step's numbers for one image, beside the plain forward pass (prints
figures; not a test).

    python benchmarks/walkthrough_latency.py [--checkpoint DIR] [--image FILE] [--repeats N] [--threads N]

"forward": the normalised image through the model, no gradients (the baseline).
"payload": `vit_core.walkthrough.walkthrough_payload` with the decision map given (the app passes
the map it already computed for the Explorer): the forward pass keeping hidden states, logit
lens, token PCA, position similarity, all L x H head knock-outs, the what-if curves for every
k = 0..T along the map's order and a random order, narration and JSON rounding.
"app's first answer": what the app sends first (demo.walkthrough.first_payload): the same payload
with the what-if rows at k = 0 and the step's first k only, in bf16 where the CPU has bf16 units;
every step can be drawn from it, and the slider's other rows follow in a second answer.
"payload + default map": the same with the map left to the library (gradient rollout: one more
forward and backward pass).
Each also in bf16 (knock-outs and what-if rows on a bfloat16 copy) when the CPU has bf16 units,
as the app's trust figures run. Parts: "walkthrough" (forward + lens + knock-outs), "what-if".
All run interleaved in one process with --threads torch threads (default 1, the app's per-request
setting); medians of wall and process CPU time (on a busy machine the CPU time is the steadier
figure). Goal: the payload <= 100 ms. The last line is
`payload_ms=X payload_cpu_ms=C forward_ms=Y payload/forward=Z`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from vit_core import load_checkpoint, preprocess, read_image
from vit_core.devices import uses_bf16
from vit_core.walkthrough import default_k, default_relevance, walkthrough, walkthrough_payload, what_if_curves

ROOT = Path(__file__).resolve().parents[1]

BF16 = uses_bf16(torch.device("cpu"), "auto")


def runs(model, batch: torch.Tensor) -> dict:
    relevance = default_relevance(model, batch)[0]
    orders = torch.stack([relevance.argsort(descending=True, stable=True),
                          torch.randperm(len(relevance), generator=torch.Generator().manual_seed(0))])
    jobs = {"forward": lambda: torch.no_grad()(model)(batch),
            "payload": lambda: walkthrough_payload(model, batch, relevance=relevance.numpy()),
            "app's first answer": lambda: walkthrough_payload(model, batch, relevance=relevance.numpy(),
                                                              whatif_ks=[0, default_k(len(relevance))], bf16=BF16),
            "payload + default map": lambda: walkthrough_payload(model, batch),
            "  walkthrough (forward, lens, knock-outs)": lambda: walkthrough(model, batch),
            "  what-if curves": lambda: what_if_curves(model, batch, orders)}
    if BF16:
        jobs["payload bf16"] = lambda: walkthrough_payload(model, batch, relevance=relevance.numpy(), bf16=True)
        jobs["  walkthrough bf16"] = lambda: walkthrough(model, batch, bf16=True)
        jobs["  what-if curves bf16"] = lambda: what_if_curves(model, batch, orders, bf16=True)
    return jobs


def timed(jobs: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall ms, CPU ms) per job, the jobs interleaved so background load hits all alike."""
    for job in jobs.values():  # warm-up: allocator, bf16 copy
        for _ in range(2):
            job()
    wall = {name: [] for name in jobs}
    cpu = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            job()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (1000 * statistics.median(wall[name]), 1000 * statistics.median(cpu[name])) for name in jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "vit-cifar10"))
    parser.add_argument("--image", default=None, help="default: the first of demo/examples")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the app)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint)
    image = Path(args.image) if args.image else sorted((ROOT / "demo" / "examples").glob("*.*"))[0]
    batch = preprocess(read_image(image), model)
    print(f"model: {args.checkpoint}; depth {model.depth}, {model.n_heads} heads, {model.grid_size ** 2} patches; "
          f"image {image.name}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{os.getloadavg()[0]:.1f} load average, bf16 units: {BF16}; {args.repeats} repeats after warm-up")
    p50 = timed(runs(model, batch), args.repeats)
    print(f"  {'':<42} {'wall ms':>9} {'CPU ms':>9}")
    for name, (wall, cpu) in p50.items():
        print(f"  {name:<42} {wall:9.1f} {cpu:9.1f}")
    forward = p50["forward"][0]
    best = "payload bf16" if BF16 else "payload"
    payload, payload_cpu = p50[best]
    print(f"{best}: {payload:.0f} ms wall ({payload_cpu:.0f} ms CPU), {payload / forward:.1f} x the forward pass; "
          f"goal <= 100 ms {'met' if payload <= 100 else 'NOT met'} in this run")
    first, first_cpu = p50["app's first answer"]
    print(f"app's first answer (every step drawable): {first:.0f} ms wall ({first_cpu:.0f} ms CPU)")
    print(f"payload_ms={payload:.1f} payload_cpu_ms={payload_cpu:.1f} forward_ms={forward:.2f} "
          f"payload/forward={payload / forward:.1f}")


if __name__ == "__main__":
    main()
