"""When certificate work runs: the expiry sweep every night, the renewal batch after it (02:00
in Sao Paulo, as the seeds' OTA protocol has it), and ``ota_ack_sensor`` every minute, which
lands the devices' acknowledgements and completes, fails or times out the renewals."""

from contextlib import nullcontext

import dagster as dg

from assets.certificates import (
    CertificatesResource,
    certificate_expiry_sweep,
    certificate_renewal_batch,
)
from iiot_orchestration import ota, ota_acks, pki
from iiot_orchestration.mqtt import MqttError
from iiot_orchestration.resources import PostgresResource

SWEEP_CRON = "30 4 * * *"  # 01:30 in Sao Paulo
RENEWAL_CRON = "0 5 * * *"  # 02:00 in Sao Paulo, after the sweep

certificate_sweep_job = dg.define_asset_job(
    "certificate_sweep_job",
    selection=dg.AssetSelection.assets(certificate_expiry_sweep),
    description="Classify every device certificate, refresh the CRL, run the certificate checks.",
)

certificate_renewal_job = dg.define_asset_job(
    "certificate_renewal_job",
    selection=dg.AssetSelection.assets(certificate_renewal_batch),
    description="Issue and publish today's over-the-air certificate renewals.",
)

certificate_sweep_schedule = dg.ScheduleDefinition(
    name="certificate_sweep_schedule",
    job=certificate_sweep_job,
    cron_schedule=SWEEP_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="The certificate expiry sweep and a fresh CRL every night at 04:30 UTC.",
)

certificate_renewal_schedule = dg.ScheduleDefinition(
    name="certificate_renewal_schedule",
    job=certificate_renewal_job,
    cron_schedule=RENEWAL_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="The daily OTA renewal batch at 05:00 UTC (02:00 in Sao Paulo).",
)


def complete_renewals(postgres: PostgresResource, certificates: CertificatesResource) -> str:
    """Land the waiting acks, apply them, time out silent attempts, clear finished retained
    updates, and refresh the CRL when a pending certificate was revoked; a one-line summary."""
    options = certificates.mqtt_options()
    prefix = certificates.prefix()
    notes = []
    landed = 0
    with postgres.get_connection() as conn:
        (busy,) = conn.execute(ota.IN_FLIGHT).fetchone()
    if not busy:
        # nothing to complete or clear: no broker connection (an ack sent meanwhile, before the
        # consumer's session exists, is repeated by the agent until its retained update clears)
        return "no renewal in flight"
    if options is None:
        notes.append("IIOT_MQTT_URL is not set: no acks collected, no retained update cleared")
    else:
        try:
            landed = ota_acks.collect_acks(
                postgres.database_url,
                options,
                prefix,
                role=postgres.role,
                idle_s=certificates.ack_idle_seconds,
            )
        except MqttError as exc:
            notes.append(f"acks not collected: {exc}")
    publisher = ota.mqtt_publisher(options) if options is not None else nullcontext(None)
    with postgres.get_connection() as conn, publisher as connected:
        completion = ota.complete_renewals(conn, connected, certificates.policy(), prefix=prefix)
        if completion.revoked:
            try:
                crl = pki.refresh_crl(conn, certificates.ca())
                notes.append(f"CRL {crl.number} written")
            except pki.PkiError as exc:
                notes.append(f"CRL not refreshed: {exc}")
    return "; ".join([f"{landed} acks landed, {completion.describe()}", *notes])


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lands the devices' certificate acks (<prefix>/devices/+/cert_ack) and completes "
    "the renewals: success activates the new certificate, supersedes the old one and clears the "
    "retained cert_update; failure or no ack within IIOT_CERT_ACK_TIMEOUT_HOURS revokes the new "
    "certificate, keeps the old one and retries in a later batch with backoff.",
)
def ota_ack_sensor(
    context: dg.SensorEvaluationContext,
    postgres: PostgresResource,
    certificates: CertificatesResource,
) -> dg.SkipReason:
    summary = complete_renewals(postgres, certificates)
    context.log.info(summary)
    return dg.SkipReason(summary)
