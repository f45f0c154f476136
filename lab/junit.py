"""Counts and failures from a JUnit XML report (as Ginkgo v2 writes it, e.g. csi-sanity's)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Failure:
    name: str
    kind: str  # failure | error
    message: str


@dataclass
class Report:
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    pending: int = 0  # Ginkgo writes pending specs as <skipped message="pending"> with status="pending"
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.errors + self.skipped + self.pending

    def summary(self) -> str:
        return (
            f"{self.passed} passed, {self.failed} failed, {self.errors} errors, {self.skipped} skipped, "
            f"{self.pending} pending "
            f"({self.total} specs, {self.seconds:.0f}s in the report)"
        )


def parse(text: str) -> Report:
    """Every <testcase>: <failure> counts as failed, <error> as an error, <skipped> as skipped (or
    pending, by Ginkgo's status attribute), anything else as passed. ValueError if not JUnit XML."""
    try:
        # A report our own test run just wrote, not untrusted input.
        root = ET.fromstring(text)  # noqa: S314
    except ET.ParseError as err:
        raise ValueError(f"not a JUnit XML report: {err}") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise ValueError(f"not a JUnit XML report: root element <{root.tag}>")
    report = Report()
    for suite in [root] if root.tag == "testsuite" else root.iter("testsuite"):
        report.seconds += float(suite.get("time") or 0)
    for case in root.iter("testcase"):
        name = case.get("name") or "?"
        failure, error = case.find("failure"), case.find("error")
        if failure is not None or error is not None:
            node = failure if failure is not None else error
            assert node is not None
            kind = "failure" if failure is not None else "error"
            detail = (node.get("message") or "").strip() or (node.text or "").strip()
            report.failures.append(Failure(name=name, kind=kind, message=detail))
            if kind == "failure":
                report.failed += 1
            else:
                report.errors += 1
        elif case.find("skipped") is not None:
            if case.get("status") == "pending":
                report.pending += 1
            else:
                report.skipped += 1
        else:
            report.passed += 1
    return report
