"""What ``check`` reports: one :class:`Violation` per broken invariant, gathered in a :class:`CheckReport`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

ERROR, WARNING, INFO = "error", "warning", "info"


@dataclass
class Violation:
    """One broken invariant."""

    rule: str
    step: int
    module: str
    expected: str
    actual: str
    hint: str
    severity: str = ERROR
    seq: int = -1                      # position in the step's execution order (-1 unknown)
    tokens: list[int] | None = None    # embedding-space token positions involved, when known
    count: int = 1                     # how many rows (modules, layers) this one stands for
    also: list[str] = field(default_factory=list)  # other modules with the same problem
    row: int = -1                      # batch row involved (-1 unknown or every row)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        where = (f"step {self.step}" + (f" row {self.row}" if self.row >= 0 else "")
                 + (f" {self.module}" if self.module else ""))
        return f"[{self.rule}] {where}: expected {self.expected}, got {self.actual} -- {self.hint}"


@dataclass
class CheckReport:
    path: str
    rules: list[str]
    violations: list[Violation]
    status: str = "complete"
    n_steps: int = 0
    golden_diff: str | None = None

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == ERROR]

    @property
    def warnings(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def by_rule(self, rule_id: str) -> list[Violation]:
        return [v for v in self.violations if v.rule == rule_id or v.rule.startswith(rule_id + ".")]

    def to_dict(self) -> dict:
        return {
            "trace": self.path, "status": self.status, "n_steps": self.n_steps, "rules": self.rules,
            "ok": self.ok, "errors": len(self.errors), "warnings": len(self.warnings),
            "violations": [v.to_dict() for v in self.violations],
            **({"golden_diff": self.golden_diff} if self.golden_diff is not None else {}),
        }
