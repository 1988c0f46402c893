"""Storage roots on object storage (filestore.py): reports, invoice files, backups and the PKI's
public files written to, listed, read back from, verified and rotated on a local S3 endpoint
(moto in server mode), as IIOT_REPORTS_ROOT, IIOT_BACKUP_ROOT and IIOT_PKI_DIR set to
``s3://bucket/prefix`` do in production."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from openpyxl import load_workbook  # noqa: E402

from iiot_orchestration import backups, billing, billing_exports, filestore, pki  # noqa: E402
from iiot_orchestration.reports import make_reports, parse_period  # noqa: E402
from iiot_orchestration.reports.coverage import missing_reports  # noqa: E402
from iiot_orchestration.reports.files import local_report, report_exists  # noqa: E402
from iiot_orchestration.reports.verify import pdf_text, verify_files  # noqa: E402
from iiot_orchestration.settings import load_settings  # noqa: E402
from tests.test_reports import NOW, OCTOBER, report_db  # noqa: E402, F401


@dataclass(frozen=True)
class S3:
    endpoint: str
    bucket: str

    def root(self, prefix: str) -> str:
        """A fresh ``s3://bucket/prefix-<random>`` for one test."""
        return f"s3://{self.bucket}/{prefix}-{uuid.uuid4().hex[:8]}"

    def keys(self, root: str) -> list[str]:
        """Every object under ``root``, relative to it."""
        store = filestore.open_root(root, "test")
        found = store.fs.find(store._base, refresh=True)
        return sorted(k[len(store._base) + 1 :] for k in found)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """moto's S3 in server mode on a free port, and the AWS variables pointing botocore (under
    s3fs) at it; one bucket for the module."""
    import boto3
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        boto3.client("s3").create_bucket(Bucket="iiot")
        try:
            yield S3(endpoint, "iiot")
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


# ---------------------------------------------------------------------------------------------
# The store itself


def test_a_store_on_s3_writes_lists_reads_and_removes(s3):
    root = s3.root("store")
    store = filestore.open_root(root, "IIOT_REPORTS_ROOT")
    assert store.remote
    store.write_atomic("a/b/one.bin", [b"hello ", b"world"])
    store.write_atomic("a/two.bin", [b"x"])
    assert store.listdir() == ["a"]
    assert store.listdir("a") == ["b", "two.bin"]
    assert store.listdir("missing") == []
    assert store.isdir("a/b")
    assert not store.isdir("a/two.bin")
    assert store.read_bytes("a/b/one.bin") == b"hello world"
    assert store.sha256("a/b/one.bin")[1] == 11
    with store.local_copy("a/b/one.bin") as local:
        assert local.read_bytes() == b"hello world"
    assert not local.exists()  # the download is gone after the block
    assert s3.keys(root) == ["a/b/one.bin", "a/two.bin"]  # no temporary object left
    store.remove("a/b")
    assert store.listdir("a") == ["two.bin"]
    with pytest.raises(filestore.StoreError, match="missing"):
        store.read_bytes("a/b/one.bin")
    with pytest.raises(filestore.StoreError, match="larger than"):
        store.read_bytes("a/two.bin", limit=0)


def test_settings_keep_local_roots_paths_and_urls_urls(tmp_path):
    local = load_settings({"IIOT_REPORTS_ROOT": str(tmp_path), "IIOT_BACKUP_ROOT": "~/b"})
    assert local.reports_root == tmp_path
    assert local.backup_root == Path("~/b").expanduser()
    assert load_settings({}).pki_dir == Path("var") / "pki"
    remote = load_settings(
        {
            "IIOT_REPORTS_ROOT": "s3://iiot/reports",
            "IIOT_BACKUP_ROOT": "s3://iiot/backups",
            "IIOT_PKI_DIR": "s3://iiot/pki",
        }
    )
    assert (remote.reports_root, remote.backup_root, remote.pki_dir) == (
        "s3://iiot/reports",
        "s3://iiot/backups",
        "s3://iiot/pki",
    )
    assert filestore.join(tmp_path, "a", "b") == tmp_path / "a" / "b"
    assert filestore.join("s3://iiot/r/", "a", "b") == "s3://iiot/r/a/b"


# ---------------------------------------------------------------------------------------------
# Reports and invoice files


def test_reports_on_s3_are_written_read_back_and_verified(s3, report_db):  # noqa: F811
    import psycopg

    root = s3.root("reports")
    with psycopg.connect(report_db.url, autocommit=True) as conn:
        report, files = make_reports(conn, "acme", parse_period(OCTOBER), root, now=NOW)
        by_format = {f.format: f for f in files}
        assert by_format["pdf"].path == f"{root}/acme/2026-10/consumption.pdf"
        assert s3.keys(root) == ["acme/2026-10/consumption.pdf", "acme/2026-10/consumption.xlsx"]
        # read back from the bucket, then compared with the marts
        problems = verify_files(conn, report, {f.format: f.path for f in files})
        assert problems == {"pdf": [], "xlsx": []}
        with local_report(by_format["xlsx"].path) as xlsx:
            assert xlsx.stat().st_size == by_format["xlsx"].size
        assert report_exists(root, "acme", "2026-10", "pdf")
        assert not report_exists(root, "acme", "2026-09", "pdf")
        # a corrupted object is caught by the read-back
        store = filestore.open_root(root, "IIOT_REPORTS_ROOT")
        store.write_atomic("acme/2026-10/consumption.pdf", [b"%PDF-1.4 truncated"])
        problems = verify_files(conn, report, {"pdf": by_format["pdf"].path})
        assert problems["pdf"]
        assert "not a readable PDF" in problems["pdf"][0]
        # closed months are checked against the bucket
        expected, missing = missing_reports(conn, root, NOW)
        assert expected > 0
        months = {(m.tenant, m.month) for m in missing}
        assert ("acme", "2026-10") not in months
        assert missing


def test_invoice_files_on_s3(s3):
    root = s3.root("invoices")
    period = billing.period_of(date(2026, 11, 1), 1)
    who = billing.Tenant(7, "acme", "America/Sao_Paulo", 1, "pro", "active", date(2026, 1, 1))
    invoice = billing.Invoice(
        7,
        period,
        "final",
        "EUR",
        (billing.Line("base", "Pro plan", Decimal(30), "days", Decimal(99), Decimal("99.00")),),
        30,
        "0" * 64,
    )
    files = billing_exports.export(root, who, invoice)
    assert files.pdf == f"{root}/acme/2026-11/invoice.pdf"
    assert s3.keys(root) == ["acme/2026-11/invoice.pdf", "acme/2026-11/invoice.xlsx"]
    with filestore.local_file(files.xlsx) as xlsx:
        sheet = list(load_workbook(xlsx).active.iter_rows(values_only=True))
    assert sheet[1][:3] == ("Period", "2026-11-01", "2026-12-01 (exclusive)")
    with filestore.local_file(files.pdf) as pdf:
        assert "Pro plan" in pdf_text(pdf)
    # written again (a re-billed draft): replaced in place, no temporary object left
    billing_exports.export(root, who, invoice)
    assert s3.keys(root) == ["acme/2026-11/invoice.pdf", "acme/2026-11/invoice.xlsx"]


# ---------------------------------------------------------------------------------------------
# Backups and manifests


def test_backups_on_s3_are_taken_listed_verified_drilled_and_rotated(s3, database_url, conn):
    from tests.test_backups import RPO, RTO, at, seed

    seed(conn)
    root = s3.root("backups")
    database = conn.info.dbname
    first = backups.run_backup(database_url, root, keep_daily=2, keep_weekly=0, clock=lambda: at(0))
    m = first.backup.manifest
    assert first.backup.path == f"{root}/{database}/{m.backup_id}"
    assert s3.keys(root) == [
        f"{database}/{m.backup_id}/{backups.DUMP_FILE}",
        f"{database}/{m.backup_id}/{backups.MANIFEST_FILE}",
    ]
    store = filestore.open_root(root, "IIOT_BACKUP_ROOT")
    manifest = json.loads(store.read_bytes(f"{database}/{m.backup_id}/{backups.MANIFEST_FILE}"))
    assert manifest["dump"]["sha256"] == m.sha256
    assert store.sha256(f"{database}/{m.backup_id}/{backups.DUMP_FILE}") == (m.sha256, m.bytes)
    assert conn.execute(
        "SELECT status, location FROM backups WHERE backup_id = %s", (m.backup_id,)
    ).fetchone() == ("complete", first.backup.path)
    backups.verify_checksum(first.backup)  # streamed from the bucket
    assert backups.archive_entries(first.backup) > 0  # pg_restore --list on a download

    # the drill restores a downloaded copy, checked against the manifest
    result = backups.run_drill(database_url, root, rpo_hours=RPO, rto_minutes=RTO)
    assert result.passed, result.error
    assert result.backup_id == m.backup_id

    # rotation: two dailies kept, the drilled one protected
    for day in (1, 2, 3):
        run = backups.run_backup(
            database_url, root, keep_daily=2, keep_weekly=0, clock=lambda d=day: at(d)
        )
    listed, problems = backups.list_backups(root, database)
    assert [b.backup_id for b in listed] == [m.backup_id, "20261103T030000Z", "20261104T030000Z"]
    assert problems == []
    assert run.rotation.deleted == ["20261102T030000Z"]
    assert m.backup_id in run.rotation.protected
    assert not any(k.startswith(f"{database}/20261102T030000Z") for k in s3.keys(root))
    status = backups.status(conn, root, database, rpo_hours=RPO, rto_minutes=RTO, now=at(4, 4))
    assert status.newest.backup_id == "20261104T030000Z"
    assert status.backup_within_rpo

    # a corrupted dump in the bucket: caught before anything is restored, never "newest good"
    newest = f"{database}/20261104T030000Z/{backups.DUMP_FILE}"
    store.write_atomic(newest, [b"corrupted"])
    with pytest.raises(backups.BackupError, match="corrupted"):
        backups.verify_checksum(backups.list_backups(root, database)[0][-1])
    assert backups.newest_good(None, listed) == ["20261103T030000Z"]
    found = backups.find_backup(root, database, "20261103T030000Z")
    assert isinstance(found.path, Path)  # a local copy to restore from
    backups.verify_checksum(found)

    # a folder without its manifest (an interrupted upload) is a problem, removed after a day
    store.write_atomic(f"{database}/20261105T030000Z/{backups.DUMP_FILE}", [b"half"])
    store.write_atomic(f"{database}/holiday-photos/a.jpg", [b"x"])
    _, problems = backups.list_backups(root, database)
    assert len(problems) == 2
    assert any("20261105T030000Z/manifest.json: missing" in p for p in problems)
    backups.rotate(root, database, 7, 4, clock=lambda: at(4))  # too young to go
    assert store.exists(f"{database}/20261105T030000Z/{backups.DUMP_FILE}")
    backups.rotate(root, database, 7, 4, clock=lambda: datetime.now(UTC) + timedelta(days=2))
    assert not store.exists(f"{database}/20261105T030000Z/{backups.DUMP_FILE}")
    assert store.exists(f"{database}/holiday-photos/a.jpg")  # never deleted


# ---------------------------------------------------------------------------------------------
# The PKI: certificate and CRL in the bucket, the CA key a local file


def test_pki_on_s3_keeps_the_ca_key_local(s3, conn, tmp_path):
    root = s3.root("pki")
    with pytest.raises(pki.PkiError, match="IIOT_PKI_CA_KEY_FILE"):
        pki.init_ca(root)
    key_file = tmp_path / "secrets" / "ca.key"
    ca, created = pki.init_ca(root, key_file=key_file)
    assert created
    assert s3.keys(root) == [pki.CA_CERT_FILE]  # the key never goes to the bucket
    assert key_file.stat().st_mode & 0o777 == 0o600
    again, created = pki.init_ca(root, key_file=key_file)
    assert not created
    assert again.fingerprint == ca.fingerprint
    assert pki.load_ca(root, key_file).fingerprint == ca.fingerprint

    first = pki.refresh_crl(conn, ca)
    assert first.path == f"{root}/{pki.CRL_FILE}"
    second = pki.refresh_crl(conn, ca)
    assert s3.keys(root) == [pki.CA_CERT_FILE, pki.CRL_FILE]
    contents = pki.read_crl(second.path, ca)  # read back, its signature checked
    assert contents.number == second.number == first.number + 1
    assert contents.serials == frozenset()
    store = filestore.open_root(root, "IIOT_PKI_DIR")
    assert hashlib.sha256(store.read_bytes(pki.CRL_FILE)).hexdigest() == second.sha256

    # the broker's files stay on the broker's host, with copies of the public ones
    out = tmp_path / "broker"
    files = pki.write_broker_config(ca, out, prefix="iiot", hosts=["localhost"])
    assert files.crl == out / pki.CRL_FILE
    assert files.crl.read_bytes() == store.read_bytes(pki.CRL_FILE)
    assert f"crlfile {out / pki.CRL_FILE}" in files.config.read_text()
    assert s3.keys(root) == [pki.CA_CERT_FILE, pki.CRL_FILE]

    store.remove(pki.CRL_FILE)
    with pytest.raises(pki.PkiError, match="no CRL"):
        pki.read_crl(second.path, ca)
