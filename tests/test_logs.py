"""One log format for every process (the CLI, the ingest slots and their writer processes, the
gateway agent): timestamp, level, process, logger, message and the ``extra=`` fields."""

import io
import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import psycopg
import pytest
from click.testing import CliRunner

from iiot_orchestration.cli import main
from iiot_orchestration.logs import configure_from_environment, configure_logging
from iiot_orchestration.services import free_port
from iiot_orchestration.settings import SettingsError, load_settings
from tests.conftest import REPO_ROOT

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"(?P<process>\S+)\[(?P<pid>\d+)\] (?P<logger>[\w.]+): "
)


@pytest.fixture
def log_stream():
    """configure_logging into a buffer; the root logger and the process name are put back."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, multiprocessing.current_process().name
    stream = io.StringIO()

    def configure(fmt: str) -> io.StringIO:
        configure_logging("DEBUG", fmt, process_name="iiot-test", stream=stream, force=True)
        return stream

    yield configure
    handlers, level, name = saved
    root.handlers[:] = handlers
    root.setLevel(level)
    multiprocessing.current_process().name = name


def test_text_lines_carry_timestamp_level_process_logger_and_extras(log_stream):
    stream = log_stream("text")
    logging.getLogger("ingest_daemon.daemon").warning(
        "database unavailable; retrying",
        extra={"error": "connection refused", "retry_in_s": 2.0, "slot": 0, "group": "g1"},
    )
    [line] = stream.getvalue().splitlines()
    match = TEXT_LINE.match(line)
    assert match, line
    assert match["process"] == "iiot-test"
    assert int(match["pid"]) == os.getpid()
    assert match["logger"] == "ingest_daemon.daemon"
    assert line.endswith(
        ': database unavailable; retrying error="connection refused" retry_in_s=2.0 slot=0 group=g1'
    )


def test_json_lines_parse_and_carry_extras(log_stream):
    stream = log_stream("json")
    log = logging.getLogger("ingest_daemon.writer")
    log.info("created partitions", extra={"days": 2, "partitions_created": True, "level": "x"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("the ingest writer failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert first["level"] == "INFO"
    assert first["logger"] == "ingest_daemon.writer"
    assert first["process"] == "iiot-test"
    assert first["pid"] == os.getpid()
    assert first["message"] == "created partitions"
    assert first["days"] == 2
    assert first["partitions_created"] is True
    assert first["extra_level"] == "x"  # an extra never hides a field of the format
    assert second["level"] == "ERROR"
    assert "RuntimeError: boom" in second["exc"]


class Hostile:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")

    __repr__ = __str__


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_hostile_extras_and_line_breaks_keep_one_line(log_stream, fmt):
    stream = log_stream(fmt)
    circular: dict = {}
    circular["self"] = circular
    logging.getLogger("x").warning(
        "first line\nsecond line\r\n%s",
        "third",
        extra={
            "obj": Hostile(),
            "circular": circular,
            "raw": b"\x00\xff",
            "nan": float("nan"),
            "quoted": 'a "b"\nc = d',
            "empty": "",
        },
    )
    logging.getLogger("x").info("%d readings", "many")  # arguments that do not fit
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    line, mismatched = lines
    assert "%d readings (arguments: ('many',))" in mismatched
    if fmt == "text":
        assert TEXT_LINE.match(line), line
        assert "first line\\nsecond line\\r\\nthird" in line
        assert ' obj="<unprintable Hostile>"' in line
        assert ' nan="nan"' in line
        assert ' quoted="a \\"b\\"\\nc = d"' in line
        assert ' empty=""' in line
    else:
        entry = json.loads(line)
        assert entry["message"] == "first line\nsecond line\r\nthird"
        assert entry["obj"] == "<unprintable Hostile>"
        assert entry["nan"] == "nan"
        assert entry["quoted"] == 'a "b"\nc = d'
        assert entry["raw"] == str(b"\x00\xff")
        assert entry["circular"].startswith("{'self'")


def test_a_bad_log_format_is_a_clear_error(monkeypatch):
    with pytest.raises(
        SettingsError, match=r"IIOT_LOG_FORMAT='xml' is invalid: expected text or json$"
    ):
        load_settings({"IIOT_LOG_FORMAT": "xml"})
    assert load_settings({}).log_format == "text"
    assert load_settings({"IIOT_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ValueError, match=r"IIOT_LOG_FORMAT='xml' is invalid"):
        configure_from_environment(environ={"IIOT_LOG_FORMAT": "xml"})
    monkeypatch.setenv("IIOT_LOG_FORMAT", "xml")
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 1
    assert "IIOT_LOG_FORMAT='xml' is invalid" in result.output
    assert "Traceback" not in result.output


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_writer_process_logs_in_the_same_format(
    database_url, pg_server, ingest_broker, tmp_path, fmt
):
    """The registry cache of a slot's writer process (a spawned child) loses its database
    connection: its warning has the timestamp, the process name and the error extra."""
    port = free_port()
    stderr_path = tmp_path / "ingest.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATABASE_URL=database_url,
        IIOT_MQTT_URL=ingest_broker.url,
        IIOT_DATA_DIR=str(tmp_path / "var"),
        IIOT_LOG_FORMAT=fmt,
    )
    command = [sys.executable, "-m", "iiot_orchestration.cli", "ingest", "--group", f"logs{fmt}"]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [*command, "--metrics-port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    marker = "registry cache lost its database connection"
    try:
        deadline = time.monotonic() + 120
        while not _ready(port):
            assert process.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.2)
        dbname = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
        while marker not in stderr_path.read_text():
            with psycopg.connect(pg_server, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (dbname,),
                )
            assert time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    lines = stderr_path.read_text().splitlines()
    line = next(x for x in lines if marker in x)
    if fmt == "text":
        match = TEXT_LINE.match(line)
        assert match, line
        assert match["process"] == "ingest-writer-0"
        assert int(match["pid"]) != process.pid
        assert match["logger"] == "ingest_daemon.registry_cache"
        assert ' error="' in line
        # the receiving process (the CLI) writes the same format
        cli_lines = [x for x in lines if " iiot-ingest[" in x]
        assert cli_lines
        assert all(TEXT_LINE.match(x) for x in cli_lines), cli_lines
    else:
        entry = json.loads(line)
        assert entry["process"] == "ingest-writer-0"
        assert entry["level"] == "WARNING"
        assert entry["logger"] == "ingest_daemon.registry_cache"
        assert entry["ts"]
        assert entry["error"]
        cli_entries = [json.loads(x) for x in lines if '"process": "iiot-ingest"' in x]
        assert cli_entries
        assert all(e["ts"] and e["message"] for e in cli_entries)
