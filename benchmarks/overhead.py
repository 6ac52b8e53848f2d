"""Overhead of wrapping: forward time of the wrapped model with no intervention over the unwrapped one.

    python benchmarks/overhead.py [--repeats 9] [--families llava qwen2_vl]

Mid-size configs of each family (random weights, real modeling code) on whatever device is present;
both variants are timed in the same run, interleaved. Target: ratio <= 1.02.
"""

from __future__ import annotations

import argparse

import torch

import attnkit
from attnkit import testing
from benchmarks.common import machine, mid_inputs, mid_model, paired


def overhead(family: str, repeats: int) -> dict[str, float]:
    model = mid_model(family)
    inputs = mid_inputs(family)
    handles = []

    def forward():
        with torch.no_grad():
            model(**inputs)

    r = paired(forward, lambda: handles.append(attnkit.wrap(model)), forward, lambda: handles.pop().remove(),
               repeats=repeats)
    return {"tokens": inputs["input_ids"].shape[1], **r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--families", nargs="+", default=list(testing.FAMILIES))
    args = parser.parse_args()
    print(f"device: {machine()}; torch {torch.__version__}")
    print("| family | tokens | unwrapped ms | wrapped (no-op) ms | median ratio |")
    print("|---|---|---|---|---|")
    for family in args.families:
        r = overhead(family, args.repeats)
        print(f"| {family} | {r['tokens']} | {r['plain'] * 1e3:.1f} | {r['run'] * 1e3:.1f} | {r['ratio']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
