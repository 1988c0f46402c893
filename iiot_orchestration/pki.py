"""The device PKI: a CA, device certificates, the CRL and the broker's TLS configuration.

Policy (the seeds', docs/certificates.md): device certificates are RSA 2048 with CN = the
device's MAC (``aa:bb:cc:dd:ee:ff``), valid for 10 years, serials recorded in
``device_certificates``; revocation is by CRL, which the broker (Mosquitto ``crlfile``) checks on
every TLS handshake. The CA lives in ``IIOT_PKI_DIR``: ``ca.key`` (mode 0600), ``ca.crt`` and
``crl.pem``. The CRL is valid for ``CRL_VALIDITY`` and refreshed by every revocation and by the
daily expiry sweep, so an expired CRL (which makes the broker refuse every device) means the
sweep has not run for a week.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iiot_orchestration import filestore
from iiot_orchestration.errors import IiotError
from iiot_orchestration.registry import RegistryError, audit, normalise_mac

log = logging.getLogger(__name__)

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
CRL_FILE = "crl.pem"
DEVICE_KEY_BITS = 2048
CA_KEY_BITS = 3072
DEVICE_VALIDITY = timedelta(days=3650)
CA_VALIDITY = timedelta(days=7305)  # 20 years: outlives every device certificate it signs
RENEWAL_WINDOW = timedelta(days=730)
CRL_VALIDITY = timedelta(days=7)
CLOCK_SKEW = timedelta(minutes=5)  # not_before is backdated, for devices whose clock is behind
PLATFORM_COMMON_NAME = "iiot-platform"
DEFAULT_CA_NAME = "IIoT device CA"
REVOCATION_CODES = (
    "unspecified",
    "keyCompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "privilegeWithdrawn",
)
MAX_CSR_BYTES = 64 * 1024
_HOST_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")
_SERIAL = re.compile(r"^[0-9a-f]{1,40}$")


class PkiError(IiotError):
    """A PKI file or request is missing, malformed or refused; the message says which."""


@dataclass(frozen=True)
class CertificateAuthority:
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    directory: Path | str  # IIOT_PKI_DIR: a local directory or an fsspec URL (filestore.py)
    key_file: Path | None = None  # IIOT_PKI_CA_KEY_FILE; None: <directory>/ca.key

    @property
    def cert_path(self) -> Path | str:
        return filestore.join(self.directory, CA_CERT_FILE)

    @property
    def crl_path(self) -> Path | str:
        return filestore.join(self.directory, CRL_FILE)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc


def key_location(directory: Path | str, key_file: Path | None = None) -> Path:
    """Where the CA's private key is: ``key_file`` (IIOT_PKI_CA_KEY_FILE, a local file such as a
    mounted secret), else ``ca.key`` beside the certificate in a local PKI directory. Never in
    object storage: a remote IIOT_PKI_DIR needs IIOT_PKI_CA_KEY_FILE."""
    if key_file is not None:
        return Path(key_file)
    if filestore.is_url(directory):
        raise PkiError(
            f"IIOT_PKI_DIR={directory} is object storage, where the CA's private key never goes: "
            "set IIOT_PKI_CA_KEY_FILE to a local file (a mounted secret, mode 0600)"
        )
    return Path(directory) / CA_KEY_FILE


def _store(directory: Path | str) -> filestore.Store:
    return filestore.open_root(directory, "IIOT_PKI_DIR", PkiError)


def write_public(directory: Path | str, name: str, data: bytes) -> Path | str:
    """A public PKI file (the CA certificate, the CRL) replaced atomically in the PKI root."""
    path = filestore.join(directory, name)
    if isinstance(path, Path):
        write_file(path, data)
    else:
        _store(directory).write_atomic(name, [data])
    return path


def read_public(path: Path | str) -> bytes:
    """A public PKI file; FileNotFoundError when it is absent, as for a local path."""
    if isinstance(path, Path):
        return path.read_bytes()
    folder, _, name = path.rpartition("/")
    store = _store(folder)
    if not store.exists(name):
        raise FileNotFoundError(path)
    return store.read_bytes(name)


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def serial_hex(serial: int) -> str:
    return f"{serial:x}"


def parse_serial(raw: str) -> int:
    """A serial as hex (``0x`` prefix and ``:`` separators allowed), or PkiError."""
    text = raw.strip().lower().removeprefix("0x").replace(":", "")
    if not _SERIAL.match(text):
        raise PkiError(f"bad serial {raw[:60]!r}: expected up to 40 hex digits such as 4f3a09c1")
    return int(text, 16)


def common_name(certificate: x509.Certificate | x509.CertificateSigningRequest) -> str | None:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def certificate_pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def private_key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate_key(bits: int = DEVICE_KEY_BITS) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Replace ``path`` atomically (a reader sees the old or the new file, never half of one);
    a private file is created with mode 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, 0o600 if private else 0o644)
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _check_ca_name(text: str) -> str:
    name = text.strip()
    if not 1 <= len(name) <= 64 or any(not ch.isprintable() for ch in name):
        raise PkiError("the CA's common name must be 1 to 64 printable characters")
    return name


def init_ca(
    directory: Path | str,
    *,
    name: str = DEFAULT_CA_NAME,
    now: datetime | None = None,
    key_file: Path | None = None,
) -> tuple[CertificateAuthority, bool]:
    """Create the CA in ``directory`` (key mode 0600), or load the one there. Returns the CA
    and whether it was created now. A half-made CA (a key without certificate or the reverse)
    is an error: replacing it would orphan every certificate it signed."""
    name = _check_ca_name(name)
    key_path = key_location(directory, key_file)
    if key_path.exists() or _store(directory).exists(CA_CERT_FILE):
        return load_ca(directory, key_file), False
    now = now or datetime.now(UTC)
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = generate_key(CA_KEY_BITS)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    try:
        # O_EXCL: of two concurrent `iiot pki init`, one creates the CA, the other fails here
        handle = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PkiError(f"{key_path} appeared while creating the CA: run it again") from None
    with os.fdopen(handle, "wb") as file:
        file.write(private_key_pem(key))
    write_public(directory, CA_CERT_FILE, certificate.public_bytes(serialization.Encoding.PEM))
    log.info("created CA %s in %s", fingerprint(certificate), directory)
    return CertificateAuthority(key, certificate, directory, key_file), True


def load_ca(directory: Path | str, key_file: Path | None = None) -> CertificateAuthority:
    """The CA in ``directory``, checked: both files present and readable, the key private to
    its owner, the certificate a CA certificate whose public key is the key's. The key is
    ``key_file`` when given (IIOT_PKI_CA_KEY_FILE), else ``ca.key`` in ``directory``."""
    key_path = key_location(directory, key_file)
    cert_path = filestore.join(directory, CA_CERT_FILE)
    missing = [
        name
        for name, present in (
            (key_path.name, key_path.exists()),
            (CA_CERT_FILE, _store(directory).exists(CA_CERT_FILE)),
        )
        if not present
    ]
    if len(missing) == 2:
        raise PkiError(f"no CA in {directory}: run `iiot pki init` (IIOT_PKI_DIR={directory})")
    if missing:
        raise PkiError(
            f"incomplete CA in {directory}: {missing[0]} is missing; restore it from the backup "
            "(a new CA would orphan every certificate the old one signed)"
        )
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        raise PkiError(
            f"{key_path} is readable by other users (mode {mode:04o}): chmod 600 {key_path}"
        )
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{key_path} is not an unencrypted PEM private key: {exc}") from None
    try:
        certificate = x509.load_pem_x509_certificate(read_public(cert_path))
    except ValueError as exc:
        raise PkiError(f"{cert_path} is not a PEM certificate: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PkiError(f"{key_path} is not an RSA key")
    if certificate.public_key().public_numbers() != key.public_key().public_numbers():
        raise PkiError(f"{cert_path} does not belong to the key {key_path}")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.value.ca:
        raise PkiError(f"{cert_path} is not a CA certificate")
    return CertificateAuthority(key, certificate, directory, key_file)


def _leaf(
    ca: CertificateAuthority,
    subject: str,
    public_key: Any,
    usage: x509.ObjectIdentifier,
    *,
    now: datetime,
    not_after: datetime,
    alternative_names: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    if not_after > ca.not_after:
        raise PkiError(
            f"the certificate would outlive the CA (CA expires {ca.not_after:%Y-%m-%d}): "
            "renew the CA first (docs/runbooks/certificate-renewal.md)"
        )
    if not_after <= now:
        raise PkiError("the certificate would expire before it is valid")
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if alternative_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(alternative_names)), critical=False
        )
    return builder.sign(ca.key, hashes.SHA256())


def _check_device_key(public_key: Any) -> None:
    if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size < DEVICE_KEY_BITS:
        raise PkiError(f"device keys must be RSA of at least {DEVICE_KEY_BITS} bits")


def issue_device_certificate(
    ca: CertificateAuthority,
    mac: str,
    public_key: Any,
    *,
    now: datetime | None = None,
    not_after: datetime | None = None,
) -> x509.Certificate:
    """A client certificate for the device ``mac``: CN = the MAC, 10 years unless
    ``not_after`` says otherwise."""
    mac = normalise_mac(mac)
    _check_device_key(public_key)
    now = now or datetime.now(UTC)
    return _leaf(
        ca,
        mac,
        public_key,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        now=now,
        not_after=not_after or now + DEVICE_VALIDITY,
    )


def load_csr(data: bytes, mac: str) -> x509.CertificateSigningRequest:
    """A device's certificate signing request, checked: PEM, self-signed correctly, an RSA key
    of 2048 bits or more, and no common name other than the device's MAC."""
    if len(data) > MAX_CSR_BYTES:
        raise PkiError(f"the CSR is larger than {MAX_CSR_BYTES // 1024} KiB")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise PkiError(
            "not a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST)"
        ) from None
    if not csr.is_signature_valid:
        raise PkiError("the CSR's signature does not verify: it was altered or is corrupt")
    _check_device_key(csr.public_key())
    asked = common_name(csr)
    if asked is not None and asked.strip().lower() != normalise_mac(mac):
        raise PkiError(f"the CSR asks for CN {asked[:40]!r}, not the device's MAC {mac}")
    return csr


def _check_hosts(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _HOST_NAME.match(host):
                raise PkiError(
                    f"bad broker host {host[:80]!r}: a DNS name or an IP address"
                ) from None
            names.append(x509.DNSName(host.rstrip(".").lower()))
    if not names:
        raise PkiError("the broker certificate needs at least one host name or address")
    return names


def issue_server_certificate(
    ca: CertificateAuthority, hosts: Sequence[str], key: rsa.RSAPrivateKey, *, now: datetime
) -> x509.Certificate:
    """The broker's TLS server certificate, for ``hosts`` (names and addresses)."""
    names = _check_hosts(hosts)
    return _leaf(
        ca,
        hosts[0],
        key.public_key(),
        ExtendedKeyUsageOID.SERVER_AUTH,
        now=now,
        not_after=min(now + DEVICE_VALIDITY, ca.not_after),
        alternative_names=names,
    )


def issue_platform_certificate(
    ca: CertificateAuthority, key: rsa.RSAPrivateKey, *, now: datetime
) -> x509.Certificate:
    """The client certificate of the platform's own MQTT clients (ingest, OTA publisher, ack
    consumer): CN ``iiot-platform``, which the ACL lets read and write every device topic."""
    return _leaf(
        ca,
        PLATFORM_COMMON_NAME,
        key.public_key(),
        ExtendedKeyUsageOID.CLIENT_AUTH,
        now=now,
        not_after=min(now + DEVICE_VALIDITY, ca.not_after),
    )


# --- the registry of issued certificates --------------------------------------------------


@dataclass(frozen=True)
class Device:
    device_id: int
    tenant_id: int
    mac: str
    status: str


@dataclass(frozen=True)
class CertificateRecord:
    certificate_id: int
    device_id: int
    tenant_id: int
    mac: str
    serial: int
    status: str
    not_before: datetime
    not_after: datetime
    certificate_pem: str
    revoked_at: datetime | None = None
    revocation_code: str | None = None

    @property
    def serial_hex(self) -> str:
        return serial_hex(self.serial)

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem.encode())


_RECORD_COLUMNS = (
    "c.certificate_id, c.device_id, c.tenant_id, d.mac::text, c.serial, c.status, c.not_before,"
    " c.not_after, c.certificate_pem, c.revoked_at, c.revocation_code"
)


def _record(row: Sequence[Any]) -> CertificateRecord:
    values = list(row)
    values[4] = int(values[4])
    return CertificateRecord(*values)


def find_device(conn: psycopg.Connection, mac: str) -> Device:
    mac = normalise_mac(mac)
    row = conn.execute(
        "SELECT device_id, tenant_id, mac::text, status FROM devices WHERE mac = %s", (mac,)
    ).fetchone()
    if row is None:
        raise RegistryError(f"no device with MAC {mac}: `iiot devices list` shows the devices")
    return Device(*row)


def certificates(
    conn: psycopg.Connection, *, mac: str | None = None, status: str | None = None
) -> list[CertificateRecord]:
    """Certificates, of one device and/or one status, newest first."""
    rows = conn.execute(
        f"SELECT {_RECORD_COLUMNS} FROM device_certificates c JOIN devices d USING (device_id)"
        " WHERE (%(mac)s::macaddr IS NULL OR d.mac = %(mac)s::macaddr)"
        "   AND (%(status)s::text IS NULL OR c.status = %(status)s::text)"
        " ORDER BY c.issued_at DESC, c.certificate_id DESC",
        {"mac": normalise_mac(mac) if mac else None, "status": status},
    ).fetchall()
    return [_record(r) for r in rows]


def record_certificate(
    conn: psycopg.Connection,
    device: Device,
    certificate: x509.Certificate,
    *,
    status: str,
    issued_at: datetime,
) -> int:
    """Insert an issued certificate; its id."""
    (certificate_id,) = conn.execute(
        "INSERT INTO device_certificates (tenant_id, device_id, serial, subject_cn,"
        " fingerprint_sha256, not_before, not_after, status, certificate_pem, issued_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING certificate_id",
        (
            device.tenant_id,
            device.device_id,
            certificate.serial_number,
            common_name(certificate),
            fingerprint(certificate),
            certificate.not_valid_before_utc,
            certificate.not_valid_after_utc,
            status,
            certificate_pem(certificate),
            issued_at,
        ),
    ).fetchone()
    return certificate_id


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: rsa.RSAPrivateKey | None  # None when the device sent a CSR and keeps its key
    certificate_id: int
    device: Device


def issue_for_device(
    conn: psycopg.Connection,
    ca: CertificateAuthority,
    mac: str,
    *,
    csr: bytes | None = None,
    actor: str,
    now: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    """The first certificate of a device (at provisioning): a new key pair, or the device's
    CSR signed. Refused while the device has an active certificate: renewal replaces that one
    over the air, and a replacement by hand starts with `iiot devices revoke`."""
    now = now or datetime.now(UTC)
    with conn.transaction():
        device = find_device(conn, mac)
        if device.status != "active":
            raise PkiError(f"device {device.mac} is {device.status}: only active devices get one")
        active = conn.execute(
            "SELECT serial, not_after FROM device_certificates"
            " WHERE device_id = %s AND status = 'active' FOR UPDATE",
            (device.device_id,),
        ).fetchone()
        if active is not None:
            raise PkiError(
                f"device {device.mac} already has an active certificate (serial "
                f"{serial_hex(int(active[0]))}, expires {active[1]:%Y-%m-%d}): OTA renewal "
                "replaces it; to replace it by hand, revoke it first (`iiot devices revoke`)"
            )
        key = None
        if csr is not None:
            public_key = load_csr(csr, device.mac).public_key()
        else:
            key = generate_key()
            public_key = key.public_key()
        certificate = issue_device_certificate(
            ca, device.mac, public_key, now=now, not_after=not_after
        )
        certificate_id = record_certificate(
            conn, device, certificate, status="active", issued_at=now
        )
        audit(
            conn,
            actor=actor,
            action="certificate.issued",
            entity="device_certificate",
            entity_id=serial_hex(certificate.serial_number),
            tenant_id=device.tenant_id,
            detail={"mac": device.mac, "not_after": certificate.not_valid_after_utc.isoformat()},
        )
    return Issued(certificate, key, certificate_id, device)


def revoke(
    conn: psycopg.Connection,
    mac: str,
    *,
    serial: int | None = None,
    code: str = "unspecified",
    reason: str | None = None,
    actor: str,
    now: datetime | None = None,
) -> list[CertificateRecord]:
    """Revoke the device's certificate ``serial``, or (without one) its active and pending
    certificates. Returns what was revoked; the caller refreshes the CRL."""
    if code not in REVOCATION_CODES:
        raise PkiError(
            f"unknown revocation reason {code[:40]!r}: one of {', '.join(REVOCATION_CODES)}"
        )
    if reason is not None and (len(reason) > 200 or not reason.isprintable()):
        raise PkiError("the revocation note must be at most 200 printable characters")
    now = now or datetime.now(UTC)
    with conn.transaction():
        device = find_device(conn, mac)
        found = [
            _record(r)
            for r in conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM device_certificates c JOIN devices d"
                " USING (device_id) WHERE c.device_id = %s AND (%s::numeric IS NULL AND"
                " c.status IN ('active', 'pending') OR c.serial = %s::numeric)"
                " ORDER BY c.certificate_id FOR UPDATE OF c",
                (device.device_id, serial, serial),
            ).fetchall()
        ]
        if serial is not None and not found:
            raise PkiError(
                f"device {device.mac} has no certificate with serial {serial_hex(serial)}"
            )
        if serial is None and not found:
            raise PkiError(f"device {device.mac} has no active or pending certificate to revoke")
        if serial is not None and found[0].status == "revoked":
            raise PkiError(
                f"certificate {serial_hex(serial)} of {device.mac} was already revoked on "
                f"{found[0].revoked_at:%Y-%m-%d %H:%M} UTC"
            )
        note = code if not reason else f"{code}: {reason}"
        for record in found:
            conn.execute(
                "UPDATE device_certificates SET status = 'revoked', revoked_at = %s,"
                " revocation_code = %s, revocation_reason = %s WHERE certificate_id = %s",
                (now, code, note, record.certificate_id),
            )
            audit(
                conn,
                actor=actor,
                action="certificate.revoked",
                entity="device_certificate",
                entity_id=record.serial_hex,
                tenant_id=device.tenant_id,
                detail={"mac": device.mac, "was": record.status, "reason": note},
            )
    return found


# --- the CRL ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrlState:
    number: int
    path: Path | str
    revoked: int
    sha256: str
    generated_at: datetime
    next_update: datetime


def build_crl(
    ca: CertificateAuthority,
    revoked: Iterable[tuple[int, datetime, str | None]],
    *,
    number: int,
    now: datetime,
) -> x509.CertificateRevocationList:
    """A CRL of ``(serial, revoked_at, code)`` entries, valid from now for CRL_VALIDITY."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    for serial, revoked_at, code in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(revoked_at)
        if code and code != "unspecified":  # RFC 5280: unspecified is sent as no reason at all
            entry = entry.add_extension(x509.CRLReason(x509.ReasonFlags(code)), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca.key, hashes.SHA256())


def revoked_serials(conn: psycopg.Connection) -> list[tuple[int, datetime, str | None]]:
    rows = conn.execute(
        "SELECT serial, revoked_at, revocation_code FROM device_certificates"
        " WHERE status = 'revoked' ORDER BY serial"
    ).fetchall()
    return [(int(serial), at, code) for serial, at, code in rows]


def refresh_crl(
    conn: psycopg.Connection, ca: CertificateAuthority, *, now: datetime | None = None
) -> CrlState:
    """Write ``crl.pem`` from every revoked certificate in the database, with the next CRL
    number, and record it. The broker reads the new file on reload (SIGHUP)."""
    now = now or datetime.now(UTC)
    with conn.transaction():
        # one writer at a time, so that CRL numbers and the file on disk go up together
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('iiot_certificate_crl'))")
        revoked = revoked_serials(conn)
        (number,) = conn.execute(
            "SELECT coalesce(max(crl_number), 0) + 1 FROM certificate_crls"
        ).fetchone()
        crl = build_crl(ca, revoked, number=number, now=now)
        data = crl.public_bytes(serialization.Encoding.PEM)
        digest = hashlib.sha256(data).hexdigest()
        conn.execute(
            "INSERT INTO certificate_crls (crl_number, generated_at, next_update, revoked,"
            " sha256, ca_fingerprint) VALUES (%s, %s, %s, %s, %s, %s)",
            (number, now, crl.next_update_utc, len(revoked), digest, ca.fingerprint),
        )
        write_public(ca.directory, CRL_FILE, data)
    log.info("wrote CRL %d with %d revoked serials to %s", number, len(revoked), ca.crl_path)
    return CrlState(number, ca.crl_path, len(revoked), digest, now, crl.next_update_utc)


@dataclass(frozen=True)
class CrlContents:
    number: int | None
    serials: frozenset[int]
    next_update: datetime | None


def read_crl(path: Path | str, ca: CertificateAuthority) -> CrlContents:
    """The serials of the CRL file at ``path``, after checking the CA signed it."""
    try:
        crl = x509.load_pem_x509_crl(read_public(path))
    except FileNotFoundError:
        raise PkiError(f"no CRL at {path}: run `iiot pki crl`") from None
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM CRL: {exc}") from None
    if not crl.is_signature_valid(ca.key.public_key()):
        raise PkiError(f"{path} is not signed by the CA in {ca.directory}")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    return CrlContents(number, frozenset(r.serial_number for r in crl), crl.next_update_utc)


# --- the broker ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerFiles:
    config: Path
    acl: Path
    server_cert: Path
    server_key: Path
    platform_cert: Path
    platform_key: Path
    ca: Path
    crl: Path
    reused_server_cert: bool


MOSQUITTO_TLS = """\
# Mutual TLS for devices: written by `iiot pki broker-config` (docs/certificates.md).
# Include it from mosquitto.conf; `kill -HUP <mosquitto>` reloads the CRL and the ACL.
listener {port} {bind}
cafile {ca}
certfile {server_cert}
keyfile {server_key}
crlfile {crl}
require_certificate true
use_identity_as_username true
tls_version tlsv1.2
allow_anonymous false
acl_file {acl}
"""

MOSQUITTO_ACL = """\
# Written by `iiot pki broker-config`. %u is the certificate's common name: a device's MAC.
# The platform's own clients (ingest, OTA publisher, ack consumer) use CN {platform}.
user {platform}
topic readwrite {prefix}/devices/#

pattern write {prefix}/devices/%u/telemetry
pattern write {prefix}/devices/%u/cert_ack
pattern read {prefix}/devices/%u/cert_update
"""


def _matching_server_cert(path: Path, ca: CertificateAuthority, hosts: list[str]) -> bool:
    """Whether the server certificate at ``path`` is the CA's, unexpired, for exactly ``hosts``."""
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
        certificate.verify_directly_issued_by(ca.certificate)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    wanted = {str(getattr(n, "value", n)) for n in _check_hosts(hosts)}
    have = {str(n.value) for n in names}
    return have == wanted and certificate.not_valid_after_utc > datetime.now(UTC) + RENEWAL_WINDOW


def write_broker_config(
    ca: CertificateAuthority,
    out: Path,
    *,
    prefix: str,
    hosts: Sequence[str],
    port: int = 8883,
    bind: str = "0.0.0.0",  # noqa: S104 - the broker listens for devices on every interface
    now: datetime | None = None,
) -> BrokerFiles:
    """The Mosquitto TLS listener snippet, its ACL, the broker's server certificate (kept when
    it already matches ``hosts``) and the platform's client certificate, under ``out``. The CRL
    must exist (refresh_crl) before the broker starts: Mosquitto refuses a missing crlfile."""
    now = now or datetime.now(UTC)
    if not 0 < port < 65536:
        raise PkiError(f"bad port {port}: 1 to 65535")
    hosts = list(dict.fromkeys(h.strip() for h in hosts if h.strip()))
    _check_hosts(hosts)
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    server_cert, server_key = out / "server.crt", out / "server.key"
    reused = server_key.exists() and _matching_server_cert(server_cert, ca, hosts)
    if not reused:
        key = generate_key()
        write_file(server_key, private_key_pem(key), private=True)
        certificate = issue_server_certificate(ca, hosts, key, now=now)
        write_file(server_cert, certificate.public_bytes(serialization.Encoding.PEM))
    platform_cert, platform_key = out / "platform.crt", out / "platform.key"
    if not (platform_key.exists() and platform_cert.exists()):
        key = generate_key()
        write_file(platform_key, private_key_pem(key), private=True)
        write_file(
            platform_cert,
            issue_platform_certificate(ca, key, now=now).public_bytes(serialization.Encoding.PEM),
        )
    acl = out / "acl"
    write_file(acl, MOSQUITTO_ACL.format(prefix=prefix, platform=PLATFORM_COMMON_NAME).encode())
    config = out / "mosquitto-tls.conf"
    if filestore.is_url(ca.directory):
        # Mosquitto reads local files: copies of the public ones, refreshed by running this again
        # after each CRL refresh (docs/operations.md, "Storage roots"); the keys stay here
        ca_path, crl_path = out / CA_CERT_FILE, out / CRL_FILE
        write_file(ca_path, read_public(ca.cert_path))
        write_file(crl_path, read_public(ca.crl_path))
    else:
        ca_path, crl_path = Path(ca.cert_path).resolve(), Path(ca.crl_path).resolve()
    write_file(
        config,
        MOSQUITTO_TLS.format(
            port=port,
            bind=bind,
            ca=ca_path,
            server_cert=server_cert,
            server_key=server_key,
            crl=crl_path,
            acl=acl,
        ).encode(),
    )
    return BrokerFiles(
        config, acl, server_cert, server_key, platform_cert, platform_key, ca_path, crl_path, reused
    )


# --- the daily expiry sweep ----------------------------------------------------------------

CLASSES = ("ok", "renewal_due", "expired", "revoked", "pending", "superseded")


@dataclass(frozen=True)
class Sweep:
    sweep_id: int
    swept_at: datetime
    counts: dict[str, int]
    devices_without_certificate: int
    first_expiry: datetime | None
    crl: CrlState


def sweep(
    conn: psycopg.Connection, ca: CertificateAuthority, *, now: datetime | None = None
) -> Sweep:
    """Classify every certificate, refresh the CRL and record the sweep."""
    now = now or datetime.now(UTC)
    rows = conn.execute(
        "SELECT CASE WHEN status <> 'active' THEN status"
        "            WHEN not_after <= %(now)s THEN 'expired'"
        "            WHEN not_after <= %(now)s + %(window)s THEN 'renewal_due'"
        "            ELSE 'ok' END, count(*)"
        "  FROM device_certificates GROUP BY 1",
        {"now": now, "window": RENEWAL_WINDOW},
    ).fetchall()
    counts = dict.fromkeys(CLASSES, 0) | dict(rows)
    without, first = conn.execute(
        "SELECT count(*) FILTER (WHERE c.device_id IS NULL), min(c.not_after)"
        "  FROM devices d LEFT JOIN device_certificates c"
        "    ON c.device_id = d.device_id AND c.status = 'active'"
        " WHERE d.status = 'active'"
    ).fetchone()
    crl = refresh_crl(conn, ca, now=now)
    with conn.transaction():
        (sweep_id,) = conn.execute(
            "INSERT INTO certificate_sweeps (swept_at, ok, renewal_due, expired, revoked, pending,"
            " superseded, devices_without_certificate, first_expiry, crl_number)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING sweep_id",
            (now, *(counts[c] for c in CLASSES), without, first, crl.number),
        ).fetchone()
    return Sweep(sweep_id, now, counts, without, first, crl)


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    metadata: dict[str, Any]


def check_one_active_certificate(conn: psycopg.Connection) -> CheckOutcome:
    """Every active device has exactly one active certificate (the partial unique index makes
    more than one impossible; this finds the ones with none)."""
    rows = conn.execute(
        "SELECT d.mac::text, count(c.certificate_id) FROM devices d"
        "  LEFT JOIN device_certificates c ON c.device_id = d.device_id AND c.status = 'active'"
        " WHERE d.status = 'active' GROUP BY d.device_id, d.mac"
        " HAVING count(c.certificate_id) <> 1 ORDER BY d.mac"
    ).fetchall()
    return CheckOutcome(
        not rows,
        {"devices_failing": len(rows), "macs": [f"{mac} ({n})" for mac, n in rows[:20]]},
    )


def check_no_expired(conn: psycopg.Connection, now: datetime | None = None) -> CheckOutcome:
    rows = conn.execute(
        "SELECT d.mac::text, c.not_after FROM devices d"
        "  JOIN device_certificates c ON c.device_id = d.device_id AND c.status = 'active'"
        " WHERE d.status = 'active' AND c.not_after <= %s ORDER BY c.not_after",
        (now or datetime.now(UTC),),
    ).fetchall()
    return CheckOutcome(
        not rows,
        {"expired": len(rows), "macs": [f"{mac} ({at:%Y-%m-%d})" for mac, at in rows[:20]]},
    )


def check_crl(
    conn: psycopg.Connection, ca: CertificateAuthority, now: datetime | None = None
) -> CheckOutcome:
    """The CRL file is the CA's, still valid, and lists every revoked serial."""
    now = now or datetime.now(UTC)
    expected = {serial for serial, _, _ in revoked_serials(conn)}
    try:
        contents = read_crl(ca.crl_path, ca)
    except PkiError as exc:
        return CheckOutcome(False, {"error": str(exc), "revoked_in_database": len(expected)})
    missing = sorted(expected - contents.serials)
    current = contents.next_update is not None and contents.next_update > now
    return CheckOutcome(
        not missing and current,
        {
            "revoked_in_database": len(expected),
            "listed": len(contents.serials),
            "missing": [serial_hex(s) for s in missing[:20]],
            "crl_number": contents.number,
            "next_update": contents.next_update.isoformat() if contents.next_update else None,
        },
    )
