"""The GLUE tasks: where each one's columns live in the canonical TSV files and on the hub, its labels and metric,
and the canonical spelling of a task name. Plain data: every layer may read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GlueSpec:
    """Where a GLUE task's columns live in the canonical TSV files and on the hub."""

    folder: str
    hub_name: str
    text_columns: tuple[str, ...]
    hub_text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None  # None: regression
    metric: str
    dev_splits: dict[str, str]  # split name -> local file stem; hub split names follow GLUE's
    header: bool = True
    column_names: tuple[str, ...] | None = None  # for header-less files


GLUE: dict[str, GlueSpec] = {
    "cola": GlueSpec("CoLA", "cola", ("sentence",), ("sentence",), "label", ("0", "1"), "matthews",
                     {"dev": "dev"}, header=False, column_names=("source", "label", "original", "sentence")),
    "sst2": GlueSpec("SST-2", "sst2", ("sentence",), ("sentence",), "label", ("0", "1"), "accuracy",
                     {"dev": "dev"}),
    "mrpc": GlueSpec("MRPC", "mrpc", ("#1 String", "#2 String"), ("sentence1", "sentence2"), "Quality",
                     ("0", "1"), "f1_accuracy", {"dev": "dev"}),
    "qqp": GlueSpec("QQP", "qqp", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
                    ("0", "1"), "f1_accuracy", {"dev": "dev"}),
    "stsb": GlueSpec("STS-B", "stsb", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score",
                     None, "pearson_spearman", {"dev": "dev"}),
    "mnli": GlueSpec("MNLI", "mnli", ("sentence1", "sentence2"), ("premise", "hypothesis"), "gold_label",
                     ("entailment", "neutral", "contradiction"), "accuracy",
                     {"matched": "dev_matched", "mismatched": "dev_mismatched"}),
    "qnli": GlueSpec("QNLI", "qnli", ("question", "sentence"), ("question", "sentence"), "label",
                     ("entailment", "not_entailment"), "accuracy", {"dev": "dev"}),
    "rte": GlueSpec("RTE", "rte", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                    ("entailment", "not_entailment"), "accuracy", {"dev": "dev"}),
    "wnli": GlueSpec("WNLI", "wnli", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                     ("0", "1"), "accuracy", {"dev": "dev"}),
}
GLUE_ALIASES = {"sst-2": "sst2", "sts-b": "stsb"}


def canonical_task_name(name: str) -> str:
    """A task name as the data and the saved heads spell it (SST-2 -> sst2)."""
    low = name.lower()
    return GLUE_ALIASES.get(low, low)
