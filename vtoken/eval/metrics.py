"""Metrics of the field's VQA benchmarks, one public function per metric.

* :func:`vqa_accuracy` — VQAv2 / TextVQA accuracy: ``min(#matching annotators / 3, 1)`` averaged
  over the ten leave-one-out subsets of the ten human answers, after the official answer
  normalisation (:func:`normalize_answer`).
* :func:`exact_match` — GQA (and the built-in synthetic / easy-VQA sets): normalised prediction
  equals one of the reference answers.
* :func:`pope_metrics` — POPE accuracy / precision / recall / F1 / yes-ratio ("yes" = positive).
* :func:`multiple_choice_accuracy` — ScienceQA-IMG, MMBench: the option letter read from the
  prediction equals the reference option.
* :func:`mme_scores` — MME: per category ``acc + acc+`` (acc+ counts images whose two questions
  are both right), summed into the perception and cognition totals.

The answer normalisation follows the official VQA evaluation code (GT-Vision-Lab/VQA
``vqaEval.py``, in the form the EvalAI server and lmms-eval use): newlines and tabs become spaces,
punctuation is removed (or turned into a space), periods not followed by a digit are dropped, the
text is lower-cased, number words "none", "zero" .. "ten" become digits, articles "a", "an", "the"
are removed and apostrophe-less contractions ("dont") get their apostrophe back ("don't").
Both the prediction and the human answers are normalised (the official annotations are already
normalised, so on them this equals the official evaluator).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

__all__ = [
    "normalize_answer",
    "vqa_accuracy",
    "exact_match",
    "pope_answer",
    "pope_metrics",
    "mme_answer",
    "mme_scores",
    "parse_choice",
    "multiple_choice_accuracy",
    "MME_PERCEPTION",
    "MME_COGNITION",
]

# --- official VQA answer normalisation -------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern, lookbehind typo included: it removes every period not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text) -> str:
    """The official VQA answer normalisation (see the module docstring).

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("dont")
    "don't"
    """
    text = "" if text is None else str(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _as_answer_list(answers) -> list:
    if answers is None:
        return []
    if isinstance(answers, str):
        return [answers]
    out = []
    for a in answers:
        out.append(a.get("answer", "") if isinstance(a, dict) else a)
    return [str(a) for a in out]


def vqa_accuracy(prediction, answers: Sequence) -> float:
    """VQA accuracy of one prediction against the human answers (usually ten).

    For each human answer, the accuracy against the *other* answers is ``min(#equal / 3, 1)``;
    the result is the mean over those leave-one-out subsets (so with ten answers 1 match gives
    0.3, 2 give 0.6, 3 give 0.9 and 4 or more give 1.0). ``answers`` may be strings or the
    annotation dicts (``{"answer": ...}``). With a single reference answer (no leave-one-out is
    possible) the result is the normalised exact match; with none it is 0.0.
    """
    refs = [normalize_answer(a) for a in _as_answer_list(answers)]
    if not refs:
        return 0.0
    pred = normalize_answer(prediction)
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    total = 0.0
    for r in refs:
        others = matches - (1 if r == pred else 0)
        total += min(1.0, others / 3.0)
    return total / len(refs)


def exact_match(prediction, answers) -> float:
    """1.0 if the normalised prediction equals one of the normalised reference answers, else 0.0
    (``answers``: one string or a list). Used for GQA and the built-in data sets."""
    refs = {normalize_answer(a) for a in _as_answer_list(answers)}
    return float(normalize_answer(prediction) in refs)


# --- yes / no benchmarks ----------------------------------------------------------------------


def pope_answer(text) -> str:
    """Read yes/no from a free-form answer the way the POPE evaluation of LLaVA does: take the
    first sentence; it is "no" if it contains the word "no" or "not", otherwise "yes"."""
    text = "" if text is None else str(text)
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", " ").lower().split()
    return "no" if ("no" in words or "not" in words) else "yes"


def pope_metrics(preds: Sequence, labels: Sequence) -> dict:
    """POPE metrics with "yes" as the positive class.

    preds:  free-form predictions (read with :func:`pope_answer`) or "yes"/"no".
    labels: "yes"/"no" (case-insensitive).
    Returns ``{"accuracy", "precision", "recall", "f1", "yes_ratio", "n"}`` as fractions in
    [0, 1] (a ratio with a zero denominator is 0.0).
    """
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"pope_metrics: {len(preds)} predictions but {len(labels)} labels")
    p = [pope_answer(x) == "yes" for x in preds]
    y = [str(lab).strip().lower() == "yes" for lab in labels]
    tp = sum(a and b for a, b in zip(p, y))
    fp = sum(a and not b for a, b in zip(p, y))
    fn = sum((not a) and b for a, b in zip(p, y))
    tn = sum((not a) and (not b) for a, b in zip(p, y))
    n = len(p)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p) / n if n else 0.0,
        "n": n,
    }


MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_answer(text) -> str:
    """Read yes/no from an MME prediction as its official calculation script does: the whole
    answer if it is "yes"/"no", else "yes"/"no" if found in its first four characters, else
    "other" (always wrong)."""
    t = ("" if text is None else str(text)).strip().lower()
    for ch in ".,!":
        t = t.replace(ch, "")
    t = t.strip()
    if t in ("yes", "no"):
        return t
    prefix = t[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(records: Iterable) -> dict:
    """MME scores from records ``(category, image_id, prediction, label)``.

    Per category: acc = % questions right, acc+ = % images whose questions are all right,
    score = acc + acc+ (at most 200). ``perception`` / ``cognition`` sum the scores of the
    categories of each group that are present (at most 2000 / 800 on the full benchmark).
    """
    cats: dict = {}
    for category, image_id, prediction, label in records:
        ok = mme_answer(prediction) == str(label).strip().lower()
        c = cats.setdefault(category, {"right": 0, "n": 0, "images": {}})
        c["right"] += ok
        c["n"] += 1
        c["images"][image_id] = c["images"].get(image_id, True) and ok
    per = {}
    for category, c in sorted(cats.items()):
        acc = 100.0 * c["right"] / c["n"]
        acc_plus = 100.0 * sum(c["images"].values()) / len(c["images"])
        per[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n": c["n"]}
    perception = sum(v["score"] for k, v in per.items() if k in MME_PERCEPTION)
    cognition = sum(v["score"] for k, v in per.items() if k in MME_COGNITION)
    other = sum(v["score"] for k, v in per.items() if k not in MME_PERCEPTION and k not in MME_COGNITION)
    return {"categories": per, "perception": perception, "cognition": cognition, "other": other}


# --- multiple choice --------------------------------------------------------------------------

_LETTER_PATTERNS = (
    re.compile(r"^\(?([A-Z])\)?$"),  # "B", "(B)"
    re.compile(r"^\(?([A-Z])[\).:]\s*"),  # "B. text", "(B) text", "B: text"
    re.compile(r"^([A-Z])\s"),  # "B text"
    re.compile(r"\b(?i:answer|option|choice)\s*(?i:is|:)?\s*\(?([A-Z])\b\)?"),
)


def parse_choice(prediction, num_choices: int, choices: Optional[Sequence] = None) -> int:
    """Index (0-based) of the option a free-form prediction names, or -1.

    Reads a leading option letter ("B", "(B)", "B. dog", "The answer is B"), else a prediction
    equal to one option's text (case-insensitive). Letters outside the ``num_choices`` options
    count as no answer.
    """
    text = ("" if prediction is None else str(prediction)).strip()
    for pat in _LETTER_PATTERNS:
        m = pat.search(text)
        if m:
            idx = ord(m.group(1).upper()) - ord("A")
            if 0 <= idx < num_choices:
                return idx
    if choices:
        norm = text.lower().rstrip(".").strip()
        for i, c in enumerate(choices):
            if norm == str(c).lower().strip():
                return i
    return -1


def _choice_index(answer) -> int:
    if isinstance(answer, bool):
        raise ValueError(f"a multiple-choice answer is an option index or letter; got {answer!r}")
    if isinstance(answer, int):
        return answer
    s = str(answer).strip()
    if len(s) == 1 and s.isalpha():
        return ord(s.upper()) - ord("A")
    if s.isdigit():
        return int(s)
    raise ValueError(f"a multiple-choice answer is an option index or letter; got {answer!r}")


def multiple_choice_accuracy(predictions: Sequence, answers: Sequence, choices: Optional[Sequence] = None) -> float:
    """Fraction of predictions naming the right option.

    predictions: free-form model outputs (read with :func:`parse_choice`).
    answers:     the right options, as 0-based indices or letters ("A", "B", ...).
    choices:     per question, its list of options (letters beyond it are invalid; also lets a
                 prediction that repeats an option's text count). Without it up to 26 options.
    """
    predictions, answers = list(predictions), list(answers)
    if len(predictions) != len(answers):
        raise ValueError(f"multiple_choice_accuracy: {len(predictions)} predictions but {len(answers)} answers")
    if not predictions:
        return 0.0
    right = 0
    for i, (p, a) in enumerate(zip(predictions, answers)):
        opts = choices[i] if choices is not None else None
        n = len(opts) if opts is not None else 26
        right += parse_choice(p, n, opts) == _choice_index(a)
    return right / len(predictions)
