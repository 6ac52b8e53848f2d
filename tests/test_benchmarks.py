"""Loaders on the fixtures in tests/data (published formats), malformed files, and score() end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from attnkit.eval.benchmarks import BENCHMARKS, Benchmark, BenchmarkFormatError, Sample, get_benchmark

DATA = Path(__file__).parent / "data"


def load(name: str, data_dir: Path | str = "", **kw) -> tuple[Benchmark, list[Sample]]:
    bench = get_benchmark(name, DATA / name if data_dir == "" else data_dir, **kw)
    return bench, bench.samples()


# -- registry ----------------------------------------------------------------------------------------------------------
def test_registry_and_unknown_names():
    assert set(BENCHMARKS) == {"pope", "chair", "mme", "amber"}
    with pytest.raises(ValueError, match=r"unknown benchmark 'vqa'; available: amber, chair, mme, pope"):
        get_benchmark("vqa", DATA)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\] for benchmark 'pope'.*image_dir"):
        get_benchmark("pope", DATA / "pope", colour="red")
    assert issubclass(BenchmarkFormatError, ValueError)


def test_options_from_command_line_strings():
    bench = get_benchmark("chair", DATA / "chair", n="2", seed="1", gt_captions="none", prompt="Describe.\\nBriefly.",
                          max_new_tokens="64")
    assert (bench.options["n"], bench.options["seed"], bench.options["gt_captions"]) == (2, 1, None)
    assert bench.options["prompt"] == "Describe.\nBriefly." and bench.max_new_tokens == 64
    assert BENCHMARKS["chair"].max_new_tokens == 512  # the override is per instance
    with pytest.raises(ValueError, match=r"option n='two': expected an integer"):
        get_benchmark("chair", DATA / "chair", n="two")


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_samples_are_json_serialisable_and_unique(name):
    _, samples = load(name)
    assert len({s.id for s in samples}) == len(samples)
    json.dumps([{**s.__dict__, "image": str(s.image)} for s in samples])


def test_higher_is_better_arrows():
    pope, chair = BENCHMARKS["pope"], BENCHMARKS["chair"]
    assert pope.is_higher_better("random/f1") is True
    assert pope.is_higher_better("yes_ratio") is None
    assert chair.is_higher_better("chair_i") is False and chair.is_higher_better("recall") is True


# -- POPE --------------------------------------------------------------------------------------------------------------
def test_pope_loads_three_splits_in_order():
    bench, samples = load("pope")
    assert [s.id for s in samples] == ["random/1", "random/2", "random/3", "random/4", "popular/1", "popular/2",
                                       "popular/3", "adversarial/1", "adversarial/2", "adversarial/3"]
    first = samples[0]
    assert first.image == DATA / "pope" / "images" / "red.png"
    assert first.question == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert (first.answer, first.split, first.meta["question_id"]) == ("yes", "random", 1)
    assert samples[3].image.name == "corrupt.png" and samples[3].image.is_file()  # garbage bytes: runner's problem
    assert samples[-1].image.name == "missing.png" and not samples[-1].image.exists()
    assert samples[-2].meta["line"] == 3  # the blank line 2 of the adversarial file is skipped but counted
    assert bench.max_new_tokens_for(first) == bench.max_new_tokens


def test_pope_splits_limit_and_options():
    _, samples = load("pope", splits=["adversarial", "random"], limit=2, prompt_suffix="")
    assert [s.id for s in samples] == ["adversarial/1", "adversarial/2", "random/1", "random/2"]
    assert samples[0].question == "Is there a boat in the image?"
    with pytest.raises(ValueError, match=r"split\(s\) \['test'\] not found.*available: random, popular, adversarial"):
        load("pope", splits=["test"])


def test_pope_liberal_file_names_and_image_dir(tmp_path):
    shutil.copy(DATA / "pope" / "coco_pope_random.json", tmp_path / "synth_pope_random.jsonl")
    _, samples = load("pope", tmp_path, image_dir=DATA / "pope" / "images")
    assert [s.id for s in samples] == ["random/1", "random/2", "random/3", "random/4"]
    assert samples[0].image == DATA / "pope" / "images" / "red.png"
    shutil.copy(DATA / "pope" / "coco_pope_popular.json", tmp_path / "aokvqa_pope_random.json")
    with pytest.raises(BenchmarkFormatError, match="dataset=<file prefix>"):
        load("pope", tmp_path)
    _, samples = load("pope", tmp_path, dataset="aokvqa")
    assert samples[0].question.startswith("Is there a person")


def test_pope_score_end_to_end():
    bench, samples = load("pope")
    predictions = {"random/1": "Yes", "random/2": "No, there is not.", "random/3": "There is no car.",
                   # random/4 (corrupt image) is an error row: no prediction
                   "popular/1": "yes", "popular/2": "Yes.", "popular/3": "I am not sure",
                   "adversarial/1": "hmm", "adversarial/2": "no", "adversarial/3": "yes"}
    m = bench.score(samples, predictions)
    assert m["random/accuracy"] == pytest.approx(2 / 3)  # tp 1, tn 1, fn 1
    assert (m["random/precision"], m["random/recall"]) == (pytest.approx(1.0), pytest.approx(1 / 2))
    assert m["random/yes_ratio"] == pytest.approx(1 / 3)
    assert m["popular/precision"] == pytest.approx(1 / 2)  # tp 1, fp 1, tn 1
    assert m["adversarial/accuracy"] == pytest.approx(1.0)  # "hmm" counts as yes (official), label yes
    assert m["adversarial/n_unparsed"] == 1
    # pooled: tp 4, fp 1, tn 3, fn 1
    assert m["accuracy"] == pytest.approx(7 / 9)
    assert m["f1"] == pytest.approx(0.8)
    assert m["yes_ratio"] == pytest.approx(5 / 9)
    assert (m["n"], m["n_missing"], m["n_unparsed"]) == (9, 1, 1)
    assert bench.primary_metric in m


# -- CHAIR -------------------------------------------------------------------------------------------------------------
def test_chair_loads_all_images_with_caption_objects():
    bench, samples = load("chair")
    assert [s.id for s in samples] == ["caption/42", "caption/73", "caption/139"]
    assert samples[0].image == DATA / "chair" / "val2014" / "COCO_val2014_000000000042.png"
    assert (samples[0].question, samples[0].answer, samples[0].split) == ("Please describe this image in detail.",
                                                                         42, "caption")
    assert [s.meta["gt_objects"] for s in samples] == [["dog", "person"], ["bicycle", "car"], ["couch", "dog"]]
    _, instances_only = load("chair", gt_captions=None)
    assert instances_only[2].meta["gt_objects"] == ["dog"]  # "sofa" came from the reference captions


def test_chair_image_list_and_sampling():
    _, samples = load("chair", image_list="image_list.txt", prompt="Describe.")
    assert [s.answer for s in samples] == [139, 42]
    assert samples[0].question == "Describe."
    _, drawn = load("chair", n=2, seed=3)
    _, again = load("chair", n=2, seed=3)
    assert [s.id for s in drawn] == [s.id for s in again] and len(drawn) == 2
    assert [s.answer for s in drawn] == sorted(s.answer for s in drawn)
    _, limited = load("chair", limit=1)
    assert [s.id for s in limited] == ["caption/42"]


def test_chair_liberal_names_and_local_synonyms(tmp_path):
    shutil.copy(DATA / "chair" / "instances_val2014.json", tmp_path / "synth_instances.json")
    (tmp_path / "synth_synonyms.txt").write_text("dog, hound\nperson, man\n")
    bench, samples = load("chair", tmp_path)
    assert [s.meta["gt_objects"] for s in samples] == [["dog", "person"], ["bicycle", "car"], ["dog"]]
    assert samples[0].image == tmp_path / "COCO_val2014_000000000042.png"  # no image folder: data_dir itself
    m = bench.score(samples[:1], {"caption/42": "A man and a hound on a couch."})  # couch is not in these synonyms
    assert (m["chair_i"], m["n_mentions"]) == (0.0, 2)


def test_chair_bad_image_list(tmp_path):
    (tmp_path / "list.txt").write_text("42\n\n999\n")
    with pytest.raises(BenchmarkFormatError, match=r"list.txt:3: field 'image' '999' is not an image"):
        load("chair", image_list=tmp_path / "list.txt")


def test_chair_score_end_to_end():
    bench, samples = load("chair")
    predictions = {"caption/42": "Two men and a dog on a couch.",  # couch hallucinated (1 of 3)
                   "caption/73": "A bicycle and a car parked on the street."}  # 0 of 2; caption/139: error row
    m = bench.score(samples, predictions)
    assert m["chair_s"] == pytest.approx(1 / 2)
    assert m["chair_i"] == pytest.approx(1 / 5)
    assert m["recall"] == pytest.approx(4 / 4)
    assert m["avg_len"] == pytest.approx((8 + 9) / 2)
    assert (m["n"], m["n_missing"]) == (2, 1)


# -- MME ---------------------------------------------------------------------------------------------------------------
def test_mme_loads_both_layouts():
    bench, samples = load("mme")
    assert list(dict.fromkeys(s.split for s in samples)) == ["existence", "artwork", "commonsense_reasoning"]
    assert len(samples) == 10
    s = samples[0]
    assert s.id == "existence/000000006040.png/0"
    assert s.image == DATA / "mme" / "existence" / "000000006040.png"
    assert s.question.startswith("Is there a train in this image? Please answer yes or no.\n")
    assert (s.answer, s.meta["line"]) == ("Yes", 1)
    art = [x for x in samples if x.split == "artwork"]
    assert art[0].image == DATA / "mme" / "artwork" / "images" / "10002.png"
    assert [x.answer for x in art] == ["Yes", "No", "No", "Yes"]
    assert samples[-1].answer == "No"  # CRLF line endings


def test_mme_release_folder_and_missing_image(tmp_path):
    release = tmp_path / "MME_Benchmark_release_version" / "count"
    release.mkdir(parents=True)
    shutil.copy(DATA / "mme" / "existence" / "000000006040.txt", release / "000000000001.txt")
    _, samples = load("mme", tmp_path)
    assert [s.id for s in samples] == ["count/000000000001.jpg/0", "count/000000000001.jpg/1"]
    assert not samples[0].image.exists()


def test_mme_score_end_to_end():
    bench, samples = load("mme")
    predictions = {"existence/000000006040.png/0": "Yes", "existence/000000006040.png/1": "Yes",  # 1 of 2
                   "existence/000000018150.png/0": "No", "existence/000000018150.png/1": "Yes",
                   "artwork/10002.png/0": "Yes", "artwork/10002.png/1": "No",
                   "artwork/10049.png/0": "No", "artwork/10049.png/1": "maybe",  # other: wrong
                   "commonsense_reasoning/0001.png/0": "Yes"}  # /1 is an error row
    m = bench.score(samples, predictions)
    assert (m["existence/acc"], m["existence/acc_plus"]) == (pytest.approx(3 / 4), pytest.approx(1 / 2))
    assert m["existence/score"] == pytest.approx(125.0)
    assert m["artwork/score"] == pytest.approx(125.0)
    assert m["commonsense_reasoning/score"] == pytest.approx(100.0)  # acc 1/1; its only image is incomplete
    assert m["perception"] == pytest.approx(250.0) and m["cognition"] == pytest.approx(100.0)
    assert (m["perception_subtasks"], m["cognition_subtasks"]) == (2, 1)
    assert (m["n"], m["n_missing"]) == (9, 1)


# -- AMBER -------------------------------------------------------------------------------------------------------------
def test_amber_loads_generative_and_discriminative():
    bench, samples = load("amber")
    assert [s.id for s in samples] == ["generative/1", "generative/2", "discriminative/3", "discriminative/4",
                                       "discriminative/5", "discriminative/6"]
    gen, disc = samples[0], samples[2]
    assert (gen.question, gen.answer, gen.meta["hallu"]) == ("Describe this image.", ["dog", "grass", "tree"],
                                                             ["cat", "ball"])
    assert gen.image == DATA / "amber" / "images" / "AMBER_1.png"
    assert (disc.answer, disc.meta["dimension"]) == ("yes", "existence")
    assert disc.question.startswith("Is there a dog in this image?\n")
    assert (bench.max_new_tokens_for(gen), bench.max_new_tokens_for(disc)) == (512, 16)


def test_amber_alternative_layouts(tmp_path):
    shutil.copytree(DATA / "amber" / "data", tmp_path, dirs_exist_ok=True)  # files directly in data_dir
    query = tmp_path / "query"
    rows = json.loads((query / "query_discriminative.json").read_text())
    (query / "query_discriminative.json").unlink()
    (query / "query_discriminative-existence.json").write_text(json.dumps(rows[:2]))
    (query / "query_discriminative-relation.json").write_text(json.dumps(rows[3:]))
    _, samples = load("amber", tmp_path, splits=["discriminative"])
    assert [s.id for s in samples] == ["discriminative/3", "discriminative/4", "discriminative/6"]


def test_amber_score_end_to_end():
    bench, samples = load("amber")
    predictions = {"generative/1": "Two dogs play on the grass under a tree next to a cat.",  # cat hallucinated
                   "generative/2": "A man holds an umbrella under the sun.",  # sun hallucinated
                   "discriminative/3": "Yes", "discriminative/4": "No", "discriminative/5": "Yes"}
    m = bench.score(samples, predictions)
    assert m["generative/chair"] == pytest.approx(2 / 7)
    assert m["generative/cover"] == pytest.approx(5 / 6)
    assert m["generative/hal"] == pytest.approx(1.0)
    assert m["generative/cog"] == pytest.approx(2 / 5)
    assert m["discriminative/accuracy"] == pytest.approx(2 / 3)
    assert (m["discriminative/precision"], m["discriminative/recall"]) == (pytest.approx(1.0), pytest.approx(1 / 2))
    assert m["discriminative/existence/f1"] == pytest.approx(1.0)
    assert m["discriminative/attribute/accuracy"] == 0.0
    assert m["amber_score"] == pytest.approx(((1 - 2 / 7) + 2 / 3) / 2)
    assert (m["n"], m["n_missing"]) == (5, 1)


# -- malformed files ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, folder, expected", [
    ("pope", "pope_bad_label", "coco_pope_random.json:3: field 'label' must be 'yes' or 'no', got 'maybe'"),
    ("pope", "pope_bad_json", "coco_pope_popular.json:2: invalid JSON"),
    ("pope", "pope_missing_field", "coco_pope_adversarial.json:2: field 'image' is missing"),
    ("chair", "chair_missing_field", "instances_val2014.json: field 'annotations[1].category_id' is missing"),
    ("mme", "mme_bad_answer", "000000000001.txt:2: field 'answer' must be 'Yes' or 'No', got 'Maybe'"),
    ("mme", "mme_no_tab", "000000000002.txt:1: expected 'question<TAB>Yes|No'"),
    ("amber", "amber_missing_hallu", "annotations.json: field '[0].hallu' is missing"),
])
def test_malformed_files_name_path_line_and_field(name, folder, expected):
    with pytest.raises(BenchmarkFormatError) as info:
        get_benchmark(name, DATA / "malformed" / folder).samples()
    message = str(info.value)
    assert str(DATA / "malformed" / folder) in message
    assert expected in message


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_benchmark("pope", tmp_path / "nope").samples()
    with pytest.raises(FileNotFoundError, match=r"no POPE question file"):
        get_benchmark("pope", tmp_path).samples()
