"""What every benchmark script's ``main`` does around its measurement: note how busy the shared
machine was, print the table, keep the raw numbers."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any


def run_benchmark(
    args: argparse.Namespace,
    benchmark: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
) -> int:
    """Measure, record the 1-minute load average before and after, print ``report``, write ``--json``."""
    load_before = os.getloadavg()[0]
    result = benchmark(args)
    load_after = os.getloadavg()[0]
    result["load-average-1min"] = [load_before, load_after]  # the machine is shared: how busy it was
    print(f"load average (1 min) before/after: {load_before:.2f} / {load_after:.2f}")
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0
