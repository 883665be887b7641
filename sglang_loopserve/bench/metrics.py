"""Scores of the multi-turn benchmark, as LongBench computes them.

LongBench (THUDM/LongBench, ``metrics.py`` and ``eval.py``) scores a
prediction against each gold answer and keeps the best; a data set's score is
``round(100 * mean, 2)``.  Its metrics, reimplemented here:

* ``qa_f1``: bag-of-words F1 after ``normalize_answer`` (lowercase, no ASCII
  punctuation, the articles a/an/the dropped, whitespace collapsed);
* ``rouge_l``: ROUGE-L F as the ``rouge`` package 1.0.1 computes it (pinned:
  its sentence split on ".", case-sensitive words, distinct words counted),
  0 where that package raises (an empty prediction does);
* ``classification``: every class name found in the prediction, less those
  that are only part of the gold class's name (with LongBench's skip, see
  there); ``1 / matches`` if the gold class is among them;
* ``count`` and ``retrieval``: the share of the numbers in the prediction
  that equal the gold count or paragraph number;
* few-shot sets (LongBench: TREC, TriviaQA, SAMSum) cut the prediction to its
  first line first.

Beyond LongBench: ``agreement`` compares a method's greedy answer with full
attention's, token by token.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """LongBench's normalisation: lowercase, punctuation removed, articles dropped, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 (multiset intersection); 0 when nothing is common."""
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, gold: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def rouge_l(prediction: str, gold: str, **_) -> float:
    """ROUGE-L F of the ``rouge`` package (1.0.1), 0.0 where it raises, as LongBench does."""
    try:
        from rouge import Rouge
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError("ROUGE-L needs the 'rouge' package (pip install rouge==1.0.1)") from e
    try:
        return float(Rouge().get_scores([prediction], [gold], avg=True)["rouge-l"]["f"])
    except Exception:  # noqa: BLE001 - LongBench scores any failure (empty text, only dots) as 0
        return 0.0


def classification(prediction: str, gold: str, *, all_classes: Sequence[str] = (), **_) -> float:
    """LongBench's TREC score: 1/len(matches) when the gold class is among the class names the
    prediction contains, less names that are part of the gold one without being it.

    Exactly as LongBench: it drops those names from the list it is iterating, so the name right
    after each dropped one is never checked and stays (with the gold ``"Other number"`` and the
    names ``"Other"``, ``"number"``, ``"Other number"`` all found, it scores 1/2, not 1)."""
    matches = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(matches):
        if matches[i] in gold and matches[i] != gold:
            del matches[i]  # the next name shifts into slot i, which the iteration has passed
        i += 1
    return 1.0 / len(matches) if gold in matches else 0.0


def _numbers_equal_share(prediction: str, gold: str) -> float:
    found = re.findall(r"\d+", prediction)
    return sum(n == str(gold) for n in found) / len(found) if found else 0.0


def count(prediction: str, gold: str, **_) -> float:
    """LongBench's passage count: the share of the numbers in the prediction equal to the gold count."""
    return _numbers_equal_share(prediction, gold)


def retrieval(prediction: str, gold: str, **_) -> float:
    """LongBench's passage retrieval: gold ``"Paragraph N"``; the share of numbers equal to N."""
    wanted = re.findall(r"Paragraph (\d+)", gold)
    return _numbers_equal_share(prediction, wanted[0]) if wanted else 0.0


def exact_match(prediction: str, gold: str, **_) -> float:
    """1 when the normalised gold answer occurs in the normalised prediction (our synthetic
    retrieval sets: keys, variables, counts have one exact answer)."""
    want = normalize_answer(gold)
    return float(bool(want) and f" {want} " in f" {normalize_answer(prediction)} ")


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1, "rouge_l": rouge_l, "classification": classification, "count": count,
    "retrieval": retrieval, "exact_match": exact_match,
}


def first_line(prediction: str) -> str:
    """LongBench's cut for few-shot sets: the first line after leading newlines."""
    return prediction.lstrip("\n").split("\n")[0]


def score(metric: str, prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = (),
          first_line_only: bool = False) -> float:
    """A sample's score in [0, 1]: the best over its gold ``answers``."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}") from None
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("answers must hold at least one gold answer")
    if first_line_only:
        prediction = first_line(prediction)
    return max(fn(prediction, gold, all_classes=all_classes) for gold in answers)


def dataset_score(sample_scores: Sequence[float]) -> float:
    """A data set's score as LongBench reports it: ``round(100 * mean, 2)``."""
    if not sample_scores:
        raise ValueError("no sample scores")
    return round(100 * sum(sample_scores) / len(sample_scores), 2)


def agreement(reference: Sequence[int], other: Sequence[int]) -> tuple[bool, int | None]:
    """Whether two greedy answers (token ids) are the same, and the index of the first token where
    they differ (``None`` when identical; the shorter length when one is a prefix of the other)."""
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return False, i
    if len(reference) != len(other):
        return False, min(len(reference), len(other))
    return True, None
