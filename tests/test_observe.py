"""Logging to stdout (plain/JSON, level and format from the environment, redaction) and timers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import orjson
import pytest

from sheetanchor.config import ENV_LOG_FORMAT, ENV_LOG_LEVEL
from sheetanchor.errors import ConfigError
from sheetanchor.observe import REGISTRY, RedactingFilter, configure_logging, get_logger, timed

SECRET = "SuperSecret123"
URL = "postgresql://app:" + SECRET + "@db.internal:5432/orders"


@pytest.fixture(autouse=True)
def restore_root_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure_logging() changes the root logger; put it back as it was after each test."""
    monkeypatch.delenv(ENV_LOG_LEVEL, raising=False)
    monkeypatch.delenv(ENV_LOG_FORMAT, raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_sheetanchor_handler", False)]


def test_json_lines_parse_with_extras(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    log = get_logger("test")
    log.info("batch written: %s rows", 42, extra={"stream": "prices", "rows": 42})
    log.debug("not shown at INFO")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("write failed")

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    first, second = (orjson.loads(line) for line in lines)
    assert first["message"] == "batch written: 42 rows"
    assert (first["level"], first["logger"]) == ("INFO", "sheetanchor.test")
    assert (first["stream"], first["rows"]) == ("prices", 42)
    assert first["ts"].endswith("Z")
    assert second["level"] == "ERROR"
    assert "RuntimeError: boom" in second["exc"]


def test_plain_format_is_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    extra = {"pool": "main", "what": "two words"}
    get_logger("test").warning("pool %s is %d%% full", "main", 90, extra=extra)
    out = capsys.readouterr().out
    assert 'WARNING sheetanchor.test: pool main is 90% full [pool=main what="two words"]' in out


def test_level_and_format_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV_LOG_LEVEL, "debug")
    monkeypatch.setenv(ENV_LOG_FORMAT, "JSON")
    configure_logging()
    assert logging.getLogger().level == logging.DEBUG
    get_logger("test").debug("detail")
    assert orjson.loads(capsys.readouterr().out)["message"] == "detail"


def test_default_level_is_warning(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging()
    get_logger("test").info("hidden")
    get_logger("test").warning("shown")
    out = capsys.readouterr().out
    assert "hidden" not in out
    assert "shown" in out


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        (ENV_LOG_LEVEL, "LOUD", ENV_LOG_LEVEL),
        (ENV_LOG_FORMAT, "xml", ENV_LOG_FORMAT),
    ],
)
def test_bad_environment_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=named):
        configure_logging()


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ConfigError, match="level"):
        configure_logging("LOUD")
    with pytest.raises(ConfigError, match="fmt"):
        configure_logging("INFO", "yaml")


def test_idempotent_one_handler_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    first = configure_logging("INFO", "plain")
    second = configure_logging("INFO", "json")
    third = configure_logging("WARNING", "json")
    assert first is second is third
    assert len(ours()) == 1
    get_logger("test").warning("once")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert orjson.loads(lines[0])["message"] == "once"


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_no_password_reaches_a_log_line(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG", fmt)
    log = get_logger("test")
    log.info("connecting to %s", URL)
    log.info("connecting to " + URL)
    log.info("dsn", extra={"dsn": URL, "target": object()})
    log.info("nested", extra={"ctx": {"urls": [URL, (URL,)], "n": 1}})
    log.info("keyword form: host=db password=%s dbname=x", SECRET)
    try:
        raise ConnectionError(f"could not connect to {URL}")
    except ConnectionError:
        log.exception("start-up failed")
    out = capsys.readouterr().out
    assert out.count("\n") >= 6
    assert SECRET not in out
    assert "app:***@db.internal" in out


def test_redacting_filter_on_a_foreign_handler() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "to %s", (URL,), None)
    assert RedactingFilter().filter(record)
    assert SECRET not in record.getMessage()
    broken = logging.LogRecord("x", logging.INFO, __file__, 1, "%d", ("not a number",), None)
    assert RedactingFilter().filter(broken)  # left for logging's own error report


# --------------------------------------------------------------------------------------------
# Phase timers
# --------------------------------------------------------------------------------------------


class StepClock:
    """A fake clock: each phase body advances it explicitly."""

    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def samples(part: str, phase: str) -> tuple[float, float]:
    labels = {"part": part, "phase": phase}
    count = REGISTRY.get_sample_value("sheetanchor_phase_duration_seconds_count", labels)
    total = REGISTRY.get_sample_value("sheetanchor_phase_duration_seconds_sum", labels)
    return count or 0.0, total or 0.0


def test_slow_phase_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    clock = StepClock()
    count0, sum0 = samples("tick", "persist")
    with caplog.at_level(logging.WARNING, logger="sheetanchor.phase"):
        with timed("persist", part="tick", slow=0.5, clock=clock) as timer:
            clock.now += 0.75
        with timed("persist", part="tick", slow=0.5, clock=clock):
            clock.now += 0.25
    count1, sum1 = samples("tick", "persist")
    assert count1 - count0 == 2
    assert sum1 - sum0 == pytest.approx(1.0)
    assert timer.elapsed == pytest.approx(0.75)
    slow = [r for r in caplog.records if r.name == "sheetanchor.phase"]
    assert len(slow) == 1
    assert slow[0].levelno == logging.WARNING
    assert "tick/persist" in slow[0].getMessage()
    assert getattr(slow[0], "phase", None) == "persist"


async def test_async_with_and_failures_are_recorded(caplog: pytest.LogCaptureFixture) -> None:
    clock = StepClock()
    count0, _ = samples("ingest", "flush")
    with caplog.at_level(logging.WARNING, logger="sheetanchor.phase"):
        async with timed("flush", part="ingest", slow=1.0, clock=clock):
            clock.now += 0.1
            await asyncio.sleep(0)

        async def failing_flush() -> None:
            async with timed("flush", part="ingest", slow=1.0, clock=clock):
                clock.now += 2.0
                raise ValueError("bad")

        with pytest.raises(ValueError, match="bad"):
            await failing_flush()
    count1, _ = samples("ingest", "flush")
    assert count1 - count0 == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "sheetanchor.phase"]
    assert len(messages) == 1
    assert "ended by ValueError" in messages[0]


def test_no_threshold_never_logs(caplog: pytest.LogCaptureFixture) -> None:
    clock = StepClock()
    with caplog.at_level(logging.DEBUG, logger="sheetanchor.phase"), timed("load", clock=clock):
        clock.now += 100.0
    assert not [r for r in caplog.records if r.name == "sheetanchor.phase"]
    assert samples("app", "load")[0] >= 1


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"phase": ""}, "phase"),
        ({"phase": "x", "part": ""}, "part"),
        ({"phase": "x", "slow": -1.0}, "slow"),
        ({"phase": "x", "slow": float("nan")}, "slow"),
        ({"phase": "x", "clock": 3}, "clock"),
    ],
)
def test_timer_validation(kwargs: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        timed(**kwargs)  # type: ignore[arg-type]
