"""Classification metrics and their text table (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class EvalReport:
    labels: list[str]
    n: int
    accuracy: float
    macro_f1: float
    per_label: dict[str, dict[str, float]]  # label -> precision/recall/f1/support
    confusion: list[list[int]]  # rows: true label, columns: predicted label
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def balanced_accuracy(self) -> float:
        """Mean recall over the labels that occur in the gold data."""
        recalls = [p["recall"] for p in self.per_label.values() if p["support"]]
        return sum(recalls) / len(recalls) if recalls else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "balanced_accuracy": self.balanced_accuracy}

    def line(self) -> str:
        return (
            f"accuracy {self.accuracy:.3f}  balanced accuracy {self.balanced_accuracy:.3f}  "
            f"macro-F1 {self.macro_f1:.3f}  (n={self.n})"
        )

    def table(self) -> str:
        width = max(8, *(len(label) for label in self.labels))
        lines = [
            f"n={self.n}  accuracy={self.accuracy:.4f}  macro-F1={self.macro_f1:.4f}",
            "",
            f"{'label':<{width}}  precision  recall     f1  support",
        ]
        for label in self.labels:
            p = self.per_label[label]
            lines.append(
                f"{label:<{width}}  {p['precision']:9.3f}  {p['recall']:6.3f}  {p['f1']:5.3f}"
                f"  {int(p['support']):7d}"
            )
        lines += ["", "confusion (rows = true, columns = predicted)"]
        cw = max(6, *(len(label) for label in self.labels))
        lines.append(" " * width + "  " + " ".join(f"{label:>{cw}}" for label in self.labels))
        for label, row in zip(self.labels, self.confusion, strict=True):
            lines.append(f"{label:<{width}}  " + " ".join(f"{v:>{cw}d}" for v in row))
        return "\n".join(lines)


def describe(report: EvalReport) -> str:
    """One line: the report's scores, its calibration error and the share called neutral."""
    line = report.line()
    if "ece" in report.extra:
        line += f"  ECE {report.extra['ece']:.3f}"
    share = report.extra.get("predicted_share", {})
    if "neutral" in share:
        line += f"  neutral {share['neutral']:.0%}"
    return line


def evaluate(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> EvalReport:
    """Scores over `labels`; a prediction outside them (a 3-class model's "neutral" on
    positive/negative data) is a miss for its gold label."""
    if len(gold) != len(predicted):
        raise ValueError("gold and predicted differ in length")
    index = {label: i for i, label in enumerate(labels)}
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for g, p in zip(gold, predicted, strict=True):
        if g in index and p in index:
            confusion[index[g]][index[p]] += 1
    n = len(gold)
    correct = sum(1 for g, p in zip(gold, predicted, strict=True) if g == p)
    per_label: dict[str, dict[str, float]] = {}
    f1s: list[float] = []
    for label, i in index.items():
        tp = confusion[i][i]
        fp = sum(confusion[r][i] for r in range(k)) - tp
        support = sum(1 for g in gold if g == label)
        fn = support - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": float(support),
        }
        f1s.append(f1)
    return EvalReport(
        labels=list(labels),
        n=n,
        accuracy=correct / n if n else 0.0,
        macro_f1=sum(f1s) / len(f1s) if f1s else 0.0,
        per_label=per_label,
        confusion=confusion,
    )
