"""``iiot report``: consumption reports for any month, ISO week or range of days, on demand
(docs/reports.md). The monthly reports are also made by Dagster; both write the same files."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import click

from iiot_orchestration.cli_common import _settings, friendly_errors
from iiot_orchestration.db import connect
from iiot_orchestration.reports import (
    FORMATS,
    ReportError,
    load_report,
    parse_period,
    work_units,
    write_report,
)
from iiot_orchestration.reports.data import Period, check_slug, require_marts

MAX_REPORTS = 200  # tenants x periods in one call
PROGRESS_LINES = 10  # without a terminal, --progress prints a line per tenth


def _unique(values: Sequence[str], what: str) -> list[str]:
    """The values once each, in order; a repeated one is noted, not an error."""
    seen: list[str] = []
    for value in values:
        if value in seen:
            click.echo(f"note: {what} {value} given more than once; made once", err=True)
        else:
            seen.append(value)
    return seen


class _LineProgress:
    """--progress without a terminal: one line per tenth, which logs can keep."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.shown = label, max(total, 1), 0

    def update_to(self, done: int) -> None:
        tenth = min(done * PROGRESS_LINES // self.total, PROGRESS_LINES)
        if tenth > self.shown:
            self.shown = tenth
            click.echo(f"{self.label} {tenth * 100 // PROGRESS_LINES}%", err=True)


@contextmanager
def _progress_bar(show: bool, label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A callback taking the units done so far: a bar on a terminal, lines otherwise."""
    if not show:
        yield lambda done: None
        return
    if not sys.stderr.isatty():
        lines = _LineProgress(label, total)
        yield lines.update_to
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        position = 0

        def update(done: int) -> None:
            nonlocal position
            if done > position:
                bar.update(min(done, total) - position)
                position = min(done, total)

        yield update


def _size(size: int) -> str:
    return f"{size / 1024:,.0f} KiB" if size >= 1024 else f"{size} bytes"


@click.command("report")
@click.option(
    "--tenant",
    "tenants",
    multiple=True,
    required=True,
    help="Tenant slug; repeat for several tenants.",
)
@click.option(
    "--period",
    "periods",
    multiple=True,
    required=True,
    help="A month 2026-10, an ISO week 2026-W44, a day 2026-10-05 or a range of days "
    "2026-10-01..2026-10-15 (in the tenant's time zone); repeat for several.",
)
@click.option(
    "--format",
    "formats",
    type=click.Choice(FORMATS),
    multiple=True,
    help="pdf or xlsx [default: both]; repeat for both.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show progress [default: on a terminal]; without a terminal, a line per tenth.",
)
@friendly_errors
def report_command(
    tenants: tuple[str, ...],
    periods: tuple[str, ...],
    formats: tuple[str, ...],
    progress: bool | None,
) -> None:
    """Write consumption reports (PDF and Excel) of tenants for periods, from the marts, to
    IIOT_REPORTS_ROOT/<tenant>/<period>/consumption.<pdf|xlsx>, replacing earlier ones."""
    slugs = _unique([check_slug(t) for t in tenants], "--tenant")
    parsed: dict[str, Period] = {}
    for text in periods:
        period = parse_period(text)
        if period.label in parsed:
            click.echo(
                f"note: --period {text} is {period.label}, given more than once; made once",
                err=True,
            )
        parsed[period.label] = period
    chosen = list(dict.fromkeys(formats)) or list(FORMATS)
    if len(slugs) * len(parsed) > MAX_REPORTS:
        raise ReportError(
            f"{len(slugs) * len(parsed)} reports asked for; at most {MAX_REPORTS} in one call"
        )
    settings = _settings()
    root = settings.reports_root
    show = sys.stderr.isatty() if progress is None else progress
    written = 0
    with connect(settings.require_database_url(), role="platform_rw") as conn:
        require_marts(conn)
        reports = []
        for slug in slugs:  # every tenant and period checked before any file is written
            for period in parsed.values():
                report = load_report(conn, slug, period)
                if report.period_hours == 0:
                    raise ReportError(
                        f"period {period.label} has not started yet in {slug}'s time zone "
                        f"({report.tenant.timezone})"
                    )
                reports.append(report)
    for report in reports:
        for fmt in chosen:
            label = f"{report.tenant.slug} {report.period.label} {fmt}"
            with _progress_bar(show, label, work_units(report, fmt)) as update:
                [done] = write_report(report, root, [fmt], lambda _f, n, _t: update(n))
            detail = f"{done.pages} pages" if done.pages is not None else f"{done.rows:,} rows"
            click.echo(f"{label}: {done.path} ({_size(done.size)}, {detail})")
            written += 1
    click.echo(f"{written} report files written under {root}")
