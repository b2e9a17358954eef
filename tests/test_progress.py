"""Progress output: a bar with rate and time left on a terminal (a real pty), plain log lines otherwise."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import sys
import termios

import pytest

from qformer.core.progress import Progress, is_interactive


def _read_all(fd: int) -> str:
    """Everything written to the pty so far (reads until nothing more arrives)."""
    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("size", [(24, 120), (0, 0)])  # 0x0: a terminal that reports no size (`script`, containers)
def test_a_terminal_gets_a_bar_with_rate_and_time_left(monkeypatch, progress_log, size):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    term = os.fdopen(slave, "w", buffering=1)
    try:
        monkeypatch.setattr(sys, "stdout", term)
        assert is_interactive(term)
        with Progress(40, "eval test: encode images", "images", stream=term, log_every_s=0) as bar:
            for _ in range(4):
                bar.update(10)
        term.flush()
        out = _read_all(master)
    finally:
        term.close()
        os.close(master)
    assert "eval test: encode images" in out
    assert "40/40" in out and "100%" in out
    assert "images/s" in out  # the rate
    assert "<" in out  # tqdm's "elapsed<left"
    assert progress_log() == []  # no log lines beside the bar


def test_a_job_log_gets_plain_lines_with_rate_and_time_left(monkeypatch, progress_log):
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a terminal
    stream = io.StringIO()
    assert not is_interactive(stream)
    with Progress(4, "eval test: ITM re-rank", "pairs", stream=stream, log_every_s=0) as bar:
        for _ in range(4):
            bar.update(1)
    assert stream.getvalue() == ""  # no bar characters in a log file
    lines = progress_log()
    assert len(lines) == 5  # one per update (log_every_s=0) and the closing line
    assert lines[1].startswith("eval test: ITM re-rank: 2/4 pairs (50%), ") and "pairs/s" in lines[1]
    assert lines[1].endswith(" left")
    assert lines[-1].startswith("eval test: ITM re-rank: 4/4 pairs (100%)") and "done in 0:00:0" in lines[-1]


def test_lines_are_spaced_in_time_and_hidden_ranks_are_silent(monkeypatch, progress_log):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with Progress(1000, "slow", log_every_s=3600) as bar:  # an hour between lines: only the closing one
        for _ in range(1000):
            bar.update()
    with Progress(10, "rank 1", enabled=False) as hidden:
        hidden.update(10)
    with Progress(10, "train epoch", log_every_s=None) as quiet:  # the caller logs its own lines
        quiet.update(10)
    lines = progress_log()
    assert len(lines) == 1 and lines[0].startswith("slow: 1000/1000 it (100%)")


def test_a_failed_step_does_not_claim_to_be_done(monkeypatch, progress_log):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with pytest.raises(OSError):
        with Progress(10, "data check: decode images", "images") as bar:
            bar.update(3)
            raise OSError("disk gone")
    assert progress_log() == []
