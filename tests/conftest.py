"""Suite-wide hooks.

A failure is written to the terminal the moment it happens (test id, phase, the end of its
traceback and of its captured output), not only in the summary at the end: CI keeps the tail of
the log, and a run that dies before its summary (a native library that ``_exit``s the process)
otherwise leaves only an ``F`` in a progress line.
"""

from __future__ import annotations

import pytest

TRACEBACK_LINES = 40
OUTPUT_LINES = 15
_REPORTER: dict[str, pytest.TerminalReporter] = {}  # set by pytest_configure


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.failed:
        return
    reporter = _REPORTER.get("tr")
    if reporter is None:
        return
    reporter.write_line("")
    reporter.write_line(f"---- FAILED {report.nodeid} ({report.when}), at once: ----", red=True)
    reporter.write_line(_tail(report.longreprtext, TRACEBACK_LINES))
    for name, content in report.sections:
        if "stdout" in name and content.strip():
            reporter.write_line(f"-- {name} (last {OUTPUT_LINES} lines) --")
            reporter.write_line(_tail(content, OUTPUT_LINES))
    reporter.write_line("---- end of the failure ----")


@pytest.hookimpl(trylast=True)  # after the terminal plugin's own pytest_configure registered its reporter
def pytest_configure(config: pytest.Config) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        _REPORTER["tr"] = reporter
