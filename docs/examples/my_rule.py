"""An aggregation rule of your own: set ``strategy = "fusion"`` and
``fusion-fn = "docs.examples.my_rule:clipped_mean"`` in the run config.

The rule is called as ``rule(models, weights)`` with the round's screened models (dicts of numpy
arrays by tensor name) and their sample counts, and returns the merged model, or ``(model, info)``
with what it decided (kept in the round record). This one is a robust mean: each model's distance
from the coordinate-wise median is clipped to the median distance before averaging.
"""

import numpy as np


def clipped_mean(models: list[dict[str, np.ndarray]], weights: list[float]) -> tuple[dict, dict]:
    floats = [k for k, v in models[0].items() if np.issubdtype(v.dtype, np.floating)]
    center = {k: np.median([m[k] for m in models], axis=0) for k in floats}
    distances = [np.sqrt(sum(np.sum((m[k] - center[k]) ** 2) for k in floats)) for m in models]
    radius = float(np.median(distances))
    scales = [min(1.0, radius / d) if d > 0 else 1.0 for d in distances]
    total = sum(weights)
    merged = dict(models[0])  # integer buffers (BatchNorm's step counters): the first model's
    for k in floats:
        merged[k] = center[k] + sum(w * s * (m[k] - center[k]) for m, w, s in zip(models, weights, scales)) / total
    return merged, {"radius": radius, "clipped": int(sum(s < 1 for s in scales))}
