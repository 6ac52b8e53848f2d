"""Compare interventions on the hallucination benchmarks (POPE + CHAIR) with one model load, from Python.

    python examples/compare_hallucination.py                     # the embedded demo model and data
    python examples/compare_hallucination.py --model /models/llava-1.5-7b-hf \\
        --pope /data/pope --chair /data/coco --compare baseline "cls-prune:keep=64" var --limit 500

Each benchmark's rows, summary.json, report.md and plots land in OUT/<bench>/; rerunning resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attnkit.eval import report, runner
from attnkit.eval.benchmarks import get_benchmark
from attnkit.eval.loading import load_model_and_processor


def demo_benchmarks(limit: int):
    from attnkit.synth.demo import demo_data_path, demo_model_path

    data = demo_data_path()
    pope = get_benchmark("pope", data, limit=limit, prompt_suffix="")
    chair = get_benchmark("chair", data, limit=limit, annotations=str(data / "synth_chair_instances.json"),
                          gt_captions=str(data / "synth_chair_captions.json"),
                          synonyms=str(data / "synth_chair_synonyms.txt"), image_dir=str(data / "images"),
                          max_new_tokens=48)
    return demo_model_path(), [pope, chair]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local model folder (default: the demo model)")
    p.add_argument("--pope", help="POPE folder (*_pope_<split>.json + images)")
    p.add_argument("--chair", help="COCO folder for CHAIR (instances_*.json, captions_*.json, val2014/)")
    p.add_argument("--compare", nargs="+", default=["baseline"], help='configs, e.g. baseline "cls-prune:keep=64"')
    p.add_argument("--limit", type=int, default=20, help="samples per split")
    p.add_argument("--out", default="attnkit_runs/hallucination")
    args = p.parse_args()

    if args.model:
        model_path = Path(args.model)
        benches = [get_benchmark("pope", args.pope, limit=args.limit)] if args.pope else []
        benches += [get_benchmark("chair", args.chair, n=args.limit)] if args.chair else []
    else:
        model_path, benches = demo_benchmarks(args.limit)
    if not benches:
        p.error("give --pope and/or --chair with --model")

    model, processor = load_model_and_processor(model_path)          # one load for every benchmark and config
    settings = runner.RunSettings(str(model_path))
    for bench in benches:
        out = Path(args.out) / bench.name
        runner.evaluate(bench, args.compare, out, settings, model=model, processor=processor)
        print(report.write_report(out).split("\n![", 1)[0])


if __name__ == "__main__":
    main()
