"""One SuperNode's local training as an edge device would run it: seconds per local epoch and
peak memory, for a model and clip size.

Run it pinned to one core under a memory cap, as a stand-in for a Raspberry Pi / Jetson-class board:

    taskset -c 0 prlimit --as=3000000000 .venv/bin/python -m bench.edge_client --model tiny3d
    taskset -c 0 prlimit --as=3000000000 .venv/bin/python -m bench.edge_client --model mc3_18 --clip-len 8 --size 64

It trains the real ``VideoClient`` on partition 0 of 3 of the synthetic default (the same code a
SuperNode runs) with one intra-op thread, and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from fedapp.client.app import make_client
from fedapp.task.config import parse_config
from fedapp.task.models import build_model, count_parameters
from fedapp.task.train import state_arrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny3d")
    parser.add_argument("--clip-len", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="decode and crop size (square)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default="")
    args = parser.parse_args(argv)

    cfg = parse_config(
        {
            "model": args.model,
            "clip-len": args.clip_len,
            "resize": f"{args.size}x{args.size}",
            "crop-size": args.size,
            "batch-size": args.batch_size,
            "local-epochs": 1,
            "torch-threads": args.threads,
            "cache-dir": args.cache_dir,
        }
    )
    client = make_client(cfg, {"partition-id": 0, "num-partitions": 3})
    model = build_model(cfg.model, len(client.classes))
    start = time.perf_counter()
    _, videos, metrics = client.fit(state_arrays(model), {"server-round": 1})
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "model": args.model,
                "params-m": round(count_parameters(model) / 1e6, 2),
                "clip": f"{args.clip_len}x{args.size}x{args.size}",
                "batch-size": args.batch_size,
                "threads": args.threads,
                "videos": videos,
                "seconds-per-epoch": round(seconds, 1),
                "train-clips-per-s": round(metrics["clips-per-s"], 2),
                "peak-rss-mib": round(peak_mib),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
