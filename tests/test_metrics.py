"""Metrics on hand-made predictions whose values are worked out by hand in each test."""

from __future__ import annotations

import pytest

from attnkit.eval.metrics import (
    AmberNounExtractor,
    CaptionObjectExtractor,
    MMEResult,
    amber_discriminative,
    amber_generative,
    amber_vocabulary,
    chair_metrics,
    load_synonyms,
    mme_scores,
    parse_mme_answer,
    parse_yes_no,
    pope_metrics,
    singularize,
)


# -- yes/no parsing ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"),
    ("No.", "no"),
    ("Yes, there is a dog in the image.", "yes"),
    ("There is no dog in the image.", "no"),
    ("Not really", "no"),
    ("The answer is NO", "no"),  # case-insensitive (the official script only matches "No"/"no"/"not")
    ("Yes. But there is no cat.", "yes"),  # only the first sentence counts
    ("No\nthere is not", "no"),  # whitespace other than spaces separates words
    ("I cannot tell", None),  # "cannot" is not "not": unparseable (official: counted as yes)
    ("Nobody knows", None),
    ("", None),
])
def test_parse_yes_no_follows_pope_convention(text, expected):
    assert parse_yes_no(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("  No", "no"),
    ("Not sure", "no"),  # "no" within the first 4 characters, as MME's script
    ("The answer is yes", None),  # nothing in "the ": other, always wrong
    ("", None),
])
def test_parse_mme_answer_uses_first_four_characters(text, expected):
    assert parse_mme_answer(text) == expected


# -- POPE --------------------------------------------------------------------------------------------------------------
LABELS = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
PREDS = ["yes", "no", "yes", "yes", "no", "no", None, "yes"]


def test_pope_metrics_counts_and_rates():
    # None -> "yes": TP = 0,2,7 (3); FN = 1 (1); FP = 3,6 (2); TN = 4,5 (2)
    m = pope_metrics(LABELS, PREDS)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 2)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))  # = 2/3
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(5 / 8)
    assert (m["n"], m["n_unparsed"]) == (8, 1)


def test_pope_metrics_unparsed_as_no():
    m = pope_metrics(LABELS, PREDS, unparsed_as="no")  # index 6 becomes a true negative
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 3)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["yes_ratio"] == pytest.approx(4 / 8)


def test_pope_yes_ratio_is_of_predictions_not_ground_truth():
    m = pope_metrics(["yes", "no", "yes", "no"], ["no"] * 4)
    assert m["yes_ratio"] == 0.0  # lmms-eval would report 0.5 (the ground truth's share)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)  # no division error


# -- MME ---------------------------------------------------------------------------------------------------------------
def test_mme_scores_acc_plus_and_totals():
    results = [
        MMEResult("existence", "a.jpg", "yes", "yes"),
        MMEResult("existence", "a.jpg", "no", "yes"),  # image a: 1 of 2 right -> not counted in acc+
        MMEResult("existence", "b.jpg", "no", "no"),
        MMEResult("existence", "b.jpg", "yes", "yes"),
        MMEResult("artwork", "c.jpg", "yes", "yes"),
        MMEResult("artwork", "c.jpg", "no", None),  # unparsed: wrong
        MMEResult("code_reasoning", "d.png", "yes", "yes"),
        MMEResult("code_reasoning", "d.png", "no", None, missing=True),  # error row: d leaves acc+
    ]
    m = mme_scores(results)
    assert m["existence/acc"] == pytest.approx(3 / 4)
    assert m["existence/acc_plus"] == pytest.approx(1 / 2)
    assert m["existence/score"] == pytest.approx(125.0)
    assert (m["artwork/acc"], m["artwork/acc_plus"], m["artwork/n_unparsed"]) == (0.5, 0.0, 1)
    assert m["artwork/score"] == pytest.approx(50.0)
    assert (m["code_reasoning/acc"], m["code_reasoning/acc_plus"], m["code_reasoning/n"]) == (1.0, 0.0, 1)
    assert m["perception"] == pytest.approx(175.0)
    assert m["cognition"] == pytest.approx(100.0)
    assert (m["perception_subtasks"], m["cognition_subtasks"]) == (2, 1)


# -- CHAIR -------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extractor() -> CaptionObjectExtractor:
    return CaptionObjectExtractor()


def test_shipped_synonyms_cover_the_80_coco_categories():
    synonyms = load_synonyms()
    assert len(synonyms) == 80
    assert {"person", "hot dog", "teddy bear", "cell phone", "dining table", "hair drier"} <= set(synonyms)
    assert "sofa" in synonyms["couch"] and "puppy" in synonyms["dog"]


def test_extractor_plurals_and_synonyms(extractor):
    cats, mentions = extractor("Two men and a dog on a couch.")
    assert cats == {"person", "dog", "couch"}
    assert [(m.word, m.category, m.position) for m in mentions] == [("man", "person", 1), ("dog", "dog", 4),
                                                                    ("couch", "couch", 7)]


@pytest.mark.parametrize("caption, expected", [
    ("A baby elephant walks.", ["elephant"]),  # "baby" qualifies the animal: no person
    ("An adult giraffe and a baby.", ["giraffe", "person"]),
    ("A passenger train at the station.", ["train"]),
    ("A toilet seat is up.", ["toilet"]),  # not a chair
    ("The seat of the toilet.", ["toilet"]),  # "seat" dropped when a toilet is mentioned
    ("Traffic lights and hot dogs.", ["traffic light", "hot dog"]),  # not a dog
    ("Wine glasses, cell phones and teddy-bears.", ["wine glass", "cell phone", "teddy bear"]),
    ("A train track through the grass.", []),  # "train track" is not a train
    ("Ponies, buses, knives and people.", ["horse", "bus", "knife", "person"]),
    ("A man is skiing with skis.", ["person", "skis"]),
])
def test_extractor_phrases_and_rules(extractor, caption, expected):
    assert [m.category for m in extractor(caption).mentions] == expected


def test_extractor_with_custom_synonyms():
    extract = CaptionObjectExtractor({"dog": ["hound"], "traffic cone": ["cone", "pylon"]})
    assert [m.category for m in extract("Hounds near traffic cones and a pylon, but no cat.").mentions] == [
        "dog", "traffic cone", "traffic cone"]


def test_singularize_prefers_vocabulary():
    vocab = {"bus", "phone", "phon", "skis", "glass", "pony", "knife"}
    assert [singularize(w, vocab) for w in ("buses", "phones", "skis", "glasses", "ponies", "knives", "men")] == [
        "bus", "phone", "skis", "glass", "pony", "knife", "man"]


def test_chair_metrics_exact_fractions(extractor):
    captions = ["Two men and a dog on a couch.",  # person, dog, couch(H) vs {person, dog}
                "A man rides a bicycle next to his bikes.",  # person, bicycle, bicycle vs {person, bicycle, car}
                "A puppy on a sofa with a teddy bear."]  # dog, couch(H), teddy bear(H) vs {dog}
    gts = [{"person", "dog"}, {"person", "bicycle", "car"}, {"dog"}]
    mentions = [[m.category for m in extractor(c).mentions] for c in captions]
    assert mentions[1] == ["person", "bicycle", "bicycle"]
    m = chair_metrics(mentions, gts, [len(c.split()) for c in captions])
    assert m["chair_s"] == pytest.approx(2 / 3)
    assert m["chair_i"] == pytest.approx(3 / 9)
    assert m["recall"] == pytest.approx((2 + 2 + 1) / (2 + 3 + 1))
    assert m["avg_len"] == pytest.approx((8 + 9 + 9) / 3)
    assert (m["n"], m["n_mentions"], m["n_hallucinated"]) == (3, 9, 3)


def test_chair_metrics_without_mentions_is_zero_not_an_error():
    m = chair_metrics([[]], [{"dog"}])
    assert (m["chair_s"], m["chair_i"], m["recall"]) == (0.0, 0.0, 0.0)


# -- AMBER -------------------------------------------------------------------------------------------------------------
ASSOCIATION = {"dog": [], "cat": [], "grass": ["ground"], "tree": ["forest", "leave", "bush"], "ball": [],
               "man": ["person", "people", "boy"], "umbrella": [], "sky": [], "car": ["vehicle"], "sun": [],
               "light": [], "can": [], "watch": []}


def test_amber_generative_small_case():
    nouns = [["dog", "ground", "cat", "light", "table"],  # table: not in the vocabulary, ignored
             ["person", "umbrella"]]
    truths = [["dog", "grass", "tree"], ["man", "umbrella", "sky"]]
    hallus = [["cat", "ball"], ["car", "dog", "sun"]]
    m = amber_generative(nouns, truths, hallus, ASSOCIATION, safe_words={"light"})
    # response 1: dog covers dog, ground covers grass (associated), cat hallucinated (and covers hallu "cat"),
    # light is a safe word (counted, not hallucinated). Response 2: person covers man, umbrella covers umbrella.
    assert m["chair"] == pytest.approx(1 / 6)
    assert m["cover"] == pytest.approx(4 / 6)
    assert m["hal"] == pytest.approx(1 / 2)
    assert m["cog"] == pytest.approx(1 / 5)
    assert (m["n"], m["n_words"], m["n_hallucinated"]) == (2, 6, 1)


def test_amber_repeated_truth_object_is_covered_once():
    m = amber_generative([["dog", "dog"]], [["dog", "dog"]], [["cat"]], ASSOCIATION)
    assert m["cover"] == pytest.approx(1 / 2)  # the script marks the first matching entry only


def test_amber_noun_extractor_context_rules():
    extract = AmberNounExtractor(amber_vocabulary(ASSOCIATION))
    assert extract("Two dogs play near the trees while they watch a can.") == ["dog", "tree", "can"]
    assert extract("You can see leaves, a man's umbrella and the hot sun.") == ["leave", "man", "umbrella", "sun"]


def test_amber_discriminative_no_is_positive():
    truths = ["yes", "no", "no", "yes", "no"]
    preds = ["yes", "no", "yes", None, "no"]
    # "no" answers: 1, 4 (both right) -> precision 2/2; "no" truths: 1, 2, 4 -> recall 2/3; correct: 0, 1, 4
    m = amber_discriminative(truths, preds)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.8)
    assert m["n_unparsed"] == 1
