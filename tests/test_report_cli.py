"""`iiot report`: reports of any month, week or range of days from the command line, against
the shared report database of tests/test_reports.py (marts built once for this module)."""

import os
import pty
import select
import subprocess
import sys

import pytest
from click.testing import CliRunner
from openpyxl import load_workbook

from iiot_orchestration.cli import main
from tests.conftest import REPO_ROOT
from tests.test_reports import report_db  # noqa: F401 - the module's shared database


@pytest.fixture
def reports_root(tmp_path):
    return tmp_path / "reports"


@pytest.fixture
def run(monkeypatch, reports_root):
    """`iiot` in this process, with the environment naming a database and the reports root."""
    for key in [k for k in os.environ if k.startswith("IIOT_")]:
        monkeypatch.delenv(key)

    def invoke(url, *args):
        monkeypatch.setenv("IIOT_DATABASE_URL", url)
        monkeypatch.setenv("IIOT_REPORTS_ROOT", str(reports_root))
        return CliRunner().invoke(main, ["report", *args], catch_exceptions=False)

    return invoke


def written(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_report_has_help():
    result = CliRunner().invoke(main, ["report", "--help"])
    assert result.exit_code == 0
    assert "2026-W44" in result.output
    assert "--progress / --no-progress" in result.output


def test_a_week_and_a_range_of_days_in_the_asked_formats(run, report_db, reports_root):  # noqa: F811
    result = run(report_db.url, "--tenant", "acme", "--period", "2026-W44", "--format", "xlsx")
    assert result.exit_code == 0, result.output
    path = reports_root / "acme" / "2026-W44" / "consumption.xlsx"
    assert f"acme 2026-W44 xlsx: {path} (" in result.stdout
    assert "1 report files written" in result.stdout
    assert written(reports_root) == ["acme/2026-W44/consumption.xlsx"]
    daily = list(load_workbook(path, read_only=True)["Diário"].iter_rows(values_only=True))
    days = [row[0].date().isoformat() for row in daily[1:]]
    assert days[0] == "2026-10-26"
    assert days[-1] == "2026-11-01"  # Monday to Sunday
    assert len(days) == 7

    first = path.stat().st_mtime_ns
    again = run(
        report_db.url,
        *("--tenant", "acme", "--tenant", "beta"),
        *("--period", "2026-W44", "--period", "2026-10-01..2026-10-15"),
    )
    assert again.exit_code == 0, again.output
    assert "8 report files written" in again.stdout
    assert path.stat().st_mtime_ns > first  # the stable name was replaced
    assert written(reports_root) == [
        "acme/2026-10-01..2026-10-15/consumption.pdf",
        "acme/2026-10-01..2026-10-15/consumption.xlsx",
        "acme/2026-W44/consumption.pdf",
        "acme/2026-W44/consumption.xlsx",
        "beta/2026-10-01..2026-10-15/consumption.pdf",
        "beta/2026-10-01..2026-10-15/consumption.xlsx",
        "beta/2026-W44/consumption.pdf",
        "beta/2026-W44/consumption.xlsx",
    ]  # and no temporary file left behind


def test_repeated_tenants_and_periods_are_made_once(run, report_db, reports_root):  # noqa: F811
    result = run(
        report_db.url,
        *("--tenant", "beta", "--tenant", "beta"),
        *("--period", "2026-10-05", "--period", "2026-10-05..2026-10-05"),
        *("--format", "pdf", "--format", "pdf"),
    )
    assert result.exit_code == 0, result.output
    assert "note: --tenant beta given more than once; made once" in result.stderr
    assert "note: --period 2026-10-05..2026-10-05 is 2026-10-05, given more than once" in (
        result.stderr
    )
    assert written(reports_root) == ["beta/2026-10-05/consumption.pdf"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--tenant", "acme", "--period", "2026-13"], 1, "error: bad period '2026-13': month"),
        (["--tenant", "acme", "--period", "2026-W60"], 1, "error: bad period '2026-W60'"),
        (["--tenant", "acme", "--period", "2026-10-31..2026-10-01"], 1, "ends before it starts"),
        (["--tenant", "acme", "--period", "../../etc"], 1, "error: bad period '../../etc'"),
        (["--tenant", "../acme", "--period", "2026-10"], 1, "error: bad tenant slug '../acme'"),
        (["--tenant", "Acme; DROP", "--period", "2026-10"], 1, "error: bad tenant slug"),
        (["--tenant", "nobody", "--period", "2026-10"], 1, "error: unknown tenant 'nobody'"),
        (["--tenant", "acme", "--period", "2031-01"], 1, "has not started yet in acme's time zone"),
        (["--tenant", "acme", "--period", "2026-10", "--format", "csv"], 2, "'csv' is not one of"),
        (["--tenant", "acme"], 2, "Missing option '--period'"),
        (["--period", "2026-10"], 2, "Missing option '--tenant'"),
    ],
)
def test_bad_input_is_refused_in_one_line_and_writes_nothing(
    run,
    report_db,  # noqa: F811
    reports_root,
    args,
    code,
    message,
):
    result = run(report_db.url, *args)
    assert result.exit_code == code
    assert message in result.output
    if code == 1:
        assert result.stderr.count("\n") == 1  # one line, no traceback
    assert not reports_root.exists()


def test_a_second_bad_period_stops_the_call_before_any_file(run, report_db, reports_root):  # noqa: F811
    result = run(report_db.url, "--tenant", "acme", "--period", "2026-10", "--period", "2026-1")
    assert result.exit_code == 1
    assert "bad period '2026-1'" in result.stderr
    assert not reports_root.exists()


def test_too_many_reports_in_one_call(run, report_db, reports_root):  # noqa: F811
    days = [f"2026-{m:02d}-{d:02d}" for m in range(1, 9) for d in range(1, 29)][:201]
    result = run(report_db.url, "--tenant", "acme", *(x for d in days for x in ("--period", d)))
    assert result.exit_code == 1
    assert "201 reports asked for; at most 200 in one call" in result.stderr


def test_a_reports_root_that_cannot_be_written(run, report_db, reports_root):  # noqa: F811
    reports_root.parent.mkdir(parents=True, exist_ok=True)
    reports_root.write_text("a file, not a directory")
    result = run(report_db.url, "--tenant", "beta", "--period", "2026-10", "--format", "pdf")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot write ")
    assert f"(IIOT_REPORTS_ROOT={reports_root})" in result.stderr
    assert result.stderr.count("\n") == 1


def test_marts_not_built_yet(run, database_url, reports_root):
    result = run(database_url, "--tenant", "acme", "--period", "2026-10")
    assert result.exit_code == 1
    assert "error: the marts are not built yet" in result.stderr
    assert "run marts_job" in result.stderr


def test_progress_lines_without_a_terminal_only_when_asked(run, report_db):  # noqa: F811
    args = ("--tenant", "beta", "--period", "2026-10", "--format", "xlsx")
    quiet = run(report_db.url, *args)
    assert "%" not in quiet.stderr
    shown = run(report_db.url, *args, "--progress")
    assert shown.stderr.splitlines()[-1] == "beta 2026-10 xlsx 100%"
    assert "%" not in run(report_db.url, *args, "--no-progress").stderr


def test_a_progress_bar_on_a_terminal(report_db, tmp_path):  # noqa: F811
    """stderr is a pseudo-terminal, as in an operator's shell: click draws its bar there."""
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(IIOT_DATABASE_URL=report_db.url, IIOT_REPORTS_ROOT=str(tmp_path / "reports"))
    args = ["report", "--tenant", "acme", "--period", "2026-10", "--format", "pdf"]
    process = subprocess.Popen(
        [sys.executable, "-m", "iiot_orchestration.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    stdout, _ = process.communicate(timeout=60)
    os.close(leader)
    assert process.returncode == 0, seen.decode(errors="replace")
    text = seen.decode(errors="replace")
    assert "acme 2026-10 pdf  [" in text
    assert "100%" in text
    assert b"consumption.pdf" in stdout
