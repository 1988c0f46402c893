"""The device PKI: CA, device certificates, revocation and the CRL, the broker configuration,
the expiry sweep and its checks, and what the broker does with all of it (real Mosquitto)."""

import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from assets.certificates import (
    CertificatesResource,
    active_devices_have_one_active_certificate,
    certificate_expiry_sweep,
    crl_lists_every_revoked_serial,
    no_active_device_has_an_expired_certificate,
)
from iiot_orchestration import pki
from iiot_orchestration.cli import main
from iiot_orchestration.resources import PostgresResource
from tests.certificate_helpers import (
    PREFIX,
    Recorder,
    connect_platform,
    copy_ca,
    make_device,
    make_tenant,
    start_tls_broker,
)
from tests.ingest_helpers import wait_for

MAC = "02:00:00:00:00:01"
OTHER = "02:00:00:00:00:02"


@pytest.fixture(scope="session")
def session_ca(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("session_ca")
    pki.init_ca(directory)
    return directory


@pytest.fixture
def ca(session_ca, tmp_path) -> pki.CertificateAuthority:
    return copy_ca(session_ca, tmp_path / "pki")


@pytest.fixture
def env(cli_env, ca) -> dict[str, str]:
    return cli_env | {"IIOT_PKI_DIR": str(ca.directory)}


def run(env: dict[str, str], *args: str):
    return CliRunner().invoke(main, list(args), env=env)


# --- the CA ---------------------------------------------------------------------------------


def test_pki_init_creates_a_private_ca_and_keeps_it(tmp_path):
    directory = tmp_path / "pki"
    env = {"IIOT_PKI_DIR": str(directory)}
    result = run(env, "pki", "init", "--name", "Acme devices")
    assert result.exit_code == 0, result.output
    assert "Created CA 'Acme devices'" in result.output
    key = directory / pki.CA_KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = pki.load_ca(directory)
    assert ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.key.key_size == pki.CA_KEY_BITS
    assert ca.not_after - datetime.now(UTC) > pki.DEVICE_VALIDITY
    before = key.read_bytes()
    again = run(env, "pki", "init")
    assert again.exit_code == 0
    assert "Kept the existing CA 'Acme devices'" in again.output
    assert key.read_bytes() == before


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / pki.CA_CERT_FILE).unlink(), "incomplete CA .*ca.crt is missing"),
        (lambda d: (d / pki.CA_KEY_FILE).unlink(), "incomplete CA .*ca.key is missing"),
        (lambda d: os.chmod(d / pki.CA_KEY_FILE, 0o644), "readable by other users .*chmod 600"),
        (
            lambda d: (d / pki.CA_KEY_FILE).write_bytes(b"-----BEGIN PRIVATE KEY-----\nxx\n"),
            "not an unencrypted PEM private key",
        ),
        (lambda d: (d / pki.CA_CERT_FILE).write_bytes(b"\x00" * 10), "is not a PEM certificate"),
    ],
)
def test_a_damaged_ca_is_refused_not_replaced(ca, damage, message):
    damage(ca.directory)
    with pytest.raises(pki.PkiError, match=message):
        pki.init_ca(ca.directory)


def test_a_ca_certificate_of_another_key_or_a_leaf_is_refused(ca, tmp_path):
    other = pki.init_ca(tmp_path / "other")[0]
    (ca.directory / pki.CA_CERT_FILE).write_bytes(other.cert_path.read_bytes())
    with pytest.raises(pki.PkiError, match="does not belong to the key"):
        pki.load_ca(ca.directory)
    leaf = pki._leaf(
        other,
        "leaf",
        other.key.public_key(),
        pki.ExtendedKeyUsageOID.CLIENT_AUTH,
        now=datetime.now(UTC),
        not_after=datetime.now(UTC) + timedelta(days=1),
    )
    (ca.directory / pki.CA_CERT_FILE).write_bytes(pki.certificate_pem(leaf).encode())
    (ca.directory / pki.CA_KEY_FILE).write_bytes(pki.private_key_pem(other.key))
    with pytest.raises(pki.PkiError, match="is not a CA certificate"):
        pki.load_ca(ca.directory)


def test_commands_without_a_ca_say_how_to_make_one(cli_env, tmp_path):
    result = run(cli_env | {"IIOT_PKI_DIR": str(tmp_path / "none")}, "pki", "crl")
    assert result.exit_code == 1
    assert "no CA in" in result.output
    assert "run `iiot pki init`" in result.output
    assert "Traceback" not in result.output
    bad = run({"IIOT_PKI_DIR": str(tmp_path), "IIOT_CERT_RENEWAL_BATCH_SIZE": "0"}, "pki", "init")
    assert bad.exit_code == 1
    assert "IIOT_CERT_RENEWAL_BATCH_SIZE='0' is invalid" in bad.output


@pytest.mark.parametrize("name", ["", "x" * 65, "bad\nname"])
def test_bad_ca_names_are_refused(tmp_path, name):
    result = run({"IIOT_PKI_DIR": str(tmp_path / "pki")}, "pki", "init", "--name", name)
    assert result.exit_code == 1
    assert "1 to 64 printable characters" in result.output
    assert not (tmp_path / "pki" / pki.CA_KEY_FILE).exists()


# --- device certificates --------------------------------------------------------------------


def test_issue_cert_follows_the_policy_and_records_the_serial(conn, env, ca, tmp_path):
    make_tenant(conn)
    assert run(env, "devices", "provision", "--tenant", "acme", "--mac", MAC, "--kind", "energy")
    out = tmp_path / "gateway"
    result = run(env, "devices", "issue-cert", "--mac", MAC.upper(), "--out", str(out))
    assert result.exit_code == 0, result.output
    identity = (out / "identity.pem").read_bytes()
    assert stat.S_IMODE((out / "identity.pem").stat().st_mode) == 0o600
    assert (out / "ca.pem").read_bytes() == ca.cert_path.read_bytes()
    certificate = x509.load_pem_x509_certificate(identity)
    key = serialization.load_pem_private_key(identity, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    assert certificate.public_key().public_numbers() == key.public_key().public_numbers()
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == MAC
    certificate.verify_directly_issued_by(ca.certificate)
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime == pki.DEVICE_VALIDITY + pki.CLOCK_SKEW
    serial, status, fingerprint = conn.execute(
        "SELECT serial, status, fingerprint_sha256 FROM device_certificates"
    ).fetchone()
    assert (int(serial), status) == (certificate.serial_number, "active")
    assert fingerprint == pki.fingerprint(certificate)
    assert pki.serial_hex(certificate.serial_number) in result.output
    (action,) = conn.execute(
        "SELECT action FROM audit_log WHERE entity = 'device_certificate'"
    ).fetchone()
    assert action == "certificate.issued"
    # a second certificate for the same device, or into the same directory, is refused
    again = run(env, "devices", "issue-cert", "--mac", MAC, "--out", str(tmp_path / "second"))
    assert again.exit_code == 1
    assert "already has an active certificate" in again.output
    assert not (tmp_path / "second").exists()
    make_device(conn, ca, OTHER)
    same_dir = run(env, "devices", "issue-cert", "--mac", OTHER, "--out", str(out))
    assert same_dir.exit_code == 1
    assert "keys are never overwritten" in same_dir.output
    assert (out / "identity.pem").read_bytes() == identity


def test_provision_can_issue_the_certificate_at_once(conn, env, ca, tmp_path):
    make_tenant(conn)
    out = tmp_path / "gateway"
    args = ["devices", "provision", "--tenant", "acme", "--mac", MAC.upper(), "--kind", "energy"]
    result = run(env, *args, "--issue-cert", "--cert-out", str(out))
    assert result.exit_code == 0, result.output
    assert "1 provisioned" in result.output
    certificate = x509.load_pem_x509_certificate((out / "identity.pem").read_bytes())
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == MAC
    (serial,) = conn.execute(
        "SELECT serial FROM device_certificates WHERE status = 'active'"
    ).fetchone()
    assert int(serial) == certificate.serial_number
    # many devices from a CSV: each new one gets its files in its own default directory; a
    # device provisioned already (skipped) is not issued a second certificate
    csv = tmp_path / "devices.csv"
    csv.write_text(f"mac,meter_kind\n{MAC},energy\n{OTHER},water\n")
    many = run(env, "devices", "provision", "--tenant", "acme", "--csv", str(csv), "--issue-cert")
    assert many.exit_code == 0, many.output
    assert (ca.directory / "devices" / OTHER.replace(":", "-") / "identity.pem").exists()
    assert not (ca.directory / "devices" / MAC.replace(":", "-")).exists()
    assert conn.execute("SELECT count(*) FROM device_certificates").fetchone()[0] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cert-out", "x"], "--cert-out needs --issue-cert"),
        (["--issue-cert", "--dry-run"], "cannot be combined with --dry-run"),
    ],
)
def test_provision_refuses_inconsistent_certificate_options(conn, env, extra, message):
    make_tenant(conn)
    args = ["devices", "provision", "--tenant", "acme", "--mac", MAC, "--kind", "energy"]
    result = run(env, *args, *extra)
    assert result.exit_code == 2
    assert message in result.output
    assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 0


def test_provision_with_a_certificate_but_no_ca_provisions_nothing(conn, cli_env, tmp_path):
    make_tenant(conn)
    env = cli_env | {"IIOT_PKI_DIR": str(tmp_path / "none")}
    args = ["devices", "provision", "--tenant", "acme", "--mac", MAC, "--kind", "energy"]
    result = run(env, *args, "--issue-cert")
    assert result.exit_code == 1
    assert "run `iiot pki init`" in result.output
    assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("mac", "message"),
    [
        ("02:00:00:00:00:99", "no device with MAC 02:00:00:00:00:99"),
        ("not-a-mac", "bad MAC 'not-a-mac'"),
        ("ff:ff:ff:ff:ff:ff", "multicast address"),
        ("02:00:00:00:00:01; DROP TABLE devices", "bad MAC"),
    ],
)
def test_issue_cert_refuses_unknown_and_hostile_macs(conn, env, mac, message):
    make_tenant(conn)
    result = run(env, "devices", "issue-cert", "--mac", mac)
    assert result.exit_code == 1
    assert message in result.output
    assert conn.execute("SELECT count(*) FROM device_certificates").fetchone()[0] == 0


def test_issue_cert_refuses_inactive_devices(conn, env):
    make_tenant(conn)
    run(env, "devices", "provision", "--tenant", "acme", "--mac", MAC, "--kind", "energy")
    conn.execute("UPDATE devices SET status = 'decommissioned'")
    result = run(env, "devices", "issue-cert", "--mac", MAC)
    assert result.exit_code == 1
    assert "is decommissioned: only active devices" in result.output


def _csr(mac: str | None, bits: int = 2048) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, mac)] if mac else [])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def test_issue_cert_signs_a_devices_csr(conn, env, tmp_path):
    make_tenant(conn)
    run(env, "devices", "provision", "--tenant", "acme", "--mac", MAC, "--kind", "energy")
    request = tmp_path / "device.csr"
    request.write_bytes(_csr(MAC))
    out = tmp_path / "out"
    result = run(
        env, "devices", "issue-cert", "--mac", MAC, "--csr", str(request), "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    assert not (out / "identity.pem").exists()  # the device keeps its key
    certificate = x509.load_pem_x509_certificate((out / "certificate.pem").read_bytes())
    csr = x509.load_pem_x509_csr(request.read_bytes())
    assert certificate.public_key().public_numbers() == csr.public_key().public_numbers()


def _tampered_csr() -> bytes:
    pem = _csr(MAC).decode().splitlines()
    body = "".join(pem[1:-1])
    # flip a character inside the signature (the end of the DER)
    flipped = body[:-10] + ("A" if body[-10] != "A" else "B") + body[-9:]
    lines = [flipped[i : i + 64] for i in range(0, len(flipped), 64)]
    return "\n".join([pem[0], *lines, pem[-1]]).encode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda: b"hello", "not a PEM certificate signing request"),
        (lambda: b"", "not a PEM certificate signing request"),
        (lambda: _csr(OTHER), "asks for CN '02:00:00:00:00:02', not the device's MAC"),
        (lambda: _csr(MAC, bits=1024), "RSA of at least 2048 bits"),
        (lambda: b"A" * (pki.MAX_CSR_BYTES + 10), "larger than 64 KiB"),
        (_tampered_csr, "signature does not verify|not a PEM certificate signing request"),
    ],
)
def test_bad_csrs_are_refused_and_nothing_is_issued(conn, env, tmp_path, content, message):
    make_tenant(conn)
    run(env, "devices", "provision", "--tenant", "acme", "--mac", MAC, "--kind", "energy")
    request = tmp_path / "device.csr"
    request.write_bytes(content())
    result = run(env, "devices", "issue-cert", "--mac", MAC, "--csr", str(request))
    assert result.exit_code == 1
    assert any(part in result.output for part in message.split("|")), result.output
    assert conn.execute("SELECT count(*) FROM device_certificates").fetchone()[0] == 0


def test_a_certificate_cannot_outlive_the_ca(conn, ca):
    make_tenant(conn)
    with pytest.raises(pki.PkiError, match="would outlive the CA"):
        make_device(conn, ca, MAC, expires_in=timedelta(days=8000))


# --- revocation and the CRL -----------------------------------------------------------------


def test_revoke_lists_the_serial_in_a_new_crl(conn, env, ca):
    make_tenant(conn)
    issued = make_device(conn, ca, MAC)
    keep = make_device(conn, ca, OTHER)
    result = run(
        env, "devices", "revoke", "--mac", MAC, "--reason", "keyCompromise", "--note", "lost"
    )
    assert result.exit_code == 0, result.output
    serial = issued.certificate.serial_number
    assert f"Revoked {MAC} certificate {pki.serial_hex(serial)} (was active)" in result.output
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.key.public_key())
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    assert crl.get_revoked_certificate_by_serial_number(keep.certificate.serial_number) is None
    status, note = conn.execute(
        "SELECT status, revocation_reason FROM device_certificates WHERE serial = %s", (serial,)
    ).fetchone()
    assert (status, note) == ("revoked", "keyCompromise: lost")
    assert pki.check_crl(conn, ca).passed
    # revoking again: nothing left to revoke, or that serial is already revoked
    again = run(env, "devices", "revoke", "--mac", MAC)
    assert again.exit_code == 1
    assert "no active or pending certificate to revoke" in again.output
    twice = run(env, "devices", "revoke", "--mac", MAC, "--serial", pki.serial_hex(serial))
    assert twice.exit_code == 1
    assert "was already revoked" in twice.output
    numbers = [n for (n,) in conn.execute("SELECT crl_number FROM certificate_crls ORDER BY 1")]
    assert numbers == [1]  # the refused revocations wrote no CRL


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--serial", "xyz"], "bad serial 'xyz'"),
        (["--serial", "1" * 41], "up to 40 hex digits"),
        (["--serial", "abc"], "has no certificate with serial abc"),
        (["--reason", "bored"], "Invalid value for '--reason'"),
        (["--note", "x" * 201], "at most 200 printable characters"),
        (["--note", "a\x1bb"], "at most 200 printable characters"),
    ],
)
def test_revoke_refuses_bad_arguments(conn, env, ca, args, message):
    make_tenant(conn)
    make_device(conn, ca, MAC)
    result = run(env, "devices", "revoke", "--mac", MAC, *args)
    assert result.exit_code != 0
    assert message in result.output
    assert (
        conn.execute(
            "SELECT count(*) FROM device_certificates WHERE status = 'revoked'"
        ).fetchone()[0]
        == 0
    )


def test_crl_command_numbers_each_crl_and_check_spots_a_stale_file(conn, env, ca):
    make_tenant(conn)
    issued = make_device(conn, ca, MAC)
    first = run(env, "pki", "crl", "--json")
    assert first.exit_code == 0, first.output
    assert '"number": 1' in first.output
    pki.revoke(conn, MAC, actor="test")  # in the database only: the file is stale now
    outcome = pki.check_crl(conn, ca)
    assert not outcome.passed
    assert outcome.metadata["missing"] == [pki.serial_hex(issued.certificate.serial_number)]
    second = run(env, "pki", "crl")
    assert "CRL 2: 1 revoked serials" in second.output
    assert pki.check_crl(conn, ca).passed
    # a CRL signed by another CA, or past its next update, fails the check too
    stranger = pki.init_ca(ca.directory.parent / "stranger")[0]
    ca.crl_path.write_bytes(
        pki.build_crl(stranger, [], number=9, now=datetime.now(UTC)).public_bytes(
            serialization.Encoding.PEM
        )
    )
    assert "not signed by the CA" in pki.check_crl(conn, ca).metadata["error"]
    pki.refresh_crl(conn, ca, now=datetime.now(UTC) - timedelta(days=8))
    assert not pki.check_crl(conn, ca).passed


def test_broker_config_writes_listener_acl_and_keeps_a_matching_server_cert(
    conn, env, ca, tmp_path
):
    out = tmp_path / "broker"
    result = run(
        env,
        "pki",
        "broker-config",
        "--out",
        str(out),
        "--host",
        "mqtt.example.com",
        "--host",
        "10.0.0.5",
        "--port",
        "8884",
    )
    assert result.exit_code == 0, result.output
    config = (out / "mosquitto-tls.conf").read_text()
    for line in (
        "listener 8884 0.0.0.0",
        "require_certificate true",
        "use_identity_as_username true",
        f"crlfile {ca.crl_path.resolve()}",
        f"cafile {ca.cert_path.resolve()}",
        f"acl_file {out.resolve() / 'acl'}",
    ):
        assert line in config
    acl = (out / "acl").read_text()
    assert f"pattern write {PREFIX}/devices/%u/telemetry" in acl
    assert f"pattern read {PREFIX}/devices/%u/cert_update" in acl
    assert "user iiot-platform" in acl
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"mqtt.example.com", "10.0.0.5"}
    assert stat.S_IMODE((out / "server.key").stat().st_mode) == 0o600
    assert ca.crl_path.exists()
    again = run(
        env,
        "pki",
        "broker-config",
        "--out",
        str(out),
        "--host",
        "mqtt.example.com",
        "--host",
        "10.0.0.5",
    )
    assert "(kept)" in again.output
    assert (out / "server.crt").read_bytes() == server.public_bytes(serialization.Encoding.PEM)
    moved = run(env, "pki", "broker-config", "--out", str(out), "--host", "other.example.com")
    assert "(new)" in moved.output


@pytest.mark.parametrize("host", ["bad host", "-x.example.com", "a" * 300, "*.example.com"])
def test_broker_config_refuses_bad_hosts(conn, env, tmp_path, host):
    result = run(env, "pki", "broker-config", "--out", str(tmp_path / "b"), "--host", host)
    assert result.exit_code == 1
    assert "bad broker host" in result.output
    assert not (tmp_path / "b" / "mosquitto-tls.conf").exists()


def test_listing_certificates(conn, env, ca):
    make_tenant(conn)
    make_device(conn, ca, MAC)
    make_device(conn, ca, OTHER)
    pki.revoke(conn, OTHER, actor="test")
    table = run(env, "pki", "certificates", "--status", "revoked")
    assert table.exit_code == 0, table.output
    assert OTHER in table.output
    assert MAC not in table.output
    as_json = run(env, "pki", "certificates", "--mac", MAC, "--json")
    assert '"status": "active"' in as_json.output
    empty = run(env, "pki", "renewals")
    assert empty.exit_code == 0
    assert "No renewals." in empty.output


# --- the expiry sweep and its checks ---------------------------------------------------------


def materialize_sweep(database_url: str, ca: pki.CertificateAuthority):
    return dg.materialize(
        [
            certificate_expiry_sweep,
            active_devices_have_one_active_certificate,
            no_active_device_has_an_expired_certificate,
            crl_lists_every_revoked_serial,
        ],
        resources={
            "postgres": PostgresResource(database_url=database_url),
            "certificates": CertificatesResource(pki_dir=str(ca.directory)),
        },
        raise_on_error=False,
    )


def check_results(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_sweep_classifies_every_certificate_and_refreshes_the_crl(conn, database_url, ca):
    make_tenant(conn)
    make_device(conn, ca, "02:00:00:00:00:01")  # ok: 10 years
    make_device(conn, ca, "02:00:00:00:00:02", expires_in=timedelta(days=700))  # due
    make_device(conn, ca, "02:00:00:00:00:03", expires_in=timedelta(days=729))  # due
    make_device(conn, ca, "02:00:00:00:00:04", expires_in=timedelta(days=731))  # ok
    make_device(conn, ca, "02:00:00:00:00:05")
    pki.revoke(conn, "02:00:00:00:00:05", actor="test")  # revoked, CRL not written yet
    result = materialize_sweep(database_url, ca)
    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert (metadata["ok"], metadata["renewal_due"], metadata["revoked"]) == (2, 2, 1)
    assert (metadata["expired"], metadata["devices_without_certificate"]) == (0, 1)
    assert metadata["crl_revoked"] == 1
    assert check_results(result) == {
        "active_devices_have_one_active_certificate": False,  # 05 has none now
        "no_active_device_has_an_expired_certificate": True,
        "crl_lists_every_revoked_serial": True,
    }
    row = conn.execute(
        "SELECT ok, renewal_due, revoked, crl_number FROM certificate_sweeps"
    ).fetchone()
    assert row == (2, 2, 1, 1)


def test_sweep_checks_fail_on_expired_certificates(conn, database_url, ca):
    make_tenant(conn)
    make_device(conn, ca, MAC)
    conn.execute(
        "UPDATE device_certificates SET not_before = now() - interval '11 years',"
        " not_after = now() - interval '1 day'"
    )
    result = materialize_sweep(database_url, ca)
    (event,) = result.get_asset_materialization_events()
    assert event.materialization.metadata["expired"].value == 1
    assert check_results(result) == {
        "active_devices_have_one_active_certificate": True,
        "no_active_device_has_an_expired_certificate": False,
        "crl_lists_every_revoked_serial": True,
    }


def test_sweep_without_a_ca_fails_clearly(database_url, tmp_path):
    result = dg.materialize(
        [certificate_expiry_sweep],
        resources={
            "postgres": PostgresResource(database_url=database_url),
            "certificates": CertificatesResource(pki_dir=str(tmp_path / "nothing")),
        },
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "no CA in" in failure.step_failure_data.error.message


# --- what the broker makes of it ------------------------------------------------------------


def connect_device(tls, state_dir: Path, mac: str) -> tuple[mqtt.Client | None, str]:
    """Connect as the device with its identity.pem: (client, "") or (None, why not)."""
    answered = threading.Event()
    outcome: list[str] = []
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=mac,
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=False,
    )
    client.tls_set(ca_certs=str(state_dir / "ca.pem"), certfile=str(state_dir / "identity.pem"))

    def on_connect(_c, _u, _f, reason, _p):
        outcome.append("ok" if not reason.is_failure else str(reason))
        answered.set()

    def on_disconnect(*_args):
        outcome.append("closed")
        answered.set()

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    try:
        client.connect("127.0.0.1", tls.port)
    except OSError as exc:
        return None, f"handshake: {exc}"
    client.loop_start()
    answered.wait(15)
    if outcome[:1] == ["ok"]:
        return client, ""
    client.loop_stop()
    return None, ",".join(outcome) or "no answer"


@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
)
def test_broker_accepts_devices_refuses_revoked_ones_and_keeps_them_to_their_topics(
    conn, env, ca, tmp_path
):
    make_tenant(conn)
    make_device(conn, ca, MAC, state_dir=tmp_path / "a")
    make_device(conn, ca, OTHER, state_dir=tmp_path / "b")
    tls = start_tls_broker(conn, ca, tmp_path)
    recorder = Recorder(tls, f"{PREFIX}/devices/+/telemetry")
    try:
        device, why = connect_device(tls, tmp_path / "a", MAC)
        assert device is not None, why
        settled: dict[int, str] = {}
        device.on_publish = lambda _c, _u, mid, reason, _p: settled.__setitem__(mid, str(reason))
        own = device.publish(f"{PREFIX}/devices/{MAC}/telemetry", b'{"own":1}', qos=1)
        own.wait_for_publish(10)
        assert wait_for(lambda: recorder.on(f"{PREFIX}/devices/{MAC}/telemetry"))
        forged = device.publish(f"{PREFIX}/devices/{OTHER}/telemetry", b'{"forged":1}', qos=1)
        assert wait_for(lambda: forged.mid in settled)
        assert settled[forged.mid] == "Not authorized"
        # Mosquitto 2.0.11 also drops the connection (it compares its queue with
        # max_queued_messages 0, "unlimited"); the denial is what counts here.
        device.loop_stop()
        # the broker routed (or refused) the forged message before its PUBACK; a marker
        # published after it reaches the recorder after anything routed before it
        marker = connect_platform(tls)
        marker.publish(f"{PREFIX}/devices/{OTHER}/telemetry", b"marker", qos=1).wait_for_publish(10)
        marker.disconnect()
        marker.loop_stop()
        assert wait_for(lambda: recorder.on(f"{PREFIX}/devices/{OTHER}/telemetry"))
        assert recorder.on(f"{PREFIX}/devices/{OTHER}/telemetry") == [b"marker"]

        result = run(env, "devices", "revoke", "--mac", MAC)
        assert result.exit_code == 0, result.output
        tls.reload()
        refused, why = connect_device(tls, tmp_path / "a", MAC)
        assert refused is None
        still, why = connect_device(tls, tmp_path / "b", OTHER)
        assert still is not None, why
        still.disconnect()
        still.loop_stop()
    finally:
        recorder.close()
        tls.broker.stop()
