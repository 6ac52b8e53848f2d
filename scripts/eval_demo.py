"""Score a LLaVA-format model on an exported synthetic benchmark: POPE (3 splits) and CHAIR.

Straightforward reference code (greedy decoding, batched with left padding); attnkit's own
``attnkit eval`` should give the same numbers.

    python scripts/eval_demo.py                                   # shipped demo model + data
    python scripts/eval_demo.py --data prone --threads 1          # the shipped prone set (demo_data_path("prone"))
    python scripts/eval_demo.py --model runs/model --data /tmp/synth --limit 60
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from PIL import Image

from attnkit.synth.demo import DEMO_DATA, demo_data_path, demo_model_path
from attnkit.synth.model import prompt


def _batches(processor, images: list[Image.Image], texts: list[str], batch: int):
    """Processor inputs (chat prompt, left padding) for ``batch`` samples at a time."""
    for i in range(0, len(texts), batch):
        prompts = [prompt(processor, t) for t in texts[i:i + batch]]
        yield processor(images=images[i:i + batch], text=prompts, return_tensors="pt", padding=True)


def generate(model, processor, images: list[Image.Image], texts: list[str], max_new_tokens: int,
             batch: int = 16) -> list[str]:
    out: list[str] = []
    for inp in _batches(processor, images, texts, batch):
        with torch.no_grad():
            ids = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False)
        out += processor.tokenizer.batch_decode(ids[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)
    return [o.strip() for o in out]


def yes_probability(model, processor, images: list[Image.Image], texts: list[str], batch: int = 16) -> list[float]:
    """P("yes") / (P("yes") + P("no")) of the first answer token: how sure the model is, not just what it says."""
    yes, no = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
    out: list[float] = []
    for inp in _batches(processor, images, texts, batch):
        with torch.no_grad():
            logits = model(**inp).logits[:, -1]
        out += torch.softmax(logits[:, [yes, no]].float(), -1)[:, 0].tolist()
    return out


def pope_metrics(answers: list[str], labels: list[str]) -> dict[str, float]:
    """POPE's rule: an answer containing "no"/"not" is "no", anything else "yes"."""
    pred = ["no" if {"no", "not"} & set(re.findall(r"\w+", a.lower())) else "yes" for a in answers]
    tp = sum(p == "yes" and l == "yes" for p, l in zip(pred, labels, strict=True))
    fp = sum(p == "yes" and l == "no" for p, l in zip(pred, labels, strict=True))
    fn = sum(p == "no" and l == "yes" for p, l in zip(pred, labels, strict=True))
    precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
    acc = sum(p == l for p, l in zip(pred, labels, strict=True)) / len(labels)
    return {"acc": acc, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(1e-9, precision + recall),
            "yes_ratio": pred.count("yes") / len(pred), "n": len(labels)}


def chair_metrics(captions: dict[int, str], truth: dict[int, set[str]], synonyms: dict[str, str]) -> dict[str, float]:
    """CHAIR_i = hallucinated / mentioned objects, CHAIR_s = captions with one, recall = mentioned / present."""
    mentioned_n = halluc_n = halluc_caps = covered = present_n = 0
    for image_id, cap in captions.items():
        words = re.findall(r"\w+", cap.lower())
        mentioned = {synonyms[w] for w in words if w in synonyms}
        bad = mentioned - truth[image_id]
        mentioned_n += len(mentioned)
        halluc_n += len(bad)
        halluc_caps += bool(bad)
        covered += len(mentioned & truth[image_id])
        present_n += len(truth[image_id])
    return {"chair_s": halluc_caps / len(captions), "chair_i": halluc_n / max(1, mentioned_n),
            "recall": covered / max(1, present_n), "n": len(captions)}


def evaluate(model, processor, data: Path, prefix: str = "synth", limit: int | None = None) -> dict:
    results: dict = {}
    for split in ("random", "popular", "adversarial"):
        rows = [json.loads(x) for x in (data / f"{prefix}_pope_{split}.json").read_text().splitlines() if x.strip()]
        rows = rows[:limit]
        images = [Image.open(data / "images" / r["image"]).convert("RGB") for r in rows]
        answers = generate(model, processor, images, [r["text"] for r in rows], max_new_tokens=3)
        results[f"pope_{split}"] = pope_metrics(answers, [r["label"] for r in rows])
        p_yes = yes_probability(model, processor, images, [r["text"] for r in rows])
        absent = [p for p, r in zip(p_yes, rows, strict=True) if r["label"] == "no"]
        results[f"pope_{split}"]["p_yes_absent"] = sum(absent) / max(1, len(absent))  # the prior at work
    inst = json.loads((data / f"{prefix}_chair_instances.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    truth: dict[int, set[str]] = {im["id"]: set() for im in inst["images"]}
    for a in inst["annotations"]:
        truth[a["image_id"]].add(names[a["category_id"]])
    synonyms = {}
    for line in (data / f"{prefix}_chair_synonyms.txt").read_text().splitlines():
        words = [w.strip() for w in line.split(",") if w.strip()]
        synonyms.update({w: words[0] for w in words})
    prompts = [json.loads(x) for x in (data / f"{prefix}_chair_prompts.jsonl").read_text().splitlines() if x.strip()]
    prompts = prompts[:limit]
    images = [Image.open(data / "images" / p["image"]).convert("RGB") for p in prompts]
    caps = generate(model, processor, images, [p["text"] for p in prompts], max_new_tokens=48)
    results["chair"] = chair_metrics({p["image_id"]: c for p, c in zip(prompts, caps, strict=True)}, truth, synonyms)
    results["chair"]["example"] = caps[0]
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(demo_model_path()))
    ap.add_argument("--data", default="clean",
                    help=f"an exported folder, or a shipped set: {', '.join(DEMO_DATA)} (default clean)")
    ap.add_argument("--prefix", default="synth")
    ap.add_argument("--limit", type=int, default=None, help="first N questions / captions per file")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    data = demo_data_path(args.data) if args.data in DEMO_DATA else Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"--data {args.data!r} is neither a folder nor one of {', '.join(DEMO_DATA)}")
    torch.set_num_threads(args.threads)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    t0 = time.time()
    model = LlavaForConditionalGeneration.from_pretrained(args.model, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, local_files_only=True)
    res = evaluate(model, processor, data, args.prefix, args.limit)
    for name, m in res.items():
        print(name, " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v!r}" for k, v in m.items()))
    print(f"({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
