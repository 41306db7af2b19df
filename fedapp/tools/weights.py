"""``fedvideo weights``: the pretrained torchvision weights a model can start from, where each file
is expected, and (``--download``, the only place the app downloads) fetching one into that cache.

    fedvideo weights                              # every model's weights, and which are cached
    fedvideo weights r3d_18 KINETICS400_V1        # the file's path (exit 1 while it is missing)
    fedvideo weights r3d_18 KINETICS400_V1 --download   # fetch it once (internet), hash checked

Runs read the file from the cache and never download: on a machine without internet, copy the
file named here into ``$TORCH_HOME/hub/checkpoints/`` (``~/.cache/torch/hub/checkpoints/``).
Only the server needs it; it sends the weights to the clients in round 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedapp.task.pretrained import PRETRAINED, weights_for, weights_path


def download(model: str, name: str) -> None:
    """Fetch the weights through torchvision (its URL, cache folder and hash check)."""
    import torchvision

    weights = torchvision.models.get_model_weights(weights_for(model, name).torchvision_model)[name]
    weights.get_state_dict(progress=True, check_hash=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedvideo weights", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model",
        nargs="?",
        choices=[m for m, names in PRETRAINED.items() if names],
        help="a model with torchvision weights (none: list every model's weights)",
    )
    parser.add_argument("name", nargs="?", help="torchvision's enum name, e.g. KINETICS400_V1")
    parser.add_argument("--download", action="store_true", help="fetch the file if it is not cached")
    args = parser.parse_args(argv)
    if args.model is None or args.name is None:
        if args.download:
            parser.error("--download needs a MODEL and a NAME")
        for model, names in PRETRAINED.items():
            for name, weights in names.items():
                if args.model in (None, model):
                    state = "cached" if weights_path(model, name).is_file() else "missing"
                    print(f"{model:<20} {name:<15} {weights.accuracy:<26} {state:<8} {weights_path(model, name)}")
        return 0
    try:
        path = weights_path(args.model, args.name)
    except KeyError as error:
        print(f"FAILED: {error.args[0]}", file=sys.stderr)
        return 2
    if not path.is_file() and args.download:
        try:
            download(args.model, args.name)
        except Exception as error:  # no network, a proxy, a hash mismatch: name it and the manual route
            print(
                f"FAILED: could not download {path.name} ({type(error).__name__}: {error}); copy the file from a "
                f"machine that has it to {path}",
                file=sys.stderr,
            )
            return 1
    if not path.is_file():
        print(f"missing: {path} (fetch it with `fedvideo weights {args.model} {args.name} --download`)")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
