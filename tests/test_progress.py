"""Progress off a terminal: interval-limited lines and a final line; silent when asked; a bar on a terminal;
a real command path prints lines; transformers' own bars are off after the CLI's set-up."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from sublim import progress as P

LINE = re.compile(r"^\[(?P<desc>[^\]]+)\] (?P<n>\d+)/(?P<total>\d+) (?P<units>\w+) \((?P<pct>\d+)%\)"
                  r"(, \d\d:\d\d elapsed, ~(\d\d:\d\d|\?) left| in \d\d:\d\d)(, .*)?$")


class Clock:
    """A fake clock for tqdm (tqdm.std reads ``time`` from its module): deterministic intervals."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    import tqdm.std

    c = Clock()
    monkeypatch.setattr(tqdm.std, "time", c)
    return c


def _lines(err: str) -> list[str]:
    assert "\r" not in err  # lines for a log: no carriage-return redraws
    return [x for x in err.splitlines() if x]


def test_lines_are_interval_limited_with_a_final_line(clock: Clock, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(P.ENV_INTERVAL, "10")
    bar = P.progress_bar(total=100, desc="pretrain", progress=None)
    assert isinstance(bar, P.LineProgress)
    with bar:
        for step in range(100):
            clock.t += 1.0  # one second per step: a line every 10 steps
            bar.update(1)
            if step % 7 == 0:
                bar.set_postfix(loss=f"{3 - step / 50:.3f}")  # a postfix never forces a line
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 11, lines  # t = 10, 20, ..., 100 s, and the final line
    parsed = [LINE.match(x) for x in lines]
    assert all(parsed), lines
    assert [int(m["n"]) for m in parsed if m] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 100]
    assert lines[0].startswith("[pretrain] 10/100 steps (10%), 00:10 elapsed, ~01:30 left, loss=")
    assert " in 01:40" in lines[-1] and "left" not in lines[-1]


def test_iterating_a_sequence_and_resuming(clock: Clock, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(P.ENV_INTERVAL, "5")
    seen = []
    for x in P.progress_bar(range(12), desc="exact eval", unit="batch"):
        clock.t += 2.0
        seen.append(x)
    assert seen == list(range(12))
    lines = _lines(capsys.readouterr().err)
    assert lines[0].startswith("[exact eval] 3/12 batches (25%), 00:06 elapsed")
    assert lines[-1] == "[exact eval] 12/12 batches (100%) in 00:24"
    # a resumed stage (rows already on disk): the rate and ETA count only this run's rows
    bar = P.progress_bar(total=100, initial=60, desc="generate", unit="row")
    clock.t += 10.0
    bar.update(20)
    bar.close()
    lines = _lines(capsys.readouterr().err)
    assert lines[0] == "[generate] 80/100 rows (80%), 00:10 elapsed, ~00:10 left", lines


def test_short_stage_prints_nothing_and_false_is_silent(clock: Clock, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(P.ENV_INTERVAL, "30")
    with P.progress_bar(total=10, desc="short") as bar:
        for _ in range(10):
            clock.t += 0.5  # 5 s in all: under one interval
            bar.update(1)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(P.ENV_INTERVAL, "0")  # even with every update eligible
    with P.progress_bar(total=10, desc="silent", progress=False) as bar:
        for _ in range(10):
            clock.t += 100
            bar.update(1)
    for _ in P.progress_bar(range(5), progress=False):
        clock.t += 100
    assert capsys.readouterr().err == ""


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    assert P.mode(None) == "bar" and P.mode(False) == "off"
    bar = P.progress_bar(total=5, desc="students")
    assert not isinstance(bar, P.LineProgress)
    for _ in range(5):
        bar.update(1)
    bar.close()
    out = fake.getvalue()
    assert "\r" in out and "students:" in out and "| 0/5 [" in out  # tqdm's own bar, redrawn in place


def test_true_forces_a_bar_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert P.mode(True) == "bar" and P.mode(None) == "lines"  # pytest's stderr is not a terminal
    bar = P.progress_bar(total=3, desc="forced", progress=True)
    assert not isinstance(bar, P.LineProgress)
    bar.update(3)
    bar.close()
    assert "\r" in capsys.readouterr().err


def test_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(P.ENV_INTERVAL, raising=False)
    assert P.interval() == 30.0
    monkeypatch.setenv(P.ENV_INTERVAL, "2.5")
    assert P.interval() == 2.5
    monkeypatch.setenv(P.ENV_INTERVAL, "soon")
    with pytest.warns(UserWarning, match="SUBLIM_PROGRESS_INTERVAL"):
        assert P.interval() == 30.0


def test_sublim_generate_prints_progress_lines_off_a_terminal(tiny_model: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The real command, as in a log: every batch is eligible (interval 0); the final line closes it."""
    from typer.testing import CliRunner

    from sublim.cli import app

    monkeypatch.setenv(P.ENV_INTERVAL, "0")
    monkeypatch.setenv(P.HF_ENV, "1")  # the CLI's set-up sets it in this process otherwise
    res = CliRunner().invoke(app, ["generate", "--model", str(tiny_model), "--out", str(tmp_path / "d.jsonl"),
                                   "--n", "8", "--batch-size", "4", "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    lines = [x for x in res.stderr.splitlines() if x.startswith("[generate")]
    assert lines, res.stderr
    assert lines[-1].startswith("[generate (neutral)] 8/8 rows (100%) in "), lines
    assert "Loading weights" not in res.stderr


@pytest.fixture
def hf_bars_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """transformers' bars on (as a fresh process has them), restored afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    monkeypatch.delenv(P.HF_ENV, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_logging.enable_progress_bar()
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_cli_startup_silences_transformers_loading_bar(tiny_model: Path, hf_bars_on: None,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    from sublim.cliutil import startup

    AutoModelForCausalLM.from_pretrained(tiny_model)
    assert "Loading weights" in capsys.readouterr().err  # the bar is there before (so this test can fail)
    startup()
    AutoModelForCausalLM.from_pretrained(tiny_model)
    assert "Loading weights" not in capsys.readouterr().err


def test_startup_before_import_reaches_transformers_through_the_environment() -> None:
    """In a fresh process (as `sublim ...`), transformers is not imported yet when the CLI sets up."""
    code = ("from sublim.cliutil import startup; startup()\n"
            "from transformers.utils import logging; print(logging.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k != P.HF_ENV}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
