"""JUnit reports as Ginkgo v2 (csi-sanity) writes them: counts and failure messages."""

from __future__ import annotations

import pytest

from lab import junit

GINKGO = """<?xml version="1.0" encoding="UTF-8"?>
  <testsuites tests="5" disabled="2" errors="1" failures="1" time="11.88">
      <testsuite name="CSI Driver Test Suite" package="/x" tests="5" disabled="1" skipped="1" errors="1"
                 failures="1" time="11.88" timestamp="2026-12-06T04:06:20">
          <properties><property name="SuiteSucceeded" value="false"></property></properties>
          <testcase name="[It] Identity Service Probe should return appropriate information"
                    classname="CSI Driver Test Suite" status="passed" time="0.01">
              <system-err>&gt; Enter [BeforeEach]</system-err>
          </testcase>
          <testcase name="[It] Node Service NodeExpandVolume should work" classname="CSI Driver Test Suite"
                    status="failed" time="0.2">
              <failure message="while expanding volume on node&#xA;rpc error: code = OutOfRange" type="failed">
                  [FAILED] long text</failure>
              <system-err>&gt; Enter [BeforeEach]</system-err>
          </testcase>
          <testcase name="[It] Node Service panics" classname="CSI Driver Test Suite" status="panicked" time="0">
              <error message="" type="panicked">runtime error: nil pointer</error>
          </testcase>
          <testcase name="[It] ModifyVolume [Controller Server] should fail" classname="CSI Driver Test Suite"
                    status="skipped" time="0"><skipped message="skipped - ControllerModifyVolume not supported">
              </skipped></testcase>
          <testcase name="[It] ListVolumes pagination should detect" classname="CSI Driver Test Suite"
                    status="pending" time="0"><skipped message="pending"></skipped></testcase>
      </testsuite>
  </testsuites>
"""


def test_counts_and_messages_of_a_ginkgo_report() -> None:
    r = junit.parse(GINKGO)
    assert (r.passed, r.failed, r.errors, r.skipped, r.pending, r.total) == (1, 1, 1, 1, 1, 5)
    assert r.seconds == pytest.approx(11.88)
    assert [(f.kind, f.name) for f in r.failures] == [
        ("failure", "[It] Node Service NodeExpandVolume should work"),
        ("error", "[It] Node Service panics"),
    ]
    assert r.failures[0].message.startswith("while expanding volume on node\nrpc error: code = OutOfRange")
    assert r.failures[1].message == "runtime error: nil pointer"
    assert r.summary() == "1 passed, 1 failed, 1 errors, 1 skipped, 1 pending (5 specs, 12s in the report)"


@pytest.mark.parametrize("text", ["", "not xml", "<html><body/></html>"])
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a JUnit XML report"):
        junit.parse(text)


def test_a_bare_testsuite_root_counts_too() -> None:
    r = junit.parse('<testsuite time="2"><testcase name="a"/><testcase name="b"><skipped/></testcase></testsuite>')
    assert (r.passed, r.skipped, r.seconds) == (1, 1, 2.0)
