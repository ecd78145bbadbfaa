"""CPU threads against the CPUs a job may use, under a concurrent load: the same training step (DeepLab-v3 on
ResNet-18, forward and backward) with torch's default thread count and with the count run.py now picks.

    python -m benchmarks.threads                  # load: 4 busy processes per CPU; job limited to 1 CPU
    python -m benchmarks.threads --load 8 --job_cpus 1 --rounds 5

The job is limited to ``--job_cpus`` CPUs by its affinity, set after torch started, the way a container's CPU quota
limits it without torch seeing the limit: torch keeps the thread count it chose at start, one per visible CPU. The
"budget" variant uses ``utils.threads.threads_for`` (the CPUs the process may use, one process, no data-loader
worker). ``--load`` busy processes run on every CPU meanwhile. Variants alternate in rounds in one process (the
same load hits both); the medians and their ratio are printed. Only the ratio means something.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

from benchmarks.common import ROOT, markdown_table  # noqa: F401  (ROOT: the project's packages importable)
from segmentation_module import make_model
from utils.threads import affinity_cpus, threads_for


def _spin() -> None:
    while True:
        pass


def _step(model, images, labels, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    out = model(images)[0]
    torch.nn.functional.cross_entropy(out, labels).backward()
    optimizer.step()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=int, default=None, help="busy processes (default: 4 per visible CPU)")
    parser.add_argument("--job_cpus", type=int, default=1, help="CPUs the job may use (its affinity)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3, help="training steps per timed call")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    visible = os.cpu_count() or 1
    default_threads = torch.get_num_threads()  # what torch chose at start
    load = visible * 4 if args.load is None else args.load
    allowed = sorted(os.sched_getaffinity(0))[: args.job_cpus]
    torch.manual_seed(0)
    model = make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=[16]).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 16, (args.batch, args.size, args.size))
    own_affinity, own_threads = os.sched_getaffinity(0), torch.get_num_threads()
    busy = [mp.Process(target=_spin, daemon=True) for _ in range(load)]
    for proc in busy:
        proc.start()
    try:
        os.sched_setaffinity(0, allowed)
        budget = threads_for(affinity_cpus(), 1, 0)
        variants = {f"torch default ({default_threads} threads)": default_threads,
                    f"budget ({budget} thread{'s' if budget > 1 else ''})": budget}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for name, threads in variants.items():  # warm-up
            torch.set_num_threads(threads)
            _step(model, images, labels, optimizer)
        for _ in range(args.rounds):
            for name, threads in variants.items():
                torch.set_num_threads(threads)
                start = time.perf_counter()
                for _ in range(args.iters):
                    _step(model, images, labels, optimizer)
                times[name].append((time.perf_counter() - start) / args.iters)
    finally:
        for proc in busy:
            proc.terminate()
        os.sched_setaffinity(0, own_affinity)  # a caller (a test) gets its process back as it was
        torch.set_num_threads(own_threads)
    medians = {name: statistics.median(v) for name, v in times.items()}
    (slow, t_slow), (fast, t_fast) = medians.items()
    print(f"{visible} visible CPUs, job limited to {len(allowed)} by its affinity, {load} busy processes, "
          f"ResNet-18 DeepLab-v3 train step, batch {args.batch} at {args.size} px, median of {args.rounds} rounds "
          f"of {args.iters} steps, torch {torch.__version__}")
    print(markdown_table(["variant", "s per step (median)"], [[n, f"{t:.3f}"] for n, t in medians.items()]))
    print(f"ratio {slow} / {fast}: {t_slow / t_fast:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
