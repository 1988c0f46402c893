"""Device certificates: the daily expiry sweep, which also keeps the CRL current, and the daily
over-the-air renewal batch, with the checks ops watch (docs/certificates.md)."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg

from iiot_orchestration import filestore, ota, ota_acks, pki
from iiot_orchestration.mqtt import MqttError, MqttOptions
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.retries import retry_transient
from iiot_orchestration.settings import Settings, load_settings

ONE_ACTIVE_CERTIFICATE = "active_devices_have_one_active_certificate"
NO_EXPIRED_CERTIFICATE = "no_active_device_has_an_expired_certificate"
CRL_LISTS_REVOKED = "crl_lists_every_revoked_serial"
BATCH_WITHIN_LIMIT = "renewals_within_daily_limit"
ONE_RENEWAL_A_DAY = "at_most_one_renewal_per_device_a_day"

CERTIFICATE_ASSET: dict[str, Any] = {
    "group_name": "certificates",
    "kinds": {"postgres"},
    "owners": ["team:platform"],
    "code_version": "1",
    "freshness_policy": dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=26), warn_window=timedelta(hours=25)
    ),
}


class CertificatesResource(dg.ConfigurableResource):
    """Where the CA is, how to reach the broker, and the renewal policy. Unset fields come from
    IIOT_PKI_DIR, IIOT_MQTT_* (the platform's client certificate), IIOT_TOPIC_PREFIX and
    IIOT_CERT_*."""

    pki_dir: str | None = None
    mqtt_url: str | None = None
    mqtt_protocol: str | None = None
    mqtt_ca_file: str | None = None
    mqtt_cert_file: str | None = None
    mqtt_key_file: str | None = None
    topic_prefix: str | None = None
    batch_size: int | None = None
    offline_days: int | None = None
    ack_timeout_hours: int | None = None
    retry_backoff_hours: int | None = None
    ack_idle_seconds: float = 1.0

    def settings(self) -> Settings:
        return load_settings()

    def ca(self) -> pki.CertificateAuthority:
        settings = self.settings()
        directory = self.pki_dir or settings.pki_dir
        if not filestore.is_url(directory):
            directory = Path(directory)
        return pki.load_ca(directory, settings.pki_ca_key_file)

    def prefix(self) -> str:
        return self.topic_prefix or self.settings().topic_prefix

    def policy(self) -> ota.RenewalPolicy:
        policy = ota.RenewalPolicy.from_settings(self.settings())
        return ota.RenewalPolicy(
            batch_size=self.batch_size or policy.batch_size,
            offline=timedelta(days=self.offline_days) if self.offline_days else policy.offline,
            ack_timeout=(
                timedelta(hours=self.ack_timeout_hours)
                if self.ack_timeout_hours
                else policy.ack_timeout
            ),
            backoff=(
                timedelta(hours=self.retry_backoff_hours)
                if self.retry_backoff_hours
                else policy.backoff
            ),
        )

    def mqtt_options(self) -> MqttOptions | None:
        """The broker, or None when none is configured."""
        if self.mqtt_url:
            return MqttOptions(
                self.mqtt_url,
                self.mqtt_protocol or "auto",
                Path(self.mqtt_ca_file) if self.mqtt_ca_file else None,
                Path(self.mqtt_cert_file) if self.mqtt_cert_file else None,
                Path(self.mqtt_key_file) if self.mqtt_key_file else None,
            )
        settings = self.settings()
        return MqttOptions.from_settings(settings) if settings.mqtt_url else None


def _ca(certificates: CertificatesResource) -> pki.CertificateAuthority:
    try:
        return certificates.ca()
    except pki.PkiError as exc:
        raise dg.Failure(description=str(exc)) from exc


@dg.asset(**CERTIFICATE_ASSET)
@retry_transient
def certificate_expiry_sweep(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    certificates: CertificatesResource,
) -> dg.MaterializeResult:
    """Every device certificate classified (ok, renewal due within 730 days, expired, revoked,
    plus pending and superseded ones), the CRL rewritten from every revoked serial and valid for
    another week, and the sweep recorded in certificate_sweeps."""
    ca = _ca(certificates)
    with postgres.get_connection() as conn:
        result = pki.sweep(conn, ca)
    counts = result.counts
    context.log.info(
        f"certificates: {counts['ok']} ok, {counts['renewal_due']} due, {counts['expired']} "
        f"expired, {counts['revoked']} revoked; CRL {result.crl.number}"
    )
    return dg.MaterializeResult(
        metadata={
            **counts,
            "devices_without_certificate": result.devices_without_certificate,
            "first_expiry": result.first_expiry.isoformat() if result.first_expiry else "none",
            "crl_number": result.crl.number,
            "crl_revoked": result.crl.revoked,
            "crl_next_update": result.crl.next_update.isoformat(),
            "crl_path": str(result.crl.path),
            "ca_not_after": ca.not_after.isoformat(),
        }
    )


def _result(outcome: pki.CheckOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=outcome.passed,
        metadata={
            key: dg.MetadataValue.json(value) if isinstance(value, list) else value
            for key, value in outcome.metadata.items()
            if value is not None
        },
    )


@dg.asset_check(
    asset=certificate_expiry_sweep,
    name=ONE_ACTIVE_CERTIFICATE,
    description="Every active device has exactly one active certificate (lists those without).",
)
def active_devices_have_one_active_certificate(postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.get_connection() as conn:
        return _result(pki.check_one_active_certificate(conn))


@dg.asset_check(
    asset=certificate_expiry_sweep,
    name=NO_EXPIRED_CERTIFICATE,
    description="No active device's active certificate has expired (the broker refuses it).",
)
def no_active_device_has_an_expired_certificate(
    postgres: PostgresResource,
) -> dg.AssetCheckResult:
    with postgres.get_connection() as conn:
        return _result(pki.check_no_expired(conn))


@dg.asset_check(
    asset=certificate_expiry_sweep,
    name=CRL_LISTS_REVOKED,
    description="The CRL file is signed by the CA, has not passed its next update, and lists "
    "every revoked serial in device_certificates.",
)
def crl_lists_every_revoked_serial(
    postgres: PostgresResource, certificates: CertificatesResource
) -> dg.AssetCheckResult:
    try:
        ca = certificates.ca()
    except pki.PkiError as exc:
        return dg.AssetCheckResult(passed=False, metadata={"error": str(exc)})
    with postgres.get_connection() as conn:
        return _result(pki.check_crl(conn, ca))


@dg.asset(
    **CERTIFICATE_ASSET,
    deps=[certificate_expiry_sweep],
    check_specs=[
        dg.AssetCheckSpec(
            BATCH_WITHIN_LIMIT,
            asset="certificate_renewal_batch",
            description="Today's renewals number at most IIOT_CERT_RENEWAL_BATCH_SIZE.",
        ),
        dg.AssetCheckSpec(
            ONE_RENEWAL_A_DAY,
            asset="certificate_renewal_batch",
            description="No device got more than one new certificate today.",
        ),
    ],
)
@retry_transient
def certificate_renewal_batch(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    certificates: CertificatesResource,
) -> dg.MaterializeResult:
    """Today's over-the-air renewals: up to IIOT_CERT_RENEWAL_BATCH_SIZE devices whose
    certificate expires within 730 days (soonest first, skipping devices offline for
    IIOT_CERT_OFFLINE_DAYS or backing off after a failure) get a new certificate, published
    retained on <prefix>/devices/<mac>/cert_update; ota_ack_sensor completes them."""
    ca = _ca(certificates)
    options = certificates.mqtt_options()
    if options is None:
        raise dg.Failure(description="IIOT_MQTT_URL is not set: the batch cannot publish")
    policy = certificates.policy()
    now = datetime.now(UTC)
    try:
        # the ack consumer's persistent session must exist before any device can answer (this
        # also lands acks waiting there); an unreachable broker stops the batch before it issues
        ota_acks.collect_acks(
            postgres.database_url,
            options,
            certificates.prefix(),
            role=postgres.role,
            idle_s=min(certificates.ack_idle_seconds, 0.5),
        )
    except MqttError as exc:
        raise dg.Failure(description=f"the broker is not usable, nothing issued: {exc}") from exc
    with postgres.get_connection() as conn, ota.mqtt_publisher(options) as publisher:
        result = ota.run_batch(conn, ca, publisher, policy, prefix=certificates.prefix(), now=now)
        if result.failed:
            pki.refresh_crl(conn, ca)
        today, most = conn.execute(
            "SELECT coalesce(sum(n), 0), coalesce(max(n), 0) FROM ("
            " SELECT count(*) AS n FROM certificate_renewals WHERE batch_day = %s"
            " GROUP BY device_id) per_device",
            (result.day,),
        ).fetchone()
    context.log.info(
        f"renewal batch {result.day}: {len(result.published)} published, "
        f"{len(result.failed)} failed, {result.earlier_today} earlier today"
    )
    if result.failed:
        first = next(iter(result.failed.items()))
        raise dg.Failure(
            description=f"{len(result.failed)} of {result.issued} certificate updates could not "
            f"be published (first: {first[0]}: {first[1]}); the devices keep their certificates "
            "and a later batch retries",
            metadata={"failed": dg.MetadataValue.json(result.failed)},
        )
    return dg.MaterializeResult(
        metadata={
            "day": str(result.day),
            "limit": policy.batch_size,
            "earlier_today": result.earlier_today,
            "published": len(result.published),
            "devices": dg.MetadataValue.json(result.published),
            "renewal_ids": dg.MetadataValue.json(result.renewal_ids),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=BATCH_WITHIN_LIMIT,
                passed=int(today) <= policy.batch_size,
                metadata={"renewals_today": int(today), "limit": policy.batch_size},
            ),
            dg.AssetCheckResult(
                check_name=ONE_RENEWAL_A_DAY,
                passed=int(most) <= 1,
                metadata={"most_for_one_device": int(most)},
            ),
        ],
    )
