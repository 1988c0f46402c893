"""The daily certificate work over a large fleet, against a bare scan of the same table.

100,000 devices with an active certificate each (expiries spread over ten years, one in twenty
revoked and replaced, so 105,000 certificates and 5,000 CRL entries) in a scratch database, then,
in the same run:

- bare: one `GROUP BY status` over device_certificates (the floor for any classification);
- the expiry sweep (classification, devices without a certificate, the CRL signed and written,
  the sweep recorded), as the asset runs it;
- the renewal batch's selection of the 10 devices due soonest (the part of the batch that
  grows with the fleet; issuing 10 certificates does not).
"""

import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from benchmarks.common import scratch_database
from iiot_orchestration import ota, pki, registry

DEVICES = int(os.environ.get("IIOT_BENCH_CERT_DEVICES", "100000"))
REVOKED_EVERY = 20
PEM = "-----BEGIN CERTIFICATE-----\nbenchmark\n-----END CERTIFICATE-----\n"


def load(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        registry.create_tenant(conn, slug="bench", name="Bench", plan="enterprise", timezone="UTC")
        conn.execute(
            "INSERT INTO devices (tenant_id, mac, name, meter_kind, last_seen)"
            " SELECT 1, ('02:00:00:' || lpad(to_hex(i >> 16), 2, '0') || ':'"
            "        || lpad(to_hex((i >> 8) & 255), 2, '0') || ':'"
            "        || lpad(to_hex(i & 255), 2, '0'))::macaddr, 'meter ' || i, 'energy', now()"
            "   FROM generate_series(0, %s - 1) i",
            (DEVICES,),
        )
        # revoked certificates first (one device in REVOKED_EVERY), then one active per device
        conn.execute(
            "INSERT INTO device_certificates (tenant_id, device_id, serial, subject_cn,"
            " fingerprint_sha256, not_before, not_after, status, certificate_pem, revoked_at,"
            " revocation_code)"
            " SELECT 1, device_id, 1000000000 + device_id, mac::text,"
            "        md5('r' || device_id) || md5('s' || device_id), now() - interval '1 year',"
            "        now() + interval '9 years', 'revoked', %s, now(), 'keyCompromise'"
            "   FROM devices WHERE device_id %% %s = 0",
            (PEM, REVOKED_EVERY),
        )
        conn.execute(
            "INSERT INTO device_certificates (tenant_id, device_id, serial, subject_cn,"
            " fingerprint_sha256, not_before, not_after, status, certificate_pem)"
            " SELECT 1, device_id, device_id, mac::text,"
            "        md5('a' || device_id) || md5('b' || device_id), now() - interval '1 year',"
            "        now() + make_interval(days => (device_id * 7919) %% 3650), 'active', %s"
            "   FROM devices",
            (PEM,),
        )
        conn.execute("VACUUM ANALYZE devices, device_certificates")
        return conn.execute("SELECT count(*) FROM device_certificates").fetchone()[0]


def best(runs: int, func) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    with scratch_database() as url, tempfile.TemporaryDirectory() as directory:
        print(f"loading {DEVICES:,} devices with certificates...", flush=True)
        rows = load(url)
        ca, _ = pki.init_ca(Path(directory))
        policy = ota.RenewalPolicy()
        now = datetime.now(UTC)
        with psycopg.connect(url, autocommit=True) as conn:

            def bare() -> None:
                conn.execute(
                    "SELECT status, count(*) FROM device_certificates GROUP BY status"
                ).fetchall()

            def sweep() -> None:
                pki.sweep(conn, ca, now=now)

            def select() -> None:
                found = ota.select_due(conn, policy, now=now + timedelta(days=1), limit=10)
                assert len(found) == 10

            bare()  # warm the cache
            floor = best(3, bare)
            swept = best(3, sweep)
            selected = best(5, select)
    cases = [
        (f"bare GROUP BY status, {rows:,} certificates (baseline)", floor),
        ("expiry sweep (classify, CRL signed and written, record)", swept),
        ("renewal batch selection: the 10 due soonest", selected),
    ]
    print(f"{'case':<58}{'seconds':>9}{'ratio':>8}")
    for name, seconds in cases:
        print(f"{name:<58}{seconds:>9.3f}{seconds / floor:>8.2f}")


if __name__ == "__main__":
    main()
