import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from iiot_orchestration.cli import main
from iiot_orchestration.settings import (
    VARIABLES,
    SettingsError,
    dagster_url_for,
    describe,
    load_settings,
    mask_password,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_defaults_without_any_variable():
    settings = load_settings({})
    assert settings.database_url is None
    assert settings.dagster_database_url is None
    assert settings.topic_prefix == "iiot"
    assert settings.storage == "auto"
    assert settings.partitions_ahead_days == 7
    assert settings.archive_root == str(Path("var") / "archive")
    assert settings.backup_root == Path("var") / "backups"
    assert settings.reports_root == Path("var") / "reports"
    assert settings.default_timezone == "America/Sao_Paulo"
    assert settings.dagster_port == 3000


def test_values_are_typed_and_normalised():
    settings = load_settings(
        {
            "IIOT_DATABASE_URL": "postgresql://app:secret@db.internal:6543/iiot",
            "IIOT_MQTT_URL": "mqtts://broker:8883",
            "IIOT_TOPIC_PREFIX": "acme/site-1",
            "IIOT_STORAGE": " Timescale ",
            "IIOT_DATA_DIR": "/srv/iiot",
            "IIOT_ARCHIVE_ROOT": "s3://bucket/archive",
            "IIOT_PARTITIONS_AHEAD_DAYS": "14",
            "IIOT_LOG_LEVEL": "debug",
        }
    )
    assert settings.storage == "timescale"
    assert settings.partitions_ahead_days == 14
    assert settings.log_level == "DEBUG"
    assert settings.archive_root == "s3://bucket/archive"
    assert settings.backup_root == Path("/srv/iiot/backups")
    assert settings.dagster_database_url == "postgresql://app:secret@db.internal:6543/iiot_dagster"


def test_dagster_url_keeps_unix_socket_host():
    url = dagster_url_for("postgresql://postgres:@/iiot?host=/tmp/sock")
    assert url == "postgresql://postgres@/iiot_dagster?host=/tmp/sock"


def test_explicit_dagster_url_wins():
    settings = load_settings(
        {
            "IIOT_DATABASE_URL": "postgresql://a@h/iiot",
            "IIOT_DAGSTER_DATABASE_URL": "postgresql://a@other/dagster",
        }
    )
    assert settings.dagster_database_url == "postgresql://a@other/dagster"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("IIOT_DATABASE_URL", "mysql://root@localhost/iiot", "postgresql://"),
        ("IIOT_DATABASE_URL", "postgresql://h/db?bogus_option=1", "postgresql://"),
        ("IIOT_MQTT_URL", "http://broker:1883", "mqtt://host:port"),
        ("IIOT_MQTT_URL", "mqtt://broker:99999", "mqtt://host:port"),
        ("IIOT_MQTT_URL", "mqtt://:1883", "mqtt://host:port"),
        ("IIOT_TOPIC_PREFIX", "iiot/+/x", "topic segments"),
        ("IIOT_TOPIC_PREFIX", "iiot/#", "topic segments"),
        ("IIOT_TOPIC_PREFIX", "/iiot", "topic segments"),
        ("IIOT_TOPIC_PREFIX", "a//b", "topic segments"),
        ("IIOT_STORAGE", "mongodb", "auto, timescale or postgres"),
        ("IIOT_PARTITIONS_AHEAD_DAYS", "seven", "1 to 366"),
        ("IIOT_PARTITIONS_AHEAD_DAYS", "0", "1 to 366"),
        ("IIOT_PARTITIONS_AHEAD_DAYS", "100000", "1 to 366"),
        ("IIOT_DEFAULT_TIMEZONE", "Mars/Olympus_Mons", "IANA time zone"),
        ("IIOT_DEFAULT_TIMEZONE", "../../etc/passwd", "IANA time zone"),
        ("IIOT_MAX_CONCURRENT_RUNS", "-1", "1 to 100"),
        ("IIOT_DAGSTER_PORT", "70000", "1 to 65535"),
        ("IIOT_DAGSTER_HOST", "host;rm -rf /", "host name"),
        ("IIOT_LOG_LEVEL", "LOUD", "DEBUG, INFO"),
        ("IIOT_DATA_DIR", "bad\x00dir", "directory path"),
        ("IIOT_ARCHIVE_ROOT", "   ", "directory path"),
        ("IIOT_BACKUP_DATABASE_URL", "mysql://root@db/iiot", "postgresql://"),
        ("IIOT_BACKUP_KEEP_DAILY", "0", "1 to 366"),
        ("IIOT_BACKUP_KEEP_WEEKLY", "-1", "0 to 520"),
        ("IIOT_BACKUP_RPO_HOURS", "starter", "is not plan=number"),
        ("IIOT_BACKUP_RPO_HOURS", "starter=48,starter=24", "plan starter is given twice"),
        ("IIOT_BACKUP_RPO_HOURS", "starter=0", "from 1 to 8760"),
        ("IIOT_BACKUP_RPO_HOURS", "Starter=4", "is not plan=number"),
        ("IIOT_BACKUP_RPO_HOURS", "pro=1;rm -rf /", "from 1 to 8760"),
        ("IIOT_BACKUP_RPO_HOURS", "pro=\uff11\uff12", "from 1 to 8760"),
        ("IIOT_BACKUP_RTO_MINUTES", "pro=60,,", "is not plan=number"),
        ("IIOT_BACKUP_RTO_MINUTES", "pro=99999", "from 1 to 10080"),
        ("IIOT_PKI_DIR", "pki\x00dir", "directory path"),
        ("IIOT_PKI_DIR", "  ", "directory path"),
        ("IIOT_CERT_RENEWAL_BATCH_SIZE", "0", "1 to 100000"),
        ("IIOT_CERT_RENEWAL_BATCH_SIZE", "ten", "1 to 100000"),
        ("IIOT_CERT_RENEWAL_BATCH_SIZE", "10; DROP TABLE devices", "1 to 100000"),
        ("IIOT_CERT_OFFLINE_DAYS", "-7", "1 to 3650"),
        ("IIOT_CERT_ACK_TIMEOUT_HOURS", "0", "1 to 8760"),
        ("IIOT_CERT_RETRY_BACKOFF_HOURS", "1.5", "1 to 8760"),
        ("IIOT_RETENTION_BATCH_ROWS", "99", "100 to 1000000"),
        ("IIOT_RETENTION_BATCH_ROWS", "5e4", "100 to 1000000"),
        ("IIOT_RETENTION_BATCH_ROWS", "50000; DELETE FROM telemetry", "100 to 1000000"),
        ("IIOT_COMPRESS_AFTER_DAYS", "0", "1 to 3650"),
        ("IIOT_COMPRESS_AFTER_DAYS", "one week", "1 to 3650"),
        ("IIOT_API_POOL_TIMEOUT_SECONDS", "0", "1 to 300"),
        ("IIOT_API_POOL_TIMEOUT_SECONDS", "10s", "1 to 300"),
        ("IIOT_API_POOL_TIMEOUT_SECONDS", "86400", "1 to 300"),
    ],
)
def test_bad_value_names_variable_and_expected_form(name, value, expected):
    with pytest.raises(SettingsError) as info:
        load_settings({name: value})
    message = str(info.value)
    assert message.startswith(f"{name}=")
    assert message.split(" is invalid: ", 1)[1].count(expected) == 1  # said once (issue 21)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "IIOT_STORAGE",
            "foo",
            "IIOT_STORAGE='foo' is invalid: expected auto, timescale or postgres",
        ),
        (
            "IIOT_TOPIC_PREFIX",
            "a//b",
            "IIOT_TOPIC_PREFIX='a//b' is invalid: expected topic segments of letters, digits, "
            "'_', '.' and '-' joined by '/', such as iiot or acme/site1",
        ),
        (
            "IIOT_MQTT_URL",
            "mqtt://broker:99999",
            "IIOT_MQTT_URL='mqtt://broker:99999' is invalid: Port out of range 0-65535 "
            "(expected mqtt://host:port or mqtts://host:port)",
        ),
    ],
)
def test_bad_value_message_states_the_expected_form_once(name, value, message):
    with pytest.raises(SettingsError) as info:
        load_settings({name: value})
    assert str(info.value) == message


def test_retention_settings_default_and_parse():
    defaults = load_settings({})
    assert (defaults.retention_batch_rows, defaults.compress_after_days) == (50_000, 7)
    chosen = load_settings(
        {"IIOT_RETENTION_BATCH_ROWS": " 1000 ", "IIOT_COMPRESS_AFTER_DAYS": "30"}
    )
    assert (chosen.retention_batch_rows, chosen.compress_after_days) == (1000, 30)
    rows = {r[0]: r for r in describe(chosen)}
    assert rows["IIOT_RETENTION_BATCH_ROWS"][1:] == ("1000", "environment")
    assert rows["IIOT_COMPRESS_AFTER_DAYS"][1:] == ("30", "environment")


def test_certificate_settings_default_and_parse():
    defaults = load_settings({"IIOT_DATA_DIR": "/srv/iiot"})
    assert defaults.pki_dir == Path("/srv/iiot/pki")
    assert (defaults.cert_renewal_batch_size, defaults.cert_offline_days) == (10, 7)
    assert (defaults.cert_ack_timeout_hours, defaults.cert_retry_backoff_hours) == (48, 24)
    chosen = load_settings(
        {
            "IIOT_PKI_DIR": "/etc/iiot/pki",
            "IIOT_CERT_RENEWAL_BATCH_SIZE": " 25 ",
            "IIOT_CERT_OFFLINE_DAYS": "30",
        }
    )
    assert chosen.pki_dir == Path("/etc/iiot/pki")
    assert (chosen.cert_renewal_batch_size, chosen.cert_offline_days) == (25, 30)
    rows = {r[0]: r for r in describe(chosen)}
    assert rows["IIOT_CERT_RENEWAL_BATCH_SIZE"][1:] == ("25", "environment")
    assert rows["IIOT_PKI_DIR"][1:] == ("/etc/iiot/pki", "environment")
    assert {r[0]: r for r in describe(defaults)}["IIOT_PKI_DIR"][2] == "derived"


def test_backup_settings_default_and_parse():
    defaults = load_settings({"IIOT_DATABASE_URL": "postgresql://app@db/iiot"})
    assert defaults.backup_database_url == "postgresql://app@db/iiot"
    assert (defaults.backup_keep_daily, defaults.backup_keep_weekly) == (7, 4)
    assert defaults.backup_rpo_hours == (("starter", 48), ("pro", 26), ("enterprise", 26))
    assert defaults.backup_rto_minutes == (("starter", 480), ("pro", 240), ("enterprise", 60))
    chosen = load_settings(
        {
            "IIOT_DATABASE_URL": "postgresql://app@db/iiot",
            "IIOT_BACKUP_DATABASE_URL": "postgresql://backup:pw@db/iiot",
            "IIOT_BACKUP_RPO_HOURS": " pro = 12 , gold_plus=1 ",
            "IIOT_BACKUP_KEEP_WEEKLY": "0",
        }
    )
    assert chosen.backup_database_url == "postgresql://backup:pw@db/iiot"
    assert chosen.backup_rpo_hours == (("pro", 12), ("gold_plus", 1))
    assert chosen.backup_keep_weekly == 0
    rows = {r[0]: r for r in describe(chosen)}
    assert rows["IIOT_BACKUP_RPO_HOURS"][1:] == ("pro=12,gold_plus=1", "environment")
    assert "pw" not in rows["IIOT_BACKUP_DATABASE_URL"][1]
    assert rows["IIOT_BACKUP_DATABASE_URL"][2] == "environment"
    assert {r[0]: r for r in describe(defaults)}["IIOT_BACKUP_DATABASE_URL"][2] == "derived"


def test_oversized_value_is_shortened_in_the_message():
    with pytest.raises(SettingsError) as info:
        load_settings({"IIOT_STORAGE": "x" * 10_000})
    assert len(str(info.value)) < 300


def test_empty_value_means_default():
    assert load_settings({"IIOT_TOPIC_PREFIX": ""}).topic_prefix == "iiot"


def test_require_database_url_explains_what_to_do():
    with pytest.raises(SettingsError, match=r"IIOT_DATABASE_URL is not set.*iiot dev"):
        load_settings({}).require_database_url()


def test_describe_masks_passwords_and_reports_sources():
    rows = {
        r[0]: r
        for r in describe(
            load_settings(
                {
                    "IIOT_DATABASE_URL": "postgresql://app:hunter2@db/iiot",
                    "IIOT_MQTT_URL": "mqtt://dev:pw@broker:1883",
                }
            )
        )
    }
    assert "hunter2" not in rows["IIOT_DATABASE_URL"][1]
    assert "***" in rows["IIOT_DATABASE_URL"][1]
    assert rows["IIOT_MQTT_URL"][1] == "mqtt://dev:***@broker:1883"
    assert rows["IIOT_DAGSTER_DATABASE_URL"][2] == "derived"
    assert rows["IIOT_TOPIC_PREFIX"][2] == "default"
    assert rows["IIOT_DATABASE_URL"][2] == "environment"


def test_mask_password_leaves_urls_without_password_alone():
    assert mask_password("postgresql://app@db/iiot") == "postgresql://app@db/iiot"
    assert mask_password("mqtt://broker:1883") == "mqtt://broker:1883"


def test_cli_reports_bad_setting_without_traceback(monkeypatch):
    monkeypatch.setenv("IIOT_STORAGE", "cassandra")
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 1
    assert "IIOT_STORAGE='cassandra' is invalid" in result.output
    assert "Traceback" not in result.output


def test_help_works_even_with_a_bad_setting(monkeypatch):
    monkeypatch.setenv("IIOT_LOG_LEVEL", "LOUD")
    result = CliRunner().invoke(main, ["db", "migrate", "--help"])
    assert result.exit_code == 0
    assert "Apply pending migrations" in result.output


def test_readme_documents_every_variable():
    readme = (REPO_ROOT / "README.md").read_text()
    documented = set(re.findall(r"`(IIOT_[A-Z_]+)`", readme))
    assert {v.name for v in VARIABLES} <= documented
