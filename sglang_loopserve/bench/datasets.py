"""Eleven multi-turn long-context data sets, built offline from a frozen snapshot of real text.

No hub access: the text is Python's own documentation (``pydoc_data.topics``)
and Python packages' metadata (name, version, summary, license,
requirements, classifiers, long description: real, human-written facts with
exact answers), frozen in ``sources.SNAPSHOT`` so that a seed gives
byte-identical conversations on every machine (tests check it).

Each conversation has 3 turns; each turn adds new documents (about 2K, 2K
and 3K tokens at ``scale`` 1, so the history reaches ~2K/4K/7K tokens for the
embedded 8K model; with Qwen2.5's tokenizer ``scale`` 1.2 reaches ~8K and 2.4
~16K by the last turn), asks one question (with LongBench's answer-format
instruction), and
exists with the question at the front, middle (at a paragraph boundary near
the centre) and back of the turn.  Evidence paragraphs sit at random places
among filler paragraphs of the documentation.

| data set | question | metric |
|---|---|---|
| single_doc_qa | a field (license, version) of one described package | qa_f1 |
| multi_doc_qa | which of many described packages has a given summary | qa_f1 |
| multi_hop_2 | the license of the package with a given summary | qa_f1 |
| multi_hop_3 | the version of the first requirement of the package with a given summary | qa_f1 |
| passage_retrieval | which of the numbered package descriptions has a given summary | retrieval |
| kv_retrieval | the value of a key among many planted key-value lines | exact_match |
| variable_tracking | the variables that end up holding a value (chains of assignments) | qa_f1 |
| counting | how many times one shuffled log stamps a colour | count |
| summarization | a package's one-line summary from its long description | rouge_l |
| few_shot | a package's topic classifier (classes named), after labelled examples | classification (first line) |
| dialogue_dependency | turn 3 asks about the package the model named in turn 1 | qa_f1 |
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import sources
from .published import Conversation, Turn
from .sources import Package

#: New context per turn, in tokens at scale 1 (history ~2K / 4K / 7K before each answer).
TURN_TOKENS = (2000, 2000, 3000)


#: Answer lengths in tokens, LongBench's ``dataset2maxlen`` for the task each set stands in for:
#: single-document QA as multifieldqa_en (64), multi-document and multi-hop QA as hotpotqa,
#: 2wikimqa and musique (32), retrieval and counting as passage_retrieval_en and passage_count (32),
#: one-sentence summaries as samsum (128), few-shot classification as trec (64).
ANSWER_TOKENS = {
    "single_doc_qa": 64, "multi_doc_qa": 32, "multi_hop_2": 32, "multi_hop_3": 32, "passage_retrieval": 32,
    "kv_retrieval": 32, "variable_tracking": 32, "counting": 32, "summarization": 128, "few_shot": 64,
    "dialogue_dependency": 32,
}
#: The answer-format instruction that follows each question, in LongBench's words (its QA prompts:
#: "Only give me the answer and do not output any other words."), per metric.
ANSWER_FORMAT = {
    "qa_f1": "Answer the question based on the given documents. Only give me the answer and do not output "
             "any other words.",
    "exact_match": "Answer the question based on the given records. Only give me the answer and do not output "
                   "any other words.",
    "retrieval": "The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc. Only give me the answer "
                 "and do not output any other words.",
    "count": "The output format should only contain the number, such as 1, 2, 3, and so on. Do not output any "
             "other words.",
    "rouge_l": "Only give me the one-sentence summary and do not output any other words.",
    "classification": "Only give me the topic and do not output any other words.",
}


def answer_tokens(dataset: str, metric: str | None = None) -> int:
    """The answer length of ``dataset`` (a set of published-layout files: by its metric, QA's 32)."""
    if dataset in ANSWER_TOKENS:
        return ANSWER_TOKENS[dataset]
    return {"rouge_l": 128, "classification": 64}.get(metric or "qa_f1", 32)


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (English prose, BPE vocabularies: ~4 characters a token)."""
    return max(1, len(text) // 4)


# ------------------------------------------------------------------ facts
@dataclass
class Fact:
    """One turn's question, its gold answers and the paragraphs it needs in the context."""

    question: str
    answers: list[str]
    evidence: list[str]
    metric: str
    all_classes: list[str] = field(default_factory=list)
    first_line_only: bool = False
    target: str | None = None  # passage retrieval: the paragraph to find (all paragraphs get numbers)
    subject: Package | None = None  # the package the answer names (dialogue dependency)
    cue: str = ""  # what follows the question's format instruction (few-shot: the item to label)


def _pick(rng, items, n=1, avoid=()):
    pool = [x for x in items if x not in avoid]
    if len(pool) < n:
        raise RuntimeError(f"this environment offers {len(pool)} candidates, {n} needed")
    return rng.sample(pool, n)


def _single_doc(rng, pk, turn, state):
    p, = _pick(rng, [x for x in pk if x.license], avoid=state["used"])
    if rng.random() < 0.5:
        return Fact(f"Under which license is the Python package {p.name} distributed? Answer with the license "
                    f"name only.", [p.license], [p.paragraph(300)], "qa_f1", subject=p)
    return Fact(f"Which version of the Python package {p.name} do the documents describe? Answer with the "
                f"version number only.", [p.version], [p.paragraph(300)], "qa_f1", subject=p)


def _multi_doc(rng, pk, turn, state):
    docs = _pick(rng, pk, 6, avoid=state["used"])
    p = docs[0]
    rng.shuffle(docs)
    return Fact(f"Which Python package is described as \"{p.summary.rstrip('.')}\"? Answer with its name "
                f"only.", [p.name], [d.paragraph(90) for d in docs], "qa_f1", subject=p)


def _hop2(rng, pk, turn, state):
    p, = _pick(rng, [x for x in pk if x.license], avoid=state["used"])
    return Fact(f"Under which license is the Python package described as \"{p.summary.rstrip('.')}\" "
                f"distributed? Answer with the license name only.", [p.license], [p.paragraph(90)], "qa_f1",
                subject=p)


def _hop3(rng, pk, turn, state):
    by_name = {x.name.lower().replace("_", "-"): x for x in pk}
    chains = [(a, by_name[a.requires[0].lower().replace("_", "-")]) for a in pk
              if a.requires and a.requires[0].lower().replace("_", "-") in by_name
              and a.requires[0].lower().replace("_", "-") != a.name.lower().replace("_", "-")]
    a, b = _pick(rng, chains, avoid=[c for c in chains if c[0] in state["used"]])[0]
    return Fact(f"The Python package described as \"{a.summary.rstrip('.')}\" requires some packages. "
                f"Which version of the first package it requires do the documents describe? Answer with "
                f"the version number only.", [b.version], [a.paragraph(90), b.paragraph(90)], "qa_f1",
                subject=b)


def _retrieval(rng, pk, turn, state):
    docs = _pick(rng, pk, 8, avoid=state["used"])
    target = docs[0].paragraph(90)
    paras = [d.paragraph(90) for d in docs]
    rng.shuffle(paras)
    return Fact(f"One of the numbered paragraphs describes a Python package as \"{docs[0].summary.rstrip('.')}\". "
                f"Which paragraph is it? Answer in the form \"Paragraph N\".", [], paras, "retrieval",
                target=target, subject=docs[0])


def _kv(rng, pk, turn, state):
    pairs = [(f"{rng.getrandbits(64):016x}", f"{rng.getrandbits(64):016x}") for _ in range(24)]
    k, v = pairs[rng.randrange(len(pairs))]
    lines = [f"Record: the key {a} maps to the value {b}." for a, b in pairs]
    return Fact(f"In the records, which value does the key {k} map to? Answer with the value only.", [v],
                lines, "exact_match")


def _variables(rng, pk, turn, state):
    value = str(rng.randrange(10000, 99999))
    names = [f"V{rng.randrange(100, 999)}{chr(65 + i)}" for i in range(rng.randrange(3, 5))]
    lines = [f"Note: VAR {names[0]} = {value}."]
    lines += [f"Note: VAR {names[i]} = VAR {names[rng.randrange(i)]}." for i in range(1, len(names))]
    decoys = [f"Note: VAR X{rng.randrange(100, 999)}{chr(75 + i)} = {rng.randrange(10000, 99999)}." for i in range(3)]
    return Fact(f"Which variables are assigned the value {value}, directly or through other variables? List "
                f"their names separated by spaces.", [" ".join(names)], lines + decoys, "qa_f1")


def _counting(rng, pk, turn, state):
    # One log among the filler, entries in a random order: the count needs the whole log, not one
    # line.  Calibrated to the quality model: scattered over the context as single lines (1-6 of
    # each of 3 colours), full attention scored 0 at every position.
    colors = ["red", "green", "blue"]
    counts = {c: rng.randrange(1, 5) for c in colors}
    target = rng.choice(colors)
    entries = [c for c in colors for _ in range(counts[c])]
    rng.shuffle(entries)
    log = "The auditor's log for the day: " + " ".join(
        f"Entry {i + 1}: the auditor stamped the ledger {c}." for i, c in enumerate(entries))
    return Fact(f"According to the auditor's log, how many times did the auditor stamp the ledger {target}?",
                [str(counts[target])], [log], "count")


def _supported_summary(p: Package) -> bool:
    """Whether most of the summary's words open the description: a one-sentence summary of it can
    then be scored against the package's own summary (ROUGE-L).  Calibrated to the quality model:
    over any description, its summaries scored 3-32 against the packages' own."""
    words = {w.lower().strip(".,:;()") for w in p.summary.split()}
    opening = {w.lower().strip(".,:;()") for w in p.description.split()[:80]}
    return len(words) >= 4 and len(words & opening) >= 0.6 * len(words)


def _summary(rng, pk, turn, state):
    p, = _pick(rng, [x for x in pk if len(x.description.split()) >= 150 and _supported_summary(x)],
               avoid=state["used"])
    doc = f"Description of the Python package {p.name}: " + " ".join(p.description.split()[:400])
    return Fact(f"Summarize in one sentence what the Python package {p.name} is, from its description.",
                [p.summary], [doc], "rouge_l", subject=p)


def _few_shot(rng, pk, turn, state):
    labelled = [x for x in pk if len(x.topics) == 1]
    classes = sorted({x.topics[0] for x in labelled})
    query, = _pick(rng, labelled, avoid=state["used"])
    shots = _pick(rng, labelled, min(16, len(labelled) - 1), avoid=[query])
    lines = [f"Description: {s.summary.rstrip('.')}\nTopic: {s.topics[0]}" for s in shots]
    # The classes are named (as TREC's are known to LongBench's models): without them the quality
    # model made up labels ("Audio Library") and scored 0 at every position.
    return Fact(f"Give the topic of the last description, as in the examples: one of {', '.join(classes)}.",
                [query.topics[0]], lines,
                "classification", all_classes=classes, first_line_only=True, subject=query,
                cue=f"\nDescription: {query.summary.rstrip('.')}\nTopic:")


def _dialogue(rng, pk, turn, state):
    if turn == 0:
        fact = _multi_doc(rng, pk, turn, state)
        state["first"] = fact.subject
        return fact
    if turn == 1:
        return _single_doc(rng, pk, turn, state)
    p = state["first"]
    return Fact("In your first answer you named a Python package. Which version of that package do the "
                "documents of my first message describe? Answer with the version number only.", [p.version], [],
                "qa_f1", subject=p)


#: name -> how a turn's fact is drawn (rng, packages, turn index, per-conversation state).
BUILDERS: dict[str, Callable] = {
    "single_doc_qa": _single_doc, "multi_doc_qa": _multi_doc, "multi_hop_2": _hop2, "multi_hop_3": _hop3,
    "passage_retrieval": _retrieval, "kv_retrieval": _kv, "variable_tracking": _variables,
    "counting": _counting, "summarization": _summary, "few_shot": _few_shot,
    "dialogue_dependency": _dialogue,
}
DATASETS = tuple(BUILDERS)


# ------------------------------------------------------------------ turns
def _context(rng, fact: Fact, target_tokens: int, count_tokens, filler) -> list[str]:
    """Evidence paragraphs at random places among filler paragraphs, about ``target_tokens`` long."""
    paras = list(fact.evidence)
    budget = target_tokens - sum(count_tokens(p) for p in paras)
    start = rng.randrange(len(filler))
    i = 0
    # At least two paragraphs, whatever the size: the middle position needs a boundary.
    while (budget > 0 or len(paras) < 2) and i < len(filler):
        para = filler[(start + i) % len(filler)]
        i += 1
        cost = count_tokens(para)
        if cost > budget + 150 and len(paras) >= 2:  # would overshoot the turn's size: the next one
            continue
        paras.insert(rng.randrange(len(paras) + 1), para)
        budget -= cost
    if fact.target is not None:  # passage retrieval: number the package descriptions in reading order
        # (numbering the filler too, 15-40 candidates, left full attention at 0 on the quality model)
        numbered = [p for p in paras if p in fact.evidence]
        fact.answers = [f"Paragraph {numbered.index(fact.target) + 1}"]
        paras = [f"Paragraph {numbered.index(p) + 1}: {p}" if p in fact.evidence else p for p in paras]
    return paras


def _turn(paras: list[str], question: str, answers: list[str]) -> Turn:
    """The turn with its question before, between (at the central paragraph boundary) and after
    its paragraphs.  Nothing recalls an early question at the end: a sentence that did ("Now answer
    the question asked at the start of this message." and the format) left the quality model's
    multi-document answers at the front and middle at 0 of 6 and made it answer in sentences."""
    if len(paras) < 2:
        raise ValueError("a turn needs at least two paragraphs to place its question in the middle")
    mid = len(paras) // 2
    body, before, after = "\n\n".join(paras), "\n\n".join(paras[:mid]), "\n\n".join(paras[mid:])
    prompts = {"front": f"{question}\n\n{body}", "middle": f"{before}\n\n{question}\n\n{after}",
               "back": f"{body}\n\n{question}"}
    return Turn(prompts, {p: question for p in prompts}, list(answers))


def build(dataset: str, n: int, *, seed: int = 0, scale: float = 1.0,
          count_tokens: Callable[[str], int] = approx_tokens,
          snapshot: Path | str = sources.SNAPSHOT) -> list[Conversation]:
    """``n`` 3-turn conversations of ``dataset``, deterministic from ``seed``."""
    if dataset not in BUILDERS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    src = sources.load(snapshot)
    pk, filler = src.packages, src.filler
    out = []
    for c in range(n):
        rng = random.Random(f"{dataset}/{seed}/{c}")
        state: dict = {"used": []}
        turns, meta = [], None
        for t, tokens in enumerate(TURN_TOKENS):
            fact = BUILDERS[dataset](rng, pk, t, state)
            if fact.subject is not None:
                state["used"].append(fact.subject)
            paras = _context(rng, fact, int(tokens * scale), count_tokens, filler)
            question = f"Question: {fact.question} {ANSWER_FORMAT[fact.metric]}{fact.cue}"
            turns.append(_turn(paras, question, fact.answers))
            meta = fact
        out.append(Conversation(turns, dataset=dataset, id=f"{dataset}-{seed}-{c}", metric=meta.metric,
                                all_classes=meta.all_classes))
    return out


def first_line_only(dataset: str) -> bool:
    """Whether answers of ``dataset`` are cut to their first line before scoring (few-shot sets)."""
    return dataset == "few_shot"
