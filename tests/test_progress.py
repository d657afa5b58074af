"""Progress outside Lightning's loops: log lines with an ETA when not on a terminal, a rich bar on one."""
import io
import logging

from dsframe.progress import progress
from dsframe_compress.measure import measure_latency


def test_log_lines_are_rate_limited_and_end_with_the_total(caplog):
    now = [0.0]
    with caplog.at_level(logging.INFO, logger="dsframe"):
        with progress("evaluate: latency", 4, every_s=30.0, stream=io.StringIO(), clock=lambda: now[0]) as advance:
            for t in (10.0, 40.0, 50.0, 80.0):  # 10 s in: too soon; 40 s: a line; 50 s: too soon; the end: a line
                now[0] = t
                advance()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["evaluate: latency: 2/4 (50%), 40 s elapsed, ETA 0:40",
                     "evaluate: latency: 4/4 (100%), 80 s elapsed, ETA 0:00"]


def test_bar_on_a_terminal_counts_every_step():
    out = io.StringIO()
    with progress("work", 3, stream=out, bar=True) as advance:
        for _ in range(3):
            advance()
    assert "3/3" in out.getvalue() and "work" in out.getvalue()


def test_latency_measurement_reports_each_timed_workload():
    calls = []
    makers = {"a": lambda t: (lambda x: None), "b": lambda t: (lambda x: None)}
    measure_latency(makers, {"w1": [{}], "w2": [{}]}, threads=(1,), repeats=3, advance=calls.append)
    assert calls == [1] * (1 * 3 * 2 * 2)
