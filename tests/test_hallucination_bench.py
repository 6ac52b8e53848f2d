"""benchmarks/hallucination.py: the table of the prone-split measurements, on hand-made row files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from attnkit.eval.benchmarks import get_benchmark
from attnkit.eval.bootstrap import paired_ci, significant
from attnkit.eval.fingerprint import HashCache, options_fingerprint, samples_fingerprint
from benchmarks import hallucination as hb

CHAIR = Path(__file__).parent / "data" / "chair"
N = 40   # questions per POPE split: 20 present, 20 absent
RESAMPLES = 200


def _data(tmp_path: Path) -> Path:
    """POPE (3 splits x N questions, images/) and the CHAIR fixture (val2014/) in one folder."""
    data = tmp_path / "data"
    shutil.copytree(CHAIR, data)
    (data / "images").mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(data / "images" / "a.png")
    for split in ("random", "popular", "adversarial"):
        with open(data / f"coco_pope_{split}.json", "w") as f:
            for q in range(N):
                f.write(json.dumps({"question_id": q, "image": "a.png", "text": f"Is there a thing {q}?",
                                    "label": "yes" if q < N // 2 else "no"}) + "\n")
    return data


def _write(folder: Path, bench, config: str, predictions: dict[str, str], data_hash: str | None = None) -> None:
    """A row file and its meta, as the runner writes them (only the fields the script reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{bench.name}__{re.sub(r'[^A-Za-z0-9.=+-]+', '_', config)}__{'other' if data_hash else 'rows'}"
    settings = {"model_path": "demo/model", "max_new_tokens": 4 if bench.name == "pope" else 48, "seed": 0,
                "dtype": "auto", "quantization": None}
    key = {"data": data_hash or samples_fingerprint(bench.samples(), HashCache(folder / "cache.json")),
           "options": options_fingerprint(bench.options)}
    (folder / f"{stem}.meta.json").write_text(json.dumps({"bench": bench.name, "config": config,
                                                          "settings": settings, "key": key}))
    with open(folder / f"{stem}.jsonl", "w") as f:
        for sid, text in predictions.items():
            f.write(json.dumps({"id": sid, "prediction": text}) + "\n")


def _pope_predictions(samples, wrong: set[str]) -> dict[str, str]:
    flip = {"yes": "No.", "no": "Yes."}
    return {s.id: flip[s.answer] if s.id in wrong else s.answer.capitalize() + "." for s in samples}


@pytest.fixture
def runs(tmp_path):
    data = _data(tmp_path)
    pope = get_benchmark("pope", data, **hb.OPTIONS["pope"])
    chair = get_benchmark("chair", data, **hb.OPTIONS["chair"])
    ps, cs = pope.samples(), chair.samples()
    # baseline: 10 of the 20 absent adversarial objects answered "yes"; pai: none; mma: the baseline + 1 flip
    adv_absent = [s.id for s in ps if s.split == "adversarial" and s.answer == "no"][:10]
    preds = {"baseline": _pope_predictions(ps, set(adv_absent)), "pai": _pope_predictions(ps, set()),
             "mma": _pope_predictions(ps, {*adv_absent, "random/0"})}
    for config, p in preds.items():
        _write(tmp_path / "runs" / "pope", pope, config, p)
    # rows of other data in the same folder: never read
    _write(tmp_path / "runs" / "pope", pope, "vcd", preds["pai"], data_hash="0" * 64)
    # an unfinished run: left out of the table
    _write(tmp_path / "runs" / "pope", pope, "vhr", dict(list(preds["pai"].items())[:50]))
    # CHAIR images 42 {person, dog}, 73 {bicycle, car}, 139 {dog, couch}: the baseline names one absent object in each
    captions = {"baseline": {"caption/42": "a man with a dog and a cat.", "caption/73": "a bicycle, a car and a dog.",
                             "caption/139": "a dog on a sofa with a car."},
                "pai": {"caption/42": "a man with a dog.", "caption/73": "a bicycle and a car.",
                        "caption/139": "a dog on a sofa."},
                "mma": {"caption/42": "a man with a dog and a cat.", "caption/73": "a car.", "caption/139": "a dog."}}
    assert sorted(captions["pai"]) == sorted(s.id for s in cs)
    for config, p in captions.items():
        _write(tmp_path / "runs" / "chair", chair, config, p)
    return tmp_path / "runs", data, pope, chair, preds, captions


def _rows(text: str) -> dict[str, list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| `")]
    return {ln.split("|")[1].strip().strip("`"): [c.strip() for c in ln.strip().strip("|").split("|")[1:]]
            for ln in lines}


def test_table_has_every_column_with_intervals_and_marks_only_significant_pairs(runs, capsys):
    folder, data, pope, chair, preds, captions = runs
    assert hb.main(["--runs", str(folder), "--data", str(data), "--resamples", str(RESAMPLES)]) == 0
    out, err = capsys.readouterr()
    header = next(ln for ln in out.splitlines() if ln.startswith("| config"))
    assert [h.strip() for h in header.strip("|").split("|")][1:] == [c[0] for c in hb.COLUMNS] + [
        "POPE answers changed"]
    rows = _rows(out)
    assert list(rows) == ["baseline", "mma", "pai"]          # the other data's "vcd" rows are skipped, and said so
    assert "skipping pope__vcd" in err and "left out 'vhr': 50 of 120 samples run" in err
    interval = re.compile(r"^(\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\]")
    for config, cells in rows.items():
        for (_, _, metric, _), text in zip(hb.COLUMNS, cells, strict=False):
            m = interval.match(text)
            assert m, (config, metric, text)
            assert float(m[2]) <= float(m[1]) <= float(m[3])
    base = rows["baseline"]
    assert base[2].startswith("0.750 ") and base[5].startswith("0.500 ")     # adversarial acc, yes | absent
    assert base[0].startswith("1.000 [1.000, 1.000]") and "▲" not in "".join(base) and "▼" not in "".join(base)
    # the marks are exactly where the paired interval excludes 0
    scores = {"pope": (hb.pope_score(pope), pope.samples(), preds), "chair": (chair.score, chair.samples(), captions)}
    for config in ("pai", "mma"):
        for (_, bench, metric, _), text in zip(hb.COLUMNS, rows[config], strict=False):
            score, samples, p = scores[bench]
            ci = paired_ci(score, samples, p["baseline"], p[config], resamples=RESAMPLES, seed=0)[metric]
            assert (("▲" in text) or ("▼" in text)) == significant(ci), (config, metric, text, ci)
    pai, mma = rows["pai"], rows["mma"]
    assert pai[2].endswith("+0.250 ▲") and pai[5].endswith("-0.500 ▲")       # 10 of 40 right; yes | absent down
    assert pai[0].endswith("+0.000")                                          # random: identical answers, no mark
    assert mma[0].endswith("-0.025")                                          # one flip in 40: not significant
    assert pai[6].endswith("▲")                                               # CHAIR_i 3/9 -> 0: significant
    assert pai[-1] == "10" and mma[-1] == "1"
    # the commands that write these rows
    assert (f"attnkit eval --model demo/model --bench pope --data {data} --bench-option prompt_suffix= "
            f"--max-new-tokens 4 --out {folder / 'pope'} --compare mma pai") in out
    assert f"attnkit eval --model demo/model --bench chair --data {data} --max-new-tokens 48" in out


def test_cell_marks_direction_and_only_when_the_interval_excludes_zero():
    assert hb.cell(0.9, (0.85, 0.95)) == "0.900 [0.850, 0.950]"
    assert hb.cell(0.9, (0.85, 0.95), 0.02, (0.01, 0.03)) == "0.900 [0.850, 0.950] +0.020 ▲"
    assert hb.cell(0.9, (0.85, 0.95), 0.02, (0.01, 0.03), higher_better=False) == "0.900 [0.850, 0.950] +0.020 ▼"
    assert hb.cell(0.9, (0.85, 0.95), 0.02, (0.0, 0.03)) == "0.900 [0.850, 0.950] +0.020"
    assert hb.cell(0.9, (0.85, 0.95), -0.02, (-0.04, 0.01)) == "0.900 [0.850, 0.950] -0.020"


def test_pope_score_adds_the_false_yes_rate_on_absent_objects(tmp_path):
    pope = get_benchmark("pope", _data(tmp_path), **hb.OPTIONS["pope"])
    samples = pope.samples()
    absent = [s for s in samples if s.split == "random" and s.answer == "no"]
    preds = {s.id: s.answer for s in samples}
    preds.update({absent[0].id: "Yes, there is.", absent[1].id: "maybe"})     # unparsed counts as "yes" (official)
    m = hb.pope_score(pope)(samples, preds)
    assert m["random/yes_absent"] == pytest.approx(2 / 20)
    assert m["popular/yes_absent"] == 0.0 and m["random/accuracy"] == pytest.approx(38 / 40)


def test_no_rows_exits_nonzero(tmp_path, capsys):
    data = _data(tmp_path)
    (tmp_path / "runs" / "pope").mkdir(parents=True)
    assert hb.main(["--runs", str(tmp_path / "runs"), "--data", str(data)]) == 1
    assert "no row files" in capsys.readouterr().err


def test_missing_baseline_or_unfinished_run_is_an_error(runs):
    folder, data, pope, _, preds, _ = runs
    samples = pope.samples()
    loaded = hb.load_runs(folder / "pope", pope, samples, log=lambda m: None)
    del loaded["baseline"]
    with pytest.raises(ValueError, match="no baseline rows"):
        hb.bench_stats(hb.pope_score(pope), samples, loaded, ["f1"], 10, 0)
    loaded = hb.load_runs(folder / "pope", pope, samples, log=lambda m: None)
    loaded["pai"][1].pop()
    with pytest.raises(ValueError, match="'pai' has no prediction for 1 sample"):
        hb.bench_stats(hb.pope_score(pope), samples, loaded, ["f1"], 10, 0)


def test_a_benchmark_without_baseline_rows_is_left_out(runs, capsys):
    folder, data, *_ = runs
    for path in (folder / "chair").glob("chair__baseline__*"):
        path.unlink()
    assert hb.main(["--runs", str(folder), "--data", str(data), "--resamples", "20"]) == 0
    out, err = capsys.readouterr()
    assert "no finished baseline rows: chair left out" in err
    header = next(ln for ln in out.splitlines() if ln.startswith("| config"))
    assert "CHAIR_i" not in header and "F1 (all)" in header


def test_order_is_baseline_then_methods_by_name_then_combinations():
    configs = ["vhr;pai", "var:p=0.4", "baseline", "cls-prune:keep=36", "var", "pai:alpha=0.5", "pai"]
    assert sorted(configs, key=hb._order) == ["baseline", "cls-prune:keep=36", "pai", "pai:alpha=0.5", "var",
                                              "var:p=0.4", "vhr;pai"]
