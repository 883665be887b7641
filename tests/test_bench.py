"""The benchmark's metrics (LongBench's, on hand-computed cases) and its published layout."""

from __future__ import annotations

import json

import pytest

from sglang_loopserve.bench import metrics, published
from sglang_loopserve.bench.published import Conversation, Turn


def test_normalize_answer_lowercases_strips_punctuation_and_articles():
    assert metrics.normalize_answer("The  Cat, sat on a MAT!") == "cat sat on mat"
    assert metrics.normalize_answer("An answer-key: theme") == "answerkey theme"  # 'the' only as a word


def test_qa_f1_by_hand():
    # pred {cat, sat}, gold {cat, sat, down}: P = 1, R = 2/3
    assert metrics.qa_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert metrics.qa_f1("dog", "cat") == 0.0
    assert metrics.qa_f1("", "cat") == 0.0
    # multiset: "cat cat" vs "cat": common 1, P = 1/2, R = 1
    assert metrics.qa_f1("cat cat", "cat") == pytest.approx(2 / 3)


def test_rouge_l_as_the_pinned_package_computes_it():
    # distinct words, LCS union {the, cat, on, mat} of 5 and 5
    assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-7)
    # case-sensitive, sentences split on '.': only "on the mat" matches, P = 3/6, R = 3/5
    assert metrics.rouge_l("The Cat sat. on the mat", "the cat is on the mat") == pytest.approx(6 / 11, abs=1e-7)
    # repeated words count once: n = 3 distinct, m = 2, LCS 2
    assert metrics.rouge_l("a b c a b", "a b") == pytest.approx(0.8, abs=1e-7)
    assert metrics.rouge_l("", "a b") == 0.0  # the package raises; LongBench scores 0
    assert metrics.rouge_l("...", "a b") == 0.0


def test_classification_with_longbench_skip():
    classes = ["Other", "number", "Other number", "Location"]
    assert metrics.classification("Location", "Location", all_classes=classes) == 1.0
    assert metrics.classification("Location or Other", "Location", all_classes=classes) == 0.5
    assert metrics.classification("Other", "Location", all_classes=classes) == 0.0
    # "Other" is dropped (part of the gold name), "number" escapes the check: 1/2
    assert metrics.classification("Other number", "Other number", all_classes=classes) == 0.5


def test_count_retrieval_first_line_and_exact_match():
    assert metrics.count("There are 3, or 5, or 3", "3") == pytest.approx(2 / 3)
    assert metrics.count("no digits", "3") == 0.0
    assert metrics.retrieval("Paragraph 12", "Paragraph 12") == 1.0
    assert metrics.retrieval("Paragraph 1 and 12", "Paragraph 12") == 0.5
    assert metrics.first_line("\n\nPositive\nmore text") == "Positive"
    assert metrics.score("qa_f1", "\n\nPositive\nnegative", ["negative"], first_line_only=True) == 0.0
    assert metrics.score("qa_f1", "\n\nPositive\nnegative", ["negative"]) == pytest.approx(2 / 3)
    assert metrics.exact_match("The value is 42.", "42") == 1.0
    assert metrics.exact_match("The value is 420.", "42") == 0.0


def test_score_takes_the_best_answer_and_rejects_bad_input():
    assert metrics.score("qa_f1", "Paris", ["London", "paris"]) == 1.0
    with pytest.raises(ValueError, match="metric"):
        metrics.score("bleu", "a", ["a"])
    with pytest.raises(ValueError, match="answers"):
        metrics.score("qa_f1", "a", [])
    assert metrics.dataset_score([1.0, 0.5, 0.0]) == 50.0
    assert metrics.dataset_score([1 / 3]) == 33.33


def test_agreement_first_differing_token():
    assert metrics.agreement([1, 2, 3], [1, 2, 3]) == (True, None)
    assert metrics.agreement([1, 2, 3], [1, 5, 3]) == (False, 1)
    assert metrics.agreement([1, 2, 3], [1, 2]) == (False, 2)


def _conversation() -> Conversation:
    q = "What is the key?"
    doc_a, doc_b = "Alpha text. " * 5, "Beta text. " * 5
    turn = Turn(prompts={"front": q + " " + doc_a + doc_b, "middle": doc_a + q + " " + doc_b,
                         "back": doc_a + doc_b + q},
                questions={"front": q, "middle": q, "back": q}, answers=["42"])
    return Conversation([turn, turn], dataset="kv", id="kv-0", metric="exact_match")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_published_layout_round_trip(tmp_path, suffix):
    conv = _conversation()
    path = tmp_path / f"set{suffix}"
    if suffix == ".parquet":
        import pandas as pd

        pd.DataFrame([conv.to_row()]).to_parquet(path)
    else:
        published.write([conv], path)
    (back,) = published.load(path)
    assert back.positions == ["front", "middle", "back"]
    assert back.turns[1].prompt("end") == conv.turns[1].prompts["back"]
    assert back.turns[0].answers == ["42"] and back.metric == "exact_match" and back.id == "kv-0"


def test_loader_reads_the_published_back_only_layout_with_row_answers(tmp_path):
    row = {"multi_turn": [{"prompt_back": "doc one. Q1?", "question_at_back": "Q1?"},
                          {"prompt_back": "doc two. Q2?", "question_at_back": "Q2?"}],
           "answers": [["a1"], ["a2", "b2"]]}
    path = tmp_path / "real.json"
    path.write_text(json.dumps({"data": [row]}))
    (conv,) = published.load(path)
    assert conv.positions == ["back"] and [t.answers for t in conv.turns] == [["a1"], ["a2", "b2"]]
    with pytest.raises(KeyError, match="front"):
        conv.turns[0].prompt("start")


def test_loader_names_the_keys_of_a_file_without_position_fields(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"multi_turn": [{"prompt": "x", "question": "y"}]}) + "\n")
    with pytest.raises(ValueError, match=r"no question-position fields.*\['prompt', 'question'\]"):
        published.load(path)
    path.write_text(json.dumps({"turns": []}) + "\n")
    with pytest.raises(ValueError, match=r"multi_turn.*\['turns'\]"):
        published.load(path)
    csv = tmp_path / "x.csv"
    csv.write_text("")
    with pytest.raises(ValueError, match="unknown file type"):
        published.load(csv)


def test_loader_checks_where_the_question_sits(tmp_path):
    path = tmp_path / "misplaced.jsonl"
    path.write_text(json.dumps({"multi_turn": [{"prompt_back": "Q? then doc", "question_at_back": "Q?"}]}) + "\n")
    with pytest.raises(ValueError, match="suffix of prompt_back"):
        published.load(path)
    with pytest.raises(ValueError, match="position"):
        published.position_name("top")
