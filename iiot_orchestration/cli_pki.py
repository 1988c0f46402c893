"""``iiot pki ...``, ``iiot devices issue-cert`` and ``iiot devices revoke``: the device CA,
certificates, the CRL and the broker's TLS configuration (docs/certificates.md)."""

from __future__ import annotations

from pathlib import Path

import click

from iiot_orchestration import ota, pki
from iiot_orchestration.cli_common import HelpGroup, _json, _settings, _table, friendly_errors
from iiot_orchestration.db import connect
from iiot_orchestration.registry import normalise_mac

STATUSES = ("active", "pending", "superseded", "revoked")


def _ca() -> pki.CertificateAuthority:
    settings = _settings()
    return pki.load_ca(settings.pki_dir, settings.pki_ca_key_file)


def _reload_hint(path: Path) -> str:
    return f"the broker reads {path} when it reloads: kill -HUP $(pidof mosquitto)"


@click.group("pki", cls=HelpGroup)
def pki_group() -> None:
    """The device CA, the CRL and the broker's TLS configuration."""


@pki_group.command("init")
@click.option(
    "--name", default=pki.DEFAULT_CA_NAME, show_default=True, help="The CA's common name."
)
@friendly_errors
def init_command(name: str) -> None:
    """Create the device CA in IIOT_PKI_DIR (key mode 0600); an existing CA is kept."""
    settings = _settings()
    directory = settings.pki_dir
    ca, created = pki.init_ca(directory, name=name, key_file=settings.pki_ca_key_file)
    verb = "Created" if created else "Kept the existing"
    click.echo(
        f"{verb} CA {pki.common_name(ca.certificate)!r} in {directory}: fingerprint "
        f"{ca.fingerprint}, valid until {ca.not_after:%Y-%m-%d}."
    )
    if created:
        click.echo(
            f"Back up {pki.key_location(directory, settings.pki_ca_key_file)}: it cannot be "
            "recreated."
        )


@pki_group.command("crl")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly_errors
def crl_command(as_json: bool) -> None:
    """Rewrite the CRL from every revoked certificate (valid 7 days; the sweep does it daily)."""
    ca = _ca()
    with connect(_settings().require_database_url(), role="platform_rw") as conn:
        crl = pki.refresh_crl(conn, ca)
    if as_json:
        click.echo(_json([crl.__dict__ | {"path": str(crl.path)}]))
        return
    click.echo(
        f"CRL {crl.number}: {crl.revoked} revoked serials, valid until "
        f"{crl.next_update:%Y-%m-%d %H:%M} UTC, written to {crl.path}; {_reload_hint(crl.path)}"
    )


@pki_group.command("broker-config")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for the files [default: IIOT_PKI_DIR/broker].",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Broker name or address devices connect to (repeat) [default: localhost, 127.0.0.1].",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8883, show_default=True)
@click.option("--bind", default="0.0.0.0", show_default=True, help="Interface to listen on.")  # noqa: S104
@friendly_errors
def broker_config_command(out: Path | None, hosts: tuple[str, ...], port: int, bind: str) -> None:
    """Write the Mosquitto TLS listener (CA, CRL, require_certificate, use_identity_as_username),
    an ACL that lets each device write only its own topics, the broker's server certificate and
    the platform's client certificate."""
    settings = _settings()
    ca = _ca()
    with connect(settings.require_database_url(), role="platform_rw") as conn:
        crl = pki.refresh_crl(conn, ca)
    files = pki.write_broker_config(
        ca,
        out or _local_pki_dir(settings.pki_dir, "broker", "--out"),
        prefix=settings.topic_prefix,
        hosts=list(hosts) or ["localhost", "127.0.0.1"],
        port=port,
        bind=bind,
    )
    click.echo(f"Wrote {files.config} (include it from mosquitto.conf) and {files.acl}.")
    click.echo(
        f"Server certificate {files.server_cert} ({'kept' if files.reused_server_cert else 'new'}),"
        f" platform client certificate {files.platform_cert} for IIOT_MQTT_CERT_FILE/_KEY_FILE."
    )
    click.echo(f"CRL {crl.number} at {files.crl}; {_reload_hint(files.crl)}")


@pki_group.command("certificates")
@click.option("--mac", help="Only this device's certificates.")
@click.option("--status", type=click.Choice(STATUSES), help="Only certificates in this status.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def certificates_command(mac: str | None, status: str | None, as_json: bool) -> None:
    """List issued certificates, newest first."""
    with connect(_settings().require_database_url(), role="platform_rw") as conn:
        found = pki.certificates(conn, mac=mac, status=status)
    rows = [
        {
            "mac": c.mac,
            "serial": c.serial_hex,
            "status": c.status,
            "not_before": c.not_before,
            "not_after": c.not_after,
            "revoked_at": c.revoked_at,
            "revocation": c.revocation_code,
        }
        for c in found
    ]
    if as_json:
        click.echo(_json(rows))
        return
    if not rows:
        click.echo("No certificates.")
        return
    click.echo(_table(list(rows[0]), [list(r.values()) for r in rows]))


@pki_group.command("renewals")
@click.option("--mac", help="Only this device's renewals.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def renewals_command(mac: str | None, limit: int, as_json: bool) -> None:
    """List over-the-air renewal attempts, newest first."""
    with connect(_settings().require_database_url(), role="platform_rw") as conn:
        found = ota.renewals(conn, mac=mac, limit=limit)
    if as_json:
        click.echo(_json(found))
        return
    if not found:
        click.echo("No renewals.")
        return
    columns = ["mac", "batch_day", "attempt", "status", "new_serial", "failure_reason"]
    click.echo(
        _table(
            [*columns, "retry_after"],
            [[r[c] for c in columns] + [r["next_attempt_after"]] for r in found],
        )
    )


@click.command("issue-cert")
@click.option("--mac", required=True, help="The device's MAC; it must be provisioned and active.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for ca.pem and identity.pem [default: IIOT_PKI_DIR/devices/<mac>].",
)
@click.option(
    "--csr",
    "csr_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Sign the device's own CSR (it keeps its key) instead of making a key pair.",
)
@click.option("--actor", default="cli", show_default=True, help="Who issues it (audit log).")
@friendly_errors
def issue_cert_command(mac: str, out: Path | None, csr_path: Path | None, actor: str) -> None:
    """Issue a device's first certificate (RSA 2048, CN = MAC, 10 years) and write the gateway
    agent's state directory: ca.pem and identity.pem (key and certificate, mode 0600), or
    certificate.pem with --csr."""
    mac = normalise_mac(mac)
    csr = csr_path.read_bytes()[: pki.MAX_CSR_BYTES + 1] if csr_path else None
    issue_and_write(_ca(), mac, out, csr=csr, actor=actor)


def device_directory(mac: str) -> Path:
    """The default state directory of a device's gateway agent files."""
    return _local_pki_dir(_settings().pki_dir, "devices", "--out") / mac.replace(":", "-")


def _local_pki_dir(pki_dir: Path | str, name: str, option: str) -> Path:
    """A folder of IIOT_PKI_DIR for files with private keys; with the PKI in object storage,
    where private keys never go, the command needs ``option``."""
    if not isinstance(pki_dir, Path):
        raise pki.PkiError(
            f"IIOT_PKI_DIR={pki_dir} is object storage, where private keys never go: "
            f"give {option} a local directory"
        )
    return pki_dir / name


def issue_and_write(
    ca: pki.CertificateAuthority,
    mac: str,
    out: Path | None,
    *,
    csr: bytes | None = None,
    actor: str = "cli",
) -> pki.Issued:
    """Issue a provisioned device's first certificate and write ca.pem with identity.pem (or
    certificate.pem for a CSR) into ``out``; print what was done."""
    out = out or device_directory(mac)
    taken = [p for p in ("identity.pem", "certificate.pem") if (out / p).exists()]
    if taken:
        raise pki.PkiError(
            f"{out / taken[0]} exists: choose another --out (keys are never overwritten)"
        )
    url = _settings().require_database_url()
    with connect(url, role="platform_rw") as conn, conn.transaction():
        issued = pki.issue_for_device(conn, ca, mac, csr=csr, actor=actor)
        # written before the commit: a failure here leaves no certificate without its files
        pki.write_file(out / "ca.pem", ca.cert_path.read_bytes())
        if issued.key is not None:
            pki.write_file(
                out / "identity.pem",
                pki.private_key_pem(issued.key) + pki.certificate_pem(issued.certificate).encode(),
                private=True,
            )
        else:
            pki.write_file(
                out / "certificate.pem", pki.certificate_pem(issued.certificate).encode()
            )
    click.echo(
        f"Issued certificate {pki.serial_hex(issued.certificate.serial_number)} for {mac}, valid "
        f"until {issued.certificate.not_valid_after_utc:%Y-%m-%d}; wrote {out}."
    )
    return issued


@click.command("revoke")
@click.option("--mac", required=True, help="The device whose certificate to revoke.")
@click.option("--serial", help="This certificate (hex) [default: the active and pending ones].")
@click.option(
    "--reason",
    type=click.Choice(pki.REVOCATION_CODES),
    default="unspecified",
    show_default=True,
    help="The CRL reason code.",
)
@click.option("--note", help="Why, for the audit log (up to 200 characters).")
@click.option("--actor", default="cli", show_default=True, help="Who revokes it (audit log).")
@friendly_errors
def revoke_command(mac: str, serial: str | None, reason: str, note: str | None, actor: str) -> None:
    """Revoke a device's certificate and rewrite the CRL; the broker refuses the certificate
    once it reloads the CRL."""
    number = pki.parse_serial(serial) if serial is not None else None
    ca = _ca()
    with connect(_settings().require_database_url(), role="platform_rw") as conn:
        revoked = pki.revoke(conn, mac, serial=number, code=reason, reason=note, actor=actor)
        crl = pki.refresh_crl(conn, ca)
    for record in revoked:
        click.echo(f"Revoked {record.mac} certificate {record.serial_hex} (was {record.status}).")
    click.echo(f"CRL {crl.number} lists {crl.revoked} serials; {_reload_hint(crl.path)}")
