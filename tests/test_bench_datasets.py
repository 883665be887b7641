"""The benchmark's offline data sets: deterministic, questions where their position says, answers
supported by the text."""

from __future__ import annotations

import pytest

from sglang_loopserve.bench import datasets, published
from sglang_loopserve.bench.generate import main as generate

N = 3


@pytest.fixture(scope="module")
def built():
    return {name: datasets.build(name, N, seed=5) for name in datasets.DATASETS}


def test_eleven_datasets_deterministic_from_the_seed(built):
    assert len(datasets.DATASETS) == 11
    for name, convs in built.items():
        again = datasets.build(name, N, seed=5)
        assert [c.to_row() for c in again] == [c.to_row() for c in convs], name
        other = datasets.build(name, N, seed=6)
        assert [c.to_row() for c in other] != [c.to_row() for c in convs], name


def test_three_turns_each_position_placed_and_history_growing(built):
    for name, convs in built.items():
        for conv in convs:
            assert len(conv.turns) == 3 and conv.positions == ["front", "middle", "back"], name
            history = 0
            for turn, want in zip(conv.turns, datasets.TURN_TOKENS):
                published.check_question_placement(turn)  # suffix / prefix / strictly inside
                q = turn.questions["back"]
                assert turn.prompts["front"].count(q) == turn.prompts["middle"].count(q) == 1, name
                tokens = datasets.approx_tokens(turn.prompts["back"])
                assert 0.8 * want <= tokens <= 1.5 * want, (name, tokens)
                history += tokens
                assert turn.answers and all(a for a in turn.answers), name
            assert 6000 <= history <= 9000, (name, history)


@pytest.mark.parametrize("scale", [0.05, 0.2])
def test_small_scales_still_place_every_question(scale):
    """Scaled-down turns (a CPU run of the whole grid) keep a middle to put the question in."""
    for name in datasets.DATASETS:
        for turn in datasets.build(name, 1, seed=1, scale=scale)[0].turns:
            published.check_question_placement(turn)


def test_answers_are_supported_by_the_text(built):
    extractive = ("single_doc_qa", "multi_doc_qa", "multi_hop_2", "multi_hop_3", "kv_retrieval")
    for name in extractive:
        for conv in built[name]:
            for turn in conv.turns:
                assert any(a in turn.prompts["back"] for a in turn.answers), name
    for conv in built["passage_retrieval"]:
        for turn in conv.turns:
            summary = turn.questions["back"].split('"')[1]
            (number,) = [p.split(":")[0] for p in turn.prompts["back"].split("\n\n")
                         if p.startswith("Paragraph ") and summary in p]
            assert turn.answers == [number]
    for conv in built["counting"]:
        for turn in conv.turns:
            color = turn.questions["back"].split("ledger ")[1].split("?")[0]
            assert turn.answers == [str(turn.prompts["back"].count(f"stamped the ledger {color}."))]
    for conv in built["dialogue_dependency"]:
        first = conv.turns[0].answers[0]
        # turn 3's answer is the version of turn 1's package, stated in turn 1's documents
        assert f"package {first}, version {conv.turns[2].answers[0]}:" in conv.turns[0].prompts["back"]
        assert "first answer" in conv.turns[2].questions["back"]
    for conv in built["few_shot"]:
        assert conv.metric == "classification" and conv.turns[0].answers[0] in conv.all_classes
        assert datasets.first_line_only("few_shot") and not datasets.first_line_only("single_doc_qa")


def test_generated_files_load_back(tmp_path):
    assert generate(["--out", str(tmp_path), "--n", "2", "--datasets", "kv_retrieval", "summarization"]) == 0
    kv = published.load(tmp_path / "kv_retrieval.jsonl")
    assert [c.to_row() for c in kv] == [c.to_row() for c in datasets.build("kv_retrieval", 2, seed=0)]
    assert published.load(tmp_path / "summarization.jsonl")[0].metric == "rouge_l"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="dataset"):
        datasets.build("squad", 1)
    with pytest.raises(ValueError, match="n must"):
        datasets.build("kv_retrieval", 0)
    with pytest.raises(ValueError, match="scale"):
        datasets.build("kv_retrieval", 1, scale=0)


#: sha256 of every set's first two conversations at seed 0, built from the committed snapshot: the
#: same bytes on every machine.  A deliberate change of the builder or of the snapshot changes it
#: (and makes new conversations: results name the snapshot's sha256).
BUILD_DIGEST = "c180c1fa969950e8bee8d7b422860543587489202f46cc9347c026d08c2843b3"

_DIGEST_CODE = """
import hashlib, json, sys, importlib.metadata
def refuse(*a, **k):
    raise AssertionError("the builder read the installed packages")
importlib.metadata.distributions = refuse
sys.modules["pydoc_data"] = sys.modules["pydoc_data.topics"] = None  # nor this Python's documentation
from sglang_loopserve.bench import datasets
h = hashlib.sha256()
for name in datasets.DATASETS:
    for c in datasets.build(name, 2, seed=0):
        h.update(json.dumps(c.to_row(), sort_keys=True, ensure_ascii=False).encode())
print(h.hexdigest())
"""


def test_builds_are_byte_identical_without_reading_this_machine():
    import subprocess
    import sys

    digests = [subprocess.run([sys.executable, "-c", _DIGEST_CODE], capture_output=True, text=True, timeout=300)
               for _ in range(2)]
    for d in digests:
        assert d.returncode == 0, d.stderr
    assert digests[0].stdout.strip() == digests[1].stdout.strip() == BUILD_DIGEST


def test_every_question_carries_its_answer_format(built):
    for name, convs in built.items():
        fmt = datasets.ANSWER_FORMAT[convs[0].metric]
        for conv in convs:
            for turn in conv.turns:
                for pos in ("front", "middle", "back"):
                    q = turn.questions[pos]
                    assert q.startswith("Question: ") and fmt in q, (name, pos)
    few = built["few_shot"][0].turns[0].questions["back"]
    assert few.endswith("\nTopic:")  # the item to label follows the instruction, as in the examples


def test_snapshot_can_be_taken_again(tmp_path):
    from sglang_loopserve.bench import sources

    sha = sources.take_snapshot(tmp_path / "s.json.gz")
    s = sources.load(tmp_path / "s.json.gz")
    assert s.sha256 == sha and len(s.packages) >= 50 and len(s.filler) >= 500
    assert all(len(p.description.split()) <= sources.DESCRIPTION_WORDS for p in s.packages)
