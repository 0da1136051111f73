"""What validation reports: each failed expectation with up to five offending rows, and the
ValidationResult with its human-readable summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class ExpectationFailure:
    """One failed expectation and up to five offending rows (image paths or group keys)."""

    expectation: str
    column: str | None
    description: str
    unexpected_count: int
    examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of `validate`: success is False when any critical expectation failed."""

    success: bool
    failures: list[ExpectationFailure]
    warnings: list[ExpectationFailure]
    report_path: Path | None
    statistics: dict

    def summary(self) -> str:
        """Human-readable result: each failed (and warned) expectation with up to 5 paths."""
        stats = self.statistics
        head = "passed" if self.success else "FAILED"
        lines = [
            f"Data validation {head}: {len(self.failures)} of {stats.get('n_expectations', '?')} "
            f"checks failed, {len(self.warnings)} warning(s) "
            f"({stats.get('n_images', 0)} images, {stats.get('n_studies', 0)} studies, "
            f"{stats.get('n_patients', 0)} patients)."
        ]
        for tag, items in (("FAIL", self.failures), ("WARN", self.warnings)):
            for item in items:
                column = f" [{item.column}]" if item.column else ""
                lines.append(f"{tag} {item.description}{column}: {item.unexpected_count} row(s)")
                lines.extend(f"    {example}" for example in item.examples[:MAX_EXAMPLES])
                if item.unexpected_count > len(item.examples):
                    lines.append(f"    ... and {item.unexpected_count - len(item.examples)} more")
        return "\n".join(lines)


def _failure(result, key: str) -> ExpectationFailure:
    config = result.expectation_config
    details = result.result or {}
    examples: list[str] = []
    rows = details.get("unexpected_index_list") or details.get("partial_unexpected_index_list")
    for row in rows or []:
        value = str(row.get(key)) if isinstance(row, dict) else str(row)
        if value not in examples:
            examples.append(value)
        if len(examples) == MAX_EXAMPLES:
            break
    count = details.get("unexpected_count")
    description = config.description or config.type
    exception = (result.exception_info or {}).get("exception_message")
    if exception:  # the expectation itself could not run
        description = f"{description} (could not run: {exception})"
    return ExpectationFailure(
        expectation=config.type,
        column=config.kwargs.get("column"),
        description=description,
        unexpected_count=int(count) if count is not None else 0,
        examples=examples,
    )
