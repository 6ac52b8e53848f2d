"""Export a held-out benchmark of the synthetic world (POPE splits, CHAIR files, images): one seeded command.

    python scripts/export_demo.py --difficulty prone --out attnkit/assets/demo/data_prone   # the shipped prone set
    python scripts/export_demo.py --out attnkit/assets/demo/data                            # the shipped clean set

The same arguments give byte-identical question and annotation files and pixel-identical images.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from attnkit.synth.export import DIFFICULTIES, ExportConfig, export_benchmark


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--difficulty", default="clean", choices=sorted(DIFFICULTIES))
    defaults = ExportConfig()
    for f in dataclasses.fields(ExportConfig):
        if f.name != "difficulty":
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name))
    args = ap.parse_args(argv)
    t0 = time.time()
    cfg = ExportConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExportConfig)})
    out = export_benchmark(args.out, cfg)
    print(f"wrote {out} ({cfg}) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
