"""All configuration, read from ``IIOT_*`` environment variables with typed defaults.

Every variable is declared once in ``VARIABLES``; the README and ``iiot config`` are built from
the same list, so a variable cannot exist without documentation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from psycopg.conninfo import conninfo_to_dict

from iiot_orchestration.errors import IiotError
from iiot_orchestration.logs import LOG_FORMATS, LOG_LEVELS

StorageMode = Literal["auto", "timescale", "postgres"]
STORAGE_MODES: tuple[str, ...] = ("auto", "timescale", "postgres")
MQTT_PROTOCOLS: tuple[str, ...] = ("auto", "5", "3.1.1")
_TOPIC_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]+$")


class SettingsError(IiotError, ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Variable:
    name: str
    default: str | None
    expected: str
    description: str
    parse: Callable[[str], Any]


def _database_url(raw: str) -> str:
    if not raw.startswith(("postgresql://", "postgres://")):
        raise ValueError("must start with postgresql://")
    try:
        conninfo_to_dict(raw)
    except psycopg.Error as exc:
        raise ValueError(str(exc).strip()) from None
    return raw


def _mqtt_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError("must look like mqtt://host:port or mqtts://host:port")
    if parts.port is not None and not 0 < parts.port < 65536:
        raise ValueError("port must be between 1 and 65535")
    return raw


def _topic_prefix(raw: str) -> str:
    segments = raw.split("/")
    if not all(_TOPIC_SEGMENT.match(s) for s in segments):
        raise ValueError("must be topic segments of letters, digits, '_', '.', '-' joined by '/'")
    return raw


def _choice(options: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"must be a whole number from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return value

    return parse


def _timezone(raw: str) -> str:
    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("must be an IANA time zone such as America/Sao_Paulo") from None
    return raw


def _path(raw: str) -> Path:
    if not raw.strip() or "\x00" in raw:
        raise ValueError("must be a directory path")
    return Path(raw).expanduser()


def _location(raw: str) -> str:
    """A local directory or an fsspec URL (s3://bucket/prefix)."""
    if not raw.strip() or "\x00" in raw:
        raise ValueError("must be a directory path or a URL such as s3://bucket/prefix")
    return raw


def _root(raw: str) -> Path | str:
    """A storage root (filestore.py): a local directory, kept a Path exactly as before, or an
    fsspec URL such as s3://bucket/prefix, kept as given."""
    if not raw.strip() or "\x00" in raw:
        raise ValueError("must be a directory path or a URL such as s3://bucket/prefix")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", raw) and not raw.startswith("file://"):
        return raw
    return Path(raw.removeprefix("file://")).expanduser()


def _file(raw: str) -> Path:
    if not raw.strip() or "\x00" in raw:
        raise ValueError("must be a file path")
    return Path(raw).expanduser()


def _switch(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("on", "off"):
        raise ValueError("must be on or off")
    return value == "on"


def _auto_switch(raw: str) -> bool | None:
    """``auto`` is None: the code that reads it decides."""
    value = raw.strip().lower()
    if value not in ("auto", "on", "off"):
        raise ValueError("must be auto, on or off")
    return None if value == "auto" else value == "on"


def _memory_size(raw: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]{0,6}(kB|MB|GB)", raw):
        raise ValueError("must be a whole number followed by kB, MB or GB")
    return raw


def _http_url(raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http:// or https:// URL with a host")
    return raw.strip()


def _text(raw: str) -> str:
    if not raw.strip() or len(raw) > 200 or any(c.isspace() for c in raw.strip()):
        raise ValueError("empty, longer than 200 characters or containing spaces")
    return raw.strip()


def _stanza(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", raw.strip()):
        raise ValueError("must be letters, digits, '_', '.' or '-' (at most 64)")
    return raw.strip()


def _os_user(raw: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", raw.strip()):
        raise ValueError("must be an operating-system user name such as postgres")
    return raw.strip()


PLAN_ID = re.compile(r"^[a-z][a-z0-9_]{1,30}$")


def _per_plan(low: int, high: int) -> Callable[[str], tuple[tuple[str, int], ...]]:
    """``plan=number`` pairs separated by commas, e.g. ``starter=48,pro=26``."""

    def parse(raw: str) -> tuple[tuple[str, int], ...]:
        pairs: dict[str, int] = {}
        for item in raw.split(","):
            plan, sep, number = item.strip().partition("=")
            plan, number = plan.strip(), number.strip()
            if not sep or not PLAN_ID.match(plan):
                raise ValueError(f"{item.strip()[:40]!r} is not plan=number")
            if plan in pairs:
                raise ValueError(f"plan {plan} is given twice")
            if not re.fullmatch(r"[0-9]{1,9}", number) or not low <= int(number) <= high:
                raise ValueError(f"{plan}: must be a whole number from {low} to {high}")
            pairs[plan] = int(number)
        return tuple(pairs.items())

    return parse


def per_plan_text(pairs: tuple[tuple[str, int], ...]) -> str:
    return ",".join(f"{plan}={value}" for plan, value in pairs)


def _date(raw: str) -> date:
    try:
        if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", raw.strip()):
            raise ValueError
        return date.fromisoformat(raw.strip())
    except ValueError:
        raise ValueError("must be a date written YYYY-MM-DD") from None


def _host(raw: str) -> str:
    if not re.match(r"^[A-Za-z0-9.:-]+$", raw):
        raise ValueError("must be a host name or IP address")
    return raw


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "IIOT_DATABASE_URL",
        None,
        "postgresql://user@host:port/database",
        "Application database. Unset: `iiot dev` starts an embedded PostgreSQL.",
        _database_url,
    ),
    Variable(
        "IIOT_DAGSTER_DATABASE_URL",
        None,
        "postgresql://user@host:port/database",
        "Dagster's run, event-log and schedule storage. Unset: the application database's "
        "server with the database name suffixed `_dagster`.",
        _database_url,
    ),
    Variable(
        "IIOT_MQTT_URL",
        None,
        "mqtt://host:port or mqtts://host:port",
        "MQTT broker. Unset: `iiot dev` starts Mosquitto (if on PATH) or the in-process amqtt "
        "broker.",
        _mqtt_url,
    ),
    Variable(
        "IIOT_MQTT_PROTOCOL",
        "auto",
        "auto, 5 or 3.1.1",
        "MQTT version of `iiot ingest` and `iiot simulate`. `auto` tries MQTT 5 and falls back "
        "to 3.1.1 when the broker refuses it.",
        _choice(MQTT_PROTOCOLS),
    ),
    Variable(
        "IIOT_MQTT_CA_FILE",
        None,
        "a file path",
        "PEM CA certificates that the broker's certificate must chain to (`mqtts://` only). "
        "Unset: the system's CAs.",
        _file,
    ),
    Variable(
        "IIOT_MQTT_CERT_FILE",
        None,
        "a file path",
        "PEM client certificate presented to an `mqtts://` broker; needs IIOT_MQTT_KEY_FILE.",
        _file,
    ),
    Variable(
        "IIOT_MQTT_KEY_FILE",
        None,
        "a file path",
        "Unencrypted PEM private key of IIOT_MQTT_CERT_FILE.",
        _file,
    ),
    Variable(
        "IIOT_MQTT_SHARED_SUBSCRIPTION",
        "auto",
        "auto, on or off",
        "`auto`: the plain topic filter when the ingest group has one slot, "
        "`$share/<group>/...` when it has more (a broker restart then loses nothing on "
        "Mosquitto, which restores plain subscriptions only). `on`: always shared. `off`: "
        "always plain, for one ingest process on a broker without shared subscriptions (amqtt).",
        _auto_switch,
    ),
    Variable(
        "IIOT_TOPIC_PREFIX",
        "iiot",
        "topic segments of letters, digits, '_', '.' and '-' joined by '/', such as iiot or "
        "acme/site1",
        "Prefix of every topic: `<prefix>/devices/{mac}/telemetry`.",
        _topic_prefix,
    ),
    Variable(
        "IIOT_STORAGE",
        "auto",
        "auto, timescale or postgres",
        "Storage mode chosen at the first migration: TimescaleDB hypertable or native daily "
        "partitions. `auto` uses TimescaleDB when the extension is available.",
        _choice(STORAGE_MODES),
    ),
    Variable(
        "IIOT_DATA_DIR",
        "var",
        "a directory path",
        "Root for local state (embedded database, Dagster home, broker data).",
        _path,
    ),
    Variable(
        "IIOT_ARCHIVE_ROOT",
        None,
        "a directory path or an fsspec URL such as s3://bucket/prefix",
        "Parquet archives of expired telemetry. Unset: `<IIOT_DATA_DIR>/archive`.",
        _location,
    ),
    Variable(
        "IIOT_RETENTION_BATCH_ROWS",
        "50000",
        "a whole number from 100 to 1000000",
        "Archived readings removed per transaction when retention deletes one tenant's rows from "
        "a day that other tenants still retain (docs/retention.md).",
        _int_range(100, 1_000_000),
    ),
    Variable(
        "IIOT_COMPRESS_AFTER_DAYS",
        "7",
        "a whole number from 1 to 3650",
        "TimescaleDB mode: the compression asset compresses telemetry chunks older than this "
        "many days (once columnstore is enabled, docs/retention.md).",
        _int_range(1, 3650),
    ),
    Variable(
        "IIOT_BACKUP_ROOT",
        None,
        "a directory path or an fsspec URL such as s3://bucket/prefix",
        "Database backups and their manifests. Unset: `<IIOT_DATA_DIR>/backups`.",
        _root,
    ),
    Variable(
        "IIOT_BACKUP_DATABASE_URL",
        None,
        "postgresql://user@host:port/database",
        "Login that `pg_dump` and the restore drill use: reads every table past row security "
        "and may create databases (docs/backups.md). Unset: IIOT_DATABASE_URL.",
        _database_url,
    ),
    Variable(
        "IIOT_BACKUP_KEEP_DAILY",
        "7",
        "a whole number from 1 to 366",
        "Backups kept for the newest days that have one (the newest backup of each day).",
        _int_range(1, 366),
    ),
    Variable(
        "IIOT_BACKUP_KEEP_WEEKLY",
        "4",
        "a whole number from 0 to 520",
        "Backups kept for the newest ISO weeks that have one (the newest of each week), on top "
        "of the daily ones.",
        _int_range(0, 520),
    ),
    Variable(
        "IIOT_BACKUP_RPO_HOURS",
        "starter=48,pro=26,enterprise=26",
        "plan=hours pairs, e.g. starter=48,pro=26",
        "Recovery point objective per plan: the newest backup must be younger than this. The "
        "database's target is the strictest among the plans of active tenants; a plan not "
        "listed gets the strictest listed value.",
        _per_plan(1, 8760),
    ),
    Variable(
        "IIOT_BACKUP_RTO_MINUTES",
        "starter=480,pro=240,enterprise=60",
        "plan=minutes pairs, e.g. starter=480,pro=240",
        "Recovery time objective per plan: a restore drill's checksum, restore and verification "
        "must take less than this (same rule for the database's target).",
        _per_plan(1, 10080),
    ),
    Variable(
        "IIOT_PITR_STANZA",
        None,
        "a pgBackRest stanza name: letters, digits, _ . - (at most 64)",
        "Point-in-time recovery with pgBackRest: the stanza (pgBackRest's name for the database's "
        "cluster) that `iiot backup pitr` configures, backs up and drills "
        "(docs/operations.md#point-in-time-recovery). Unset: no PITR, the logical backups only.",
        _stanza,
    ),
    Variable(
        "IIOT_PITR_REPO",
        None,
        "a directory path",
        "pgBackRest repository: base backups and archived WAL (keep it on another disk or "
        "host). Unset: `<IIOT_DATA_DIR>/pgbackrest/repo`.",
        _path,
    ),
    Variable(
        "IIOT_PITR_CONFIG",
        None,
        "a file path",
        "The pgbackrest.conf that `iiot backup pitr setup` writes and every pgBackRest command "
        "and the archive_command read; pgBackRest's log, lock and spool directories go next to "
        "it. Unset: `<IIOT_DATA_DIR>/pgbackrest/pgbackrest.conf`.",
        _file,
    ),
    Variable(
        "IIOT_PITR_OS_USER",
        "postgres",
        "an operating-system user name",
        "When iiot runs as root: the user pgBackRest and the drill's scratch cluster run as "
        "(PostgreSQL refuses root), and who owns the repository. Otherwise both run as the "
        "current user.",
        _os_user,
    ),
    Variable(
        "IIOT_PITR_SCRATCH_DIR",
        None,
        "a directory path",
        "Where a PITR drill restores its scratch cluster (room for a copy of the whole cluster; "
        "removed after the drill). Unset: `<IIOT_DATA_DIR>/pitr-scratch`.",
        _path,
    ),
    Variable(
        "IIOT_PITR_RPO_MINUTES",
        "5",
        "a whole number from 1 to 1440",
        "PITR recovery point objective: the newest restorable instant (the newest WAL in the "
        "repository) may be at most this old, as the PITR drill and the hourly check measure.",
        _int_range(1, 1440),
    ),
    Variable(
        "IIOT_PITR_ARCHIVE_TIMEOUT_SECONDS",
        "60",
        "a whole number from 15 to 3600",
        "archive_timeout that `iiot backup pitr setup` sets: while the database writes, a WAL "
        "segment reaches the repository at least this often (keep it well under the RPO).",
        _int_range(15, 3600),
    ),
    Variable(
        "IIOT_PITR_RETENTION_FULL",
        "2",
        "a whole number from 1 to 100",
        "Full pgBackRest backups kept, with their incremental backups and the WAL to replay "
        "them; older ones expire after each backup.",
        _int_range(1, 100),
    ),
    Variable(
        "IIOT_PITR_PROCESS_MAX",
        "2",
        "a whole number from 1 to 64",
        "pgBackRest processes that compress and copy files in parallel during a backup or a "
        "restore.",
        _int_range(1, 64),
    ),
    Variable(
        "IIOT_PITR_PG_BINDIR",
        None,
        "a directory path",
        "PostgreSQL server binaries (postgres, pg_ctl) of the clusters PITR restores start. "
        "Unset: `/usr/lib/postgresql/<major>/bin` of the backed-up server's major version.",
        _path,
    ),
    Variable(
        "IIOT_REPORTS_ROOT",
        None,
        "a directory path or an fsspec URL such as s3://bucket/prefix",
        "Generated PDF and Excel reports. Unset: `<IIOT_DATA_DIR>/reports`.",
        _root,
    ),
    Variable(
        "IIOT_PKI_DIR",
        None,
        "a directory path or an fsspec URL such as s3://bucket/prefix",
        "The device CA (key mode 0600), the CRL and the broker's TLS files (docs/certificates.md). "
        "Unset: `<IIOT_DATA_DIR>/pki`.",
        _root,
    ),
    Variable(
        "IIOT_PKI_CA_KEY_FILE",
        None,
        "a file path",
        "The device CA's private key (mode 0600), a local file such as a mounted secret; never in "
        "object storage. Required when IIOT_PKI_DIR is a URL. Unset: `<IIOT_PKI_DIR>/ca.key`.",
        _file,
    ),
    Variable(
        "IIOT_CERT_RENEWAL_BATCH_SIZE",
        "10",
        "a whole number from 1 to 100000",
        "Devices whose certificates the daily OTA renewal batch renews at most (soonest expiry "
        "first).",
        _int_range(1, 100_000),
    ),
    Variable(
        "IIOT_CERT_OFFLINE_DAYS",
        "7",
        "a whole number from 1 to 3650",
        "The renewal batch skips devices that have not reported for this many days.",
        _int_range(1, 3650),
    ),
    Variable(
        "IIOT_CERT_ACK_TIMEOUT_HOURS",
        "48",
        "a whole number from 1 to 8760",
        "A published certificate update not acknowledged within this many hours has failed; the "
        "device keeps its certificate and a later batch retries.",
        _int_range(1, 8760),
    ),
    Variable(
        "IIOT_CERT_RETRY_BACKOFF_HOURS",
        "24",
        "a whole number from 1 to 8760",
        "Wait after a device's first failed renewal before the next attempt; it doubles with "
        "each further failure, up to 30 days.",
        _int_range(1, 8760),
    ),
    Variable(
        "IIOT_PARTITIONS_AHEAD_DAYS",
        "7",
        "a whole number from 1 to 366",
        "Days of telemetry partitions created ahead of today (PostgreSQL mode).",
        _int_range(1, 366),
    ),
    Variable(
        "IIOT_PARTITIONS_START",
        None,
        "a date such as 2026-01-01",
        "First day of the Dagster daily and monthly partitions (rollups, retention, billing, "
        "reports). Unset: the day the database was first migrated, or the day of its oldest "
        "reading if older; today when the database cannot be read as the code location loads.",
        _date,
    ),
    Variable(
        "IIOT_ROLLUP_LAG_MINUTES",
        "5",
        "a whole number from 0 to 59",
        "Minutes past the hour the hourly rollup waits for stragglers; late-data marks also "
        "settle this long before the sensor acts on them.",
        _int_range(0, 59),
    ),
    Variable(
        "IIOT_ROLLUP_WORK_MEM",
        "256MB",
        "a PostgreSQL memory size such as 64MB or 1GB",
        "work_mem for the rollup transactions (aggregation and sorting stay in memory).",
        _memory_size,
    ),
    Variable(
        "IIOT_FRESHNESS_MINUTES",
        "15",
        "a whole number from 1 to 10080",
        "Raw telemetry is stale when no online device reported for this long (asset check).",
        _int_range(1, 10080),
    ),
    Variable(
        "IIOT_DEFAULT_TIMEZONE",
        "America/Sao_Paulo",
        "an IANA time zone such as America/Sao_Paulo",
        "Time zone given to new tenants that do not name one.",
        _timezone,
    ),
    Variable(
        "IIOT_MAX_CONCURRENT_RUNS",
        "4",
        "a whole number from 1 to 100",
        "Dagster runs allowed at once by the queued run coordinator.",
        _int_range(1, 100),
    ),
    Variable(
        "IIOT_BILLING_NIGHTLY_SHARDS",
        "1",
        "a whole number from 1 to 64",
        "Runs a time zone's bulk billing night is split into (billing_nightly), so that several "
        "Celery workers share it; a tenant's run follows from its slug alone (docs/billing.md).",
        _int_range(1, 64),
    ),
    Variable(
        "IIOT_RETRY_MAX",
        "3",
        "a whole number from 0 to 10",
        "Retries of a nightly asset (billing, reports, marts, backups, certificates, retention) "
        "after a transient failure such as a lost database connection; 0 turns them off "
        "(docs/operations.md).",
        _int_range(0, 10),
    ),
    Variable(
        "IIOT_RETRY_DELAY_SECONDS",
        "30",
        "a whole number from 0 to 3600",
        "Wait before the first retry; it doubles with each further retry, +-50 % at random.",
        _int_range(0, 3600),
    ),
    Variable(
        "IIOT_DAGSTER_HOST",
        "127.0.0.1",
        "a host name or IP address",
        "Interface the Dagster webserver started by `iiot dev` listens on.",
        _host,
    ),
    Variable(
        "IIOT_DAGSTER_PORT",
        "3000",
        "a port from 1 to 65535",
        "Port of the Dagster webserver started by `iiot dev`.",
        _int_range(1, 65535),
    ),
    Variable(
        "IIOT_API_HOST",
        "127.0.0.1",
        "a host name or IP address",
        "Interface `iiot api` (and the API started by `iiot dev`) listens on (docs/api.md).",
        _host,
    ),
    Variable(
        "IIOT_API_PORT",
        "8000",
        "a port from 1 to 65535",
        "Port of `iiot api`.",
        _int_range(1, 65535),
    ),
    Variable(
        "IIOT_API_WORKERS",
        "1",
        "a whole number from 1 to 64",
        "Processes `iiot api` serves requests with (uvicorn workers); each gets an equal share "
        "of every key's rate limit.",
        _int_range(1, 64),
    ),
    Variable(
        "IIOT_API_RATE_PER_SECOND",
        "20",
        "a whole number from 1 to 100000",
        "Requests a second each API key may make on average (a token bucket per key); more "
        "get 429 with Retry-After.",
        _int_range(1, 100_000),
    ),
    Variable(
        "IIOT_API_RATE_BURST",
        "40",
        "a whole number from 1 to 100000",
        "Requests an API key may make at once before IIOT_API_RATE_PER_SECOND applies.",
        _int_range(1, 100_000),
    ),
    Variable(
        "IIOT_API_MAX_BODY_BYTES",
        "2097152",
        "a whole number of bytes from 1024 to 1073741824",
        "Largest request body the API accepts (a device CSV included); larger gets 413.",
        _int_range(1024, 1 << 30),
    ),
    Variable(
        "IIOT_API_EXPORT_MAX_ROWS",
        "10000000",
        "a whole number from 1 to 1000000000",
        "Most rows one export may hold; a larger range gets 413 before anything is sent.",
        _int_range(1, 1_000_000_000),
    ),
    Variable(
        "IIOT_API_EXPORT_TIMEOUT_SECONDS",
        "600",
        "a whole number from 1 to 86400",
        "Longest an export may run (PostgreSQL statement_timeout of its query).",
        _int_range(1, 86_400),
    ),
    Variable(
        "IIOT_API_POOL_TIMEOUT_SECONDS",
        "10",
        "a whole number from 1 to 300",
        "Longest a request waits for a database connection of the API's pools; then 503.",
        _int_range(1, 300),
    ),
    Variable(
        "IIOT_API_KEY_GRACE_HOURS",
        "24",
        "a whole number from 0 to 8760",
        "After `iiot api-keys rotate`, hours the old key keeps working beside the new one.",
        _int_range(0, 8760),
    ),
    Variable(
        "IIOT_ALERT_WEBHOOK_URL",
        None,
        "an http:// or https:// URL",
        "Generic JSON webhook every alert is POSTed to (docs/alerts.md). Unset, and no "
        "Telegram: alerts go to the log.",
        _http_url,
    ),
    Variable(
        "IIOT_TELEGRAM_BOT_TOKEN",
        None,
        "a bot token",
        "Telegram bot that sends alerts to IIOT_TELEGRAM_CHAT_ID (shown masked).",
        _text,
    ),
    Variable(
        "IIOT_TELEGRAM_CHAT_ID",
        None,
        "a chat id such as -100123 or @channel",
        "Chat the Telegram bot posts alerts to.",
        _text,
    ),
    Variable(
        "IIOT_TELEGRAM_API_URL",
        "https://api.telegram.org",
        "an http:// or https:// URL",
        "Base URL of the Telegram-compatible bot API.",
        _http_url,
    ),
    Variable(
        "IIOT_ALERT_DEDUP_MINUTES",
        "30",
        "a whole number from 1 to 10080",
        "The same alert (same key) is not sent again within this many minutes.",
        _int_range(1, 10080),
    ),
    Variable(
        "IIOT_ALERT_DEAD_LETTER_THRESHOLD",
        "100",
        "a whole number from 1 to 1000000000",
        "Dead letters in the last hour above which the dead-letter backlog sensor alerts.",
        _int_range(1, 1_000_000_000),
    ),
    Variable(
        "IIOT_DEAD_LETTER_RETENTION_DAYS",
        "30",
        "a whole number from 1 to 3650",
        "Dead letters older than this many days are deleted by the daily dead_letter_retention "
        "asset (docs/ingest.md).",
        _int_range(1, 3650),
    ),
    Variable(
        "IIOT_UNKNOWN_DEVICE_DEAD_LETTERS_PER_MINUTE",
        "10",
        "a whole number from 0 to 1000000",
        "Dead letters `iiot ingest` stores per minute for a MAC no device has; further messages "
        "of that MAC are only counted (docs/ingest.md).",
        _int_range(0, 1_000_000),
    ),
    Variable(
        "IIOT_LOG_LEVEL",
        "INFO",
        "DEBUG, INFO, WARNING or ERROR",
        "Log level of the CLI and daemons.",
        _choice(LOG_LEVELS, upper=True),
    ),
    Variable(
        "IIOT_LOG_FORMAT",
        "text",
        "text or json",
        "Log format of the CLI and daemons: `text` lines, or one JSON object per line.",
        _choice(LOG_FORMATS),
    ),
)
VARIABLES_BY_NAME = {v.name: v for v in VARIABLES}


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    dagster_database_url: str | None
    mqtt_url: str | None
    mqtt_protocol: str
    mqtt_ca_file: Path | None
    mqtt_cert_file: Path | None
    mqtt_key_file: Path | None
    mqtt_shared_subscription: bool | None  # None: auto (shared when the group has 2+ slots)
    topic_prefix: str
    storage: StorageMode
    data_dir: Path
    archive_root: str
    backup_root: Path | str  # a local directory, or an fsspec URL (filestore.py)
    reports_root: Path | str
    partitions_ahead_days: int
    partitions_start: date | None
    rollup_lag_minutes: int
    rollup_work_mem: str
    freshness_minutes: int
    default_timezone: str
    max_concurrent_runs: int
    dagster_host: str
    dagster_port: int
    log_level: str
    alert_webhook_url: str | None = None
    telegram_bot_token: str | None = None
    telegram_chat_id: str | None = None
    telegram_api_url: str = "https://api.telegram.org"
    alert_dedup_minutes: int = 30
    alert_dead_letter_threshold: int = 100
    backup_database_url: str | None = None
    backup_keep_daily: int = 7
    backup_keep_weekly: int = 4
    backup_rpo_hours: tuple[tuple[str, int], ...] = (
        ("starter", 48),
        ("pro", 26),
        ("enterprise", 26),
    )
    backup_rto_minutes: tuple[tuple[str, int], ...] = (
        ("starter", 480),
        ("pro", 240),
        ("enterprise", 60),
    )
    pki_dir: Path | str = Path("var") / "pki"
    pki_ca_key_file: Path | None = None
    cert_renewal_batch_size: int = 10
    cert_offline_days: int = 7
    cert_ack_timeout_hours: int = 48
    cert_retry_backoff_hours: int = 24
    retention_batch_rows: int = 50_000
    compress_after_days: int = 7
    dead_letter_retention_days: int = 30
    unknown_device_dead_letters_per_minute: int = 10
    log_format: str = "text"
    billing_nightly_shards: int = 1
    retry_max: int = 3
    retry_delay_seconds: int = 30
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = 1
    api_rate_per_second: int = 20
    api_rate_burst: int = 40
    api_max_body_bytes: int = 2 * 1024 * 1024
    api_export_max_rows: int = 10_000_000
    api_export_timeout_seconds: int = 600
    api_pool_timeout_seconds: int = 10
    api_key_grace_hours: int = 24
    pitr_stanza: str | None = None
    pitr_repo: Path = Path("var") / "pgbackrest" / "repo"
    pitr_config: Path = Path("var") / "pgbackrest" / "pgbackrest.conf"
    pitr_os_user: str = "postgres"
    pitr_scratch_dir: Path = Path("var") / "pitr-scratch"
    pitr_rpo_minutes: int = 5
    pitr_archive_timeout_seconds: int = 60
    pitr_retention_full: int = 2
    pitr_process_max: int = 2
    pitr_pg_bindir: Path | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def require_database_url(self) -> str:
        if not self.database_url:
            raise SettingsError(
                "IIOT_DATABASE_URL is not set: expected postgresql://user@host:port/database "
                "(or run `iiot dev`, which prints the URL of its embedded database)"
            )
        return self.database_url


def _read(environ: Mapping[str, str], var: Variable) -> tuple[Any, str]:
    raw = environ.get(var.name)
    if raw is None or raw == "":
        if var.default is None:
            return None, "unset"
        return var.parse(var.default), "default"
    try:
        return var.parse(raw), "environment"
    except ValueError as exc:
        shown = raw if len(raw) <= 80 else raw[:77] + "..."
        reason = str(exc)
        # a reason "must be ..." only restates the expected form; others say what is wrong
        if reason.startswith("must "):
            detail = f"expected {var.expected}"
        else:
            detail = f"{reason} (expected {var.expected})"
        raise SettingsError(f"{var.name}={shown!r} is invalid: {detail}") from None


def dagster_url_for(database_url: str) -> str:
    """The Dagster storage URL that sits next to an application database."""
    params = conninfo_to_dict(database_url)
    params["dbname"] = f"{params.get('dbname') or 'postgres'}_dagster"
    return to_url(params)


def to_url(params: Mapping[str, Any]) -> str:
    """A postgresql:// URL from libpq keywords (sockets given as ?host=)."""
    params = dict(params)
    user = params.pop("user", "") or ""
    password = params.pop("password", None)
    host = params.pop("host", "") or ""
    port = params.pop("port", None)
    dbname = params.pop("dbname", "") or ""
    auth = user + (f":{password}" if password else "")
    query = "&".join(f"{k}={v}" for k, v in params.items())
    if host.startswith("/"):
        query = "&".join(filter(None, [f"host={host}", f"port={port}" if port else "", query]))
        netloc = f"{auth}@" if auth else ""
    else:
        netloc = (f"{auth}@" if auth else "") + host + (f":{port}" if port else "")
    return f"postgresql://{netloc}/{dbname}" + (f"?{query}" if query else "")


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every ``IIOT_*`` variable; raise SettingsError naming the bad one."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for var in VARIABLES:
        values[var.name], sources[var.name] = _read(env, var)
    data_dir: Path = values["IIOT_DATA_DIR"]
    database_url = values["IIOT_DATABASE_URL"]
    dagster_url = values["IIOT_DAGSTER_DATABASE_URL"]
    if dagster_url is None and database_url:
        dagster_url = dagster_url_for(database_url)
    return Settings(
        database_url=database_url,
        dagster_database_url=dagster_url,
        mqtt_url=values["IIOT_MQTT_URL"],
        mqtt_protocol=values["IIOT_MQTT_PROTOCOL"],
        mqtt_ca_file=values["IIOT_MQTT_CA_FILE"],
        mqtt_cert_file=values["IIOT_MQTT_CERT_FILE"],
        mqtt_key_file=values["IIOT_MQTT_KEY_FILE"],
        mqtt_shared_subscription=values["IIOT_MQTT_SHARED_SUBSCRIPTION"],
        topic_prefix=values["IIOT_TOPIC_PREFIX"],
        storage=values["IIOT_STORAGE"],
        data_dir=data_dir,
        archive_root=values["IIOT_ARCHIVE_ROOT"] or str(data_dir / "archive"),
        backup_root=values["IIOT_BACKUP_ROOT"] or data_dir / "backups",
        reports_root=values["IIOT_REPORTS_ROOT"] or data_dir / "reports",
        partitions_ahead_days=values["IIOT_PARTITIONS_AHEAD_DAYS"],
        partitions_start=values["IIOT_PARTITIONS_START"],
        rollup_lag_minutes=values["IIOT_ROLLUP_LAG_MINUTES"],
        rollup_work_mem=values["IIOT_ROLLUP_WORK_MEM"],
        freshness_minutes=values["IIOT_FRESHNESS_MINUTES"],
        default_timezone=values["IIOT_DEFAULT_TIMEZONE"],
        max_concurrent_runs=values["IIOT_MAX_CONCURRENT_RUNS"],
        dagster_host=values["IIOT_DAGSTER_HOST"],
        dagster_port=values["IIOT_DAGSTER_PORT"],
        log_level=values["IIOT_LOG_LEVEL"],
        alert_webhook_url=values["IIOT_ALERT_WEBHOOK_URL"],
        telegram_bot_token=values["IIOT_TELEGRAM_BOT_TOKEN"],
        telegram_chat_id=values["IIOT_TELEGRAM_CHAT_ID"],
        telegram_api_url=values["IIOT_TELEGRAM_API_URL"],
        alert_dedup_minutes=values["IIOT_ALERT_DEDUP_MINUTES"],
        alert_dead_letter_threshold=values["IIOT_ALERT_DEAD_LETTER_THRESHOLD"],
        backup_database_url=values["IIOT_BACKUP_DATABASE_URL"] or database_url,
        backup_keep_daily=values["IIOT_BACKUP_KEEP_DAILY"],
        backup_keep_weekly=values["IIOT_BACKUP_KEEP_WEEKLY"],
        backup_rpo_hours=values["IIOT_BACKUP_RPO_HOURS"],
        backup_rto_minutes=values["IIOT_BACKUP_RTO_MINUTES"],
        pki_dir=values["IIOT_PKI_DIR"] or data_dir / "pki",
        pki_ca_key_file=values["IIOT_PKI_CA_KEY_FILE"],
        cert_renewal_batch_size=values["IIOT_CERT_RENEWAL_BATCH_SIZE"],
        cert_offline_days=values["IIOT_CERT_OFFLINE_DAYS"],
        cert_ack_timeout_hours=values["IIOT_CERT_ACK_TIMEOUT_HOURS"],
        cert_retry_backoff_hours=values["IIOT_CERT_RETRY_BACKOFF_HOURS"],
        retention_batch_rows=values["IIOT_RETENTION_BATCH_ROWS"],
        compress_after_days=values["IIOT_COMPRESS_AFTER_DAYS"],
        dead_letter_retention_days=values["IIOT_DEAD_LETTER_RETENTION_DAYS"],
        unknown_device_dead_letters_per_minute=values[
            "IIOT_UNKNOWN_DEVICE_DEAD_LETTERS_PER_MINUTE"
        ],
        log_format=values["IIOT_LOG_FORMAT"],
        billing_nightly_shards=values["IIOT_BILLING_NIGHTLY_SHARDS"],
        retry_max=values["IIOT_RETRY_MAX"],
        retry_delay_seconds=values["IIOT_RETRY_DELAY_SECONDS"],
        api_host=values["IIOT_API_HOST"],
        api_port=values["IIOT_API_PORT"],
        api_workers=values["IIOT_API_WORKERS"],
        api_rate_per_second=values["IIOT_API_RATE_PER_SECOND"],
        api_rate_burst=values["IIOT_API_RATE_BURST"],
        api_max_body_bytes=values["IIOT_API_MAX_BODY_BYTES"],
        api_export_max_rows=values["IIOT_API_EXPORT_MAX_ROWS"],
        api_export_timeout_seconds=values["IIOT_API_EXPORT_TIMEOUT_SECONDS"],
        api_pool_timeout_seconds=values["IIOT_API_POOL_TIMEOUT_SECONDS"],
        api_key_grace_hours=values["IIOT_API_KEY_GRACE_HOURS"],
        pitr_stanza=values["IIOT_PITR_STANZA"],
        pitr_repo=values["IIOT_PITR_REPO"] or data_dir / "pgbackrest" / "repo",
        pitr_config=values["IIOT_PITR_CONFIG"] or data_dir / "pgbackrest" / "pgbackrest.conf",
        pitr_os_user=values["IIOT_PITR_OS_USER"],
        pitr_scratch_dir=values["IIOT_PITR_SCRATCH_DIR"] or data_dir / "pitr-scratch",
        pitr_rpo_minutes=values["IIOT_PITR_RPO_MINUTES"],
        pitr_archive_timeout_seconds=values["IIOT_PITR_ARCHIVE_TIMEOUT_SECONDS"],
        pitr_retention_full=values["IIOT_PITR_RETENTION_FULL"],
        pitr_process_max=values["IIOT_PITR_PROCESS_MAX"],
        pitr_pg_bindir=values["IIOT_PITR_PG_BINDIR"],
        sources=sources,
    )


def describe(settings: Settings) -> list[tuple[str, str, str]]:
    """(variable, effective value, source) rows for `iiot config`, passwords masked."""
    shown = {
        "IIOT_DATABASE_URL": settings.database_url,
        "IIOT_DAGSTER_DATABASE_URL": settings.dagster_database_url,
        "IIOT_MQTT_URL": settings.mqtt_url,
        "IIOT_MQTT_PROTOCOL": settings.mqtt_protocol,
        "IIOT_MQTT_CA_FILE": settings.mqtt_ca_file,
        "IIOT_MQTT_CERT_FILE": settings.mqtt_cert_file,
        "IIOT_MQTT_KEY_FILE": settings.mqtt_key_file,
        "IIOT_MQTT_SHARED_SUBSCRIPTION": {None: "auto", True: "on", False: "off"}[
            settings.mqtt_shared_subscription
        ],
        "IIOT_TOPIC_PREFIX": settings.topic_prefix,
        "IIOT_STORAGE": settings.storage,
        "IIOT_DATA_DIR": settings.data_dir,
        "IIOT_ARCHIVE_ROOT": settings.archive_root,
        "IIOT_RETENTION_BATCH_ROWS": settings.retention_batch_rows,
        "IIOT_COMPRESS_AFTER_DAYS": settings.compress_after_days,
        "IIOT_BACKUP_ROOT": settings.backup_root,
        "IIOT_BACKUP_DATABASE_URL": settings.backup_database_url,
        "IIOT_BACKUP_KEEP_DAILY": settings.backup_keep_daily,
        "IIOT_BACKUP_KEEP_WEEKLY": settings.backup_keep_weekly,
        "IIOT_BACKUP_RPO_HOURS": per_plan_text(settings.backup_rpo_hours),
        "IIOT_BACKUP_RTO_MINUTES": per_plan_text(settings.backup_rto_minutes),
        "IIOT_PITR_STANZA": settings.pitr_stanza,
        "IIOT_PITR_REPO": settings.pitr_repo,
        "IIOT_PITR_CONFIG": settings.pitr_config,
        "IIOT_PITR_OS_USER": settings.pitr_os_user,
        "IIOT_PITR_SCRATCH_DIR": settings.pitr_scratch_dir,
        "IIOT_PITR_RPO_MINUTES": settings.pitr_rpo_minutes,
        "IIOT_PITR_ARCHIVE_TIMEOUT_SECONDS": settings.pitr_archive_timeout_seconds,
        "IIOT_PITR_RETENTION_FULL": settings.pitr_retention_full,
        "IIOT_PITR_PROCESS_MAX": settings.pitr_process_max,
        "IIOT_PITR_PG_BINDIR": settings.pitr_pg_bindir,
        "IIOT_REPORTS_ROOT": settings.reports_root,
        "IIOT_PKI_DIR": settings.pki_dir,
        "IIOT_PKI_CA_KEY_FILE": settings.pki_ca_key_file,
        "IIOT_CERT_RENEWAL_BATCH_SIZE": settings.cert_renewal_batch_size,
        "IIOT_CERT_OFFLINE_DAYS": settings.cert_offline_days,
        "IIOT_CERT_ACK_TIMEOUT_HOURS": settings.cert_ack_timeout_hours,
        "IIOT_CERT_RETRY_BACKOFF_HOURS": settings.cert_retry_backoff_hours,
        "IIOT_PARTITIONS_AHEAD_DAYS": settings.partitions_ahead_days,
        "IIOT_PARTITIONS_START": settings.partitions_start,
        "IIOT_ROLLUP_LAG_MINUTES": settings.rollup_lag_minutes,
        "IIOT_ROLLUP_WORK_MEM": settings.rollup_work_mem,
        "IIOT_FRESHNESS_MINUTES": settings.freshness_minutes,
        "IIOT_DEFAULT_TIMEZONE": settings.default_timezone,
        "IIOT_MAX_CONCURRENT_RUNS": settings.max_concurrent_runs,
        "IIOT_BILLING_NIGHTLY_SHARDS": settings.billing_nightly_shards,
        "IIOT_RETRY_MAX": settings.retry_max,
        "IIOT_RETRY_DELAY_SECONDS": settings.retry_delay_seconds,
        "IIOT_DAGSTER_HOST": settings.dagster_host,
        "IIOT_DAGSTER_PORT": settings.dagster_port,
        "IIOT_API_HOST": settings.api_host,
        "IIOT_API_PORT": settings.api_port,
        "IIOT_API_WORKERS": settings.api_workers,
        "IIOT_API_RATE_PER_SECOND": settings.api_rate_per_second,
        "IIOT_API_RATE_BURST": settings.api_rate_burst,
        "IIOT_API_MAX_BODY_BYTES": settings.api_max_body_bytes,
        "IIOT_API_EXPORT_MAX_ROWS": settings.api_export_max_rows,
        "IIOT_API_EXPORT_TIMEOUT_SECONDS": settings.api_export_timeout_seconds,
        "IIOT_API_POOL_TIMEOUT_SECONDS": settings.api_pool_timeout_seconds,
        "IIOT_API_KEY_GRACE_HOURS": settings.api_key_grace_hours,
        "IIOT_LOG_LEVEL": settings.log_level,
        "IIOT_LOG_FORMAT": settings.log_format,
        "IIOT_ALERT_WEBHOOK_URL": settings.alert_webhook_url,
        "IIOT_TELEGRAM_BOT_TOKEN": settings.telegram_bot_token and "***",
        "IIOT_TELEGRAM_CHAT_ID": settings.telegram_chat_id,
        "IIOT_TELEGRAM_API_URL": settings.telegram_api_url,
        "IIOT_ALERT_DEDUP_MINUTES": settings.alert_dedup_minutes,
        "IIOT_ALERT_DEAD_LETTER_THRESHOLD": settings.alert_dead_letter_threshold,
        "IIOT_DEAD_LETTER_RETENTION_DAYS": settings.dead_letter_retention_days,
        "IIOT_UNKNOWN_DEVICE_DEAD_LETTERS_PER_MINUTE": (
            settings.unknown_device_dead_letters_per_minute
        ),
    }
    rows = []
    for var in VARIABLES:
        value = shown[var.name]
        text = "" if value is None else str(value)
        if var.name.endswith("_URL") and text:
            text = mask_password(text)
        source = settings.sources.get(var.name, "default")
        if source == "unset" and value is not None:
            source = "derived"
        rows.append((var.name, text, source))
    return rows


def mask_password(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        params = conninfo_to_dict(url)
        if params.get("password"):
            params["password"] = "***"  # noqa: S105 - a mask, not a password
            return to_url(params)
        return url
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url
