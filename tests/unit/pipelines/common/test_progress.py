"""pipelines/common/progress.py: a bar on a terminal, a line per 10 % anywhere else."""

from __future__ import annotations

from tqdm import tqdm

from pipelines.common import progress as progress_module
from pipelines.common.progress import LINE, ProgressLines, progress_bar, reporter, track


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines_of(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_a_line_per_ten_percent_not_per_step(capsys):
    lines = ProgressLines(1000, "train", "step", quiet_s=0)
    for _ in range(1000):
        lines.update(1)
    out = lines_of(capsys)
    assert [int(LINE.match(line)["percent"]) for line in out] == list(range(10, 101, 10))
    assert out[3].startswith("train 40% (400 of 1,000 steps, ")
    assert LINE.match(out[-1])["eta"] == "0 s" and LINE.match(out[3])["rate"].endswith(" steps/s")


def test_nothing_before_the_quiet_time_then_where_it_is(capsys):
    clock = Clock()
    lines = ProgressLines(100, "clean: read", "file", quiet_s=5, clock=clock)
    for _ in range(35):  # 35 % in 3.5 s: a loop this quick prints nothing
        clock.now += 0.1
        lines.update(1)
    assert lines_of(capsys) == []
    clock.now = 6.0
    lines.update(5)  # 40 %: the first line says how far it is, the next ones come per 10 %
    for _ in range(60):
        lines.update(1)
    out = lines_of(capsys)
    assert [LINE.match(line)["percent"] for line in out] == ["40", "50", "60", "70", "80", "90", "100"]
    assert out[0] == "clean: read 40% (40 of 100 files, 6 s; 6.67 files/s, ETA 9 s)"  # 40 in 6 s: 60 more in 9


def test_a_resumed_loop_counts_from_where_it_was(capsys):
    lines = ProgressLines(1200, "train", "step", initial=600, quiet_s=0)
    lines.update(60)  # 55 %
    lines.update(60)  # 60 %
    (line,) = lines_of(capsys)
    assert LINE.match(line)["percent"] == "60"


def test_bytes_are_shown_scaled(capsys):
    lines = ProgressLines(12_400_000, "tokenize", "B", unit_scale=True, quiet_s=0)
    lines.update(4_960_000)
    (line,) = lines_of(capsys)
    assert line.startswith("tokenize 40% (4.96M of 12.4M B, ") and LINE.match(line)


def test_a_terminal_gets_a_bar_anything_else_lines(monkeypatch):
    assert isinstance(reporter(10, "x"), ProgressLines)  # pytest's captured stderr is no terminal
    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    bar = reporter(10, "x")
    assert isinstance(bar, tqdm)
    bar.close()


def test_track_and_the_model_callback_report_through_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "QUIET_S", 0.0)
    assert list(track(range(20), "clean: write", "doc")) == list(range(20))
    report = progress_bar("held-out")
    for done in range(1, 41):
        report(done, 40)
    out = lines_of(capsys)
    assert out[0].startswith("clean: write 10% (2 of 20 docs, 0 s; ") and LINE.match(out[0])["eta"] == "0 s"
    assert out[10].startswith("held-out 10% (4 of 40 batches, 0 s; ")
    assert len(out) == 20
    assert progress_bar(None) is None
