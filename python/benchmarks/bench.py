"""Benchmarks of the Python package, side by side in one run (a table;
nothing is asserted): guard checks on torch tensors, and every default
blueprint's kernel run through the package against the same artifact
loaded with torch.jit.load and called directly.

    python python/benchmarks/bench.py [--state DIR] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import tezzeret

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}


def per_call_us(fn, batch: int, rounds: int) -> list:
    """Per-call times (µs) of `rounds` batches of `batch` calls (two clock
    reads per call would cost as much as a guard check)."""
    for _ in range(batch):
        fn()
    out = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(batch):
            fn()
        out.append((time.perf_counter_ns() - start) / batch / 1e3)
    return out


def inputs_of(entry) -> list:
    return [torch.randn(spec.shape).to(DTYPES.get(spec.dtype, torch.float32)) for spec in entry.inputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", help="state directory (default: a new temporary one)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = args.state or tempfile.mkdtemp(prefix="tezzeret-bench-py-")
    rounds = 50 if args.quick else 2000
    with tezzeret.Forge(state, device="cpu", telemetry_interval=0) as forge:
        summary = forge.run()
        catalog = {a["blueprint_id"]: a for a in forge.catalog()}
        table = forge.guard_table()
        print(f"tezzeret {tezzeret.__version__}, torch {torch.__version__}, {summary.ok + summary.cached} artifacts in {state}\n")
        print("| what | ours | reference | unit |\n| --- | ---: | ---: | --- |")
        x = torch.randn(8, 32, 16, 16)
        fast = per_call_us(lambda: table.matches("BP016", x), 100, rounds)
        full = per_call_us(lambda: table.check("BP016", x), 100, rounds)
        print(f"| guard_check p50 from Python on a torch tensor (GuardTable.matches) | {statistics.median(fast):.2f} | goal < 2 | µs |")
        print(f"| guard_check p50 with its verdict (GuardTable.check) | {statistics.median(full):.2f} | — | µs |")
        worst_ratio, worst_added = 0.0, 0.0
        rows = []
        for blueprint_id, artifact in sorted(catalog.items()):
            entry = table.lookup(blueprint_id)
            inputs = inputs_of(entry)
            direct_module = torch.jit.load(artifact["artifact_path"])
            direct_module.eval()
            with forge.load_kernel(blueprint_id) as kernel, torch.no_grad():
                kernel.run(*inputs)
                direct_module(*inputs)
                # Alternating rounds, paired: each round times both back to
                # back, and the ratio is the median of the rounds' ratios
                # (drift of the machine's speed cancels within a pair).
                n = 3 if args.quick else 41
                ours, direct, ratios = [], [], []
                for _ in range(n):
                    o = statistics.median(per_call_us(lambda: kernel.run(*inputs), 5, 1))
                    d = statistics.median(per_call_us(lambda: direct_module(*inputs), 5, 1))
                    ours.append(o)
                    direct.append(d)
                    ratios.append(o / d)
            o, d, r = statistics.median(ours), statistics.median(direct), statistics.median(ratios)
            rows.append((blueprint_id, artifact.get("name", ""), o, d, r))
            if d > 50:
                worst_ratio = max(worst_ratio, r)
            else:
                worst_added = max(worst_added, o - d)
        for blueprint_id, name, o, d, r in rows:
            print(f"| kernel run {blueprint_id} {name} through the package vs torch.jit.load called directly | {o:.1f} | {d:.1f} ({r:.2f}×) | µs |")
        print(f"| worst ratio, blueprints above 50 µs | {worst_ratio:.3f} | goal ≤ 1.1 | × |")
        print(f"| worst added time, blueprints up to 50 µs | {worst_added:.2f} | goal < 5 | µs |")
        table.close()


if __name__ == "__main__":
    main()
