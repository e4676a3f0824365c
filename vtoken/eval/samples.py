"""What a data-set loader returns: :class:`Sample` (one question), :class:`EvalDataset` (a data
set's questions and the records it could not use), :class:`DataSpec` (a parsed ``--data`` item), the
metric kinds, and the instructions LLaVA's evaluation appends to questions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["Sample", "EvalDataset", "DataSpec", "METRICS", "SHORT_ANSWER", "MC_INSTRUCTION", "with_instruction"]


SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


#: metric kinds a data set can have
METRICS = ("vqa", "exact", "pope", "mc", "mme")


@dataclass
class Sample:
    """One question.

    id:       unique within its data set (string).
    question: the text given to the model (instruction included).
    answers:  reference answers (VQA: the ten human answers; POPE / MME: ["yes"] or ["no"];
              multiple choice: [letter]).
    image:    a PIL image, a path, or a zero-argument callable returning one of them.
    qtype:    question type / category (POPE split, MME category, GQA structural type, ...).
    choices:  the options of a multiple-choice question.
    group:    the image a question belongs to (MME's acc+).
    """

    id: str
    question: str
    answers: list
    image: Any
    qtype: str = ""
    choices: Optional[list] = None
    group: str = ""


@dataclass
class EvalDataset:
    name: str  # column title
    kind: str  # spec kind (synthetic, vqav2, ...)
    metric: str  # one of METRICS
    source: str  # where it was read from
    samples: list
    malformed: int = 0
    malformed_examples: list = field(default_factory=list)
    total_records: int = 0  # records seen before --limit

    def note_malformed(self, what: str) -> None:
        self.malformed += 1
        if len(self.malformed_examples) < 5:
            self.malformed_examples.append(what)


@dataclass
class DataSpec:
    kind: str
    path: Optional[str]
    options: dict
    text: str


def with_instruction(question: str, instruction: str) -> str:
    q = str(question).strip()
    return f"{q}\n{instruction}" if instruction else q
