"""CSV provisioning (validation, quota, audit, per-row report) vs a bare INSERT of the same rows.

The baseline writes the same devices and metric rows with executemany and nothing else, on a
fresh database in the same run; the ratio says what validation and bookkeeping cost.
"""

import psycopg

from benchmarks.common import scratch_database, timed
from iiot_orchestration import registry

DEVICES = 2_000
RUNS = 3


def make_csv(count: int) -> bytes:
    lines = ["mac,meter_kind,name,metrics"]
    for i in range(count):
        mac = f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
        lines.append(f"{mac},energy,Meter {i},energy_kwh|power_w")
    return ("\n".join(lines) + "\n").encode()


def provision(url: str, data: bytes) -> None:
    with psycopg.connect(url) as conn:
        registry.create_tenant(conn, slug="bench", name="Bench", plan="enterprise", timezone="UTC")
        parsed = registry.parse_device_csv(data)
        results = registry.provision_devices(conn, "bench", parsed.requests)
    assert sum(r.status == "provisioned" for r in results) == DEVICES


def bare_insert(url: str, data: bytes) -> None:
    rows = [line.split(",") for line in data.decode().splitlines()[1:]]
    with psycopg.connect(url) as conn:
        tenant_id = conn.execute(
            "INSERT INTO tenants (slug, name, plan_id) VALUES ('bench', 'Bench', 'enterprise')"
            " RETURNING tenant_id"
        ).fetchone()[0]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO devices (tenant_id, mac, name, meter_kind) VALUES (%s, %s, %s, %s)",
                [(tenant_id, mac, name, kind) for mac, kind, name, _ in rows],
            )
            ids = dict(conn.execute("SELECT mac::text, device_id FROM devices").fetchall())
            cur.executemany(
                "INSERT INTO device_metrics (device_id, metric, tenant_id) VALUES (%s, %s, %s)",
                [
                    (ids[mac], metric, tenant_id)
                    for mac, _, _, metrics in rows
                    for metric in metrics.split("|")
                ],
            )


def on_fresh_database(func, data: bytes) -> float:
    with scratch_database() as url:
        return timed(func, url, data)[0]


def main() -> None:
    data = make_csv(DEVICES)
    baseline = min(on_fresh_database(bare_insert, data) for _ in range(RUNS))
    measured = min(on_fresh_database(provision, data) for _ in range(RUNS))
    rows = [("bare executemany INSERT (baseline)", baseline), ("iiot CSV provisioning", measured)]
    print(f"{'case':<36}{'seconds':>10}{'devices/s':>12}{'ratio':>8}")
    for case, seconds in rows:
        print(f"{case:<36}{seconds:>10.3f}{DEVICES / seconds:>12.0f}{seconds / baseline:>8.2f}")
    print(
        f"(best of {RUNS}, {DEVICES} devices, each run on a fresh migrated database, "
        "migration time excluded)"
    )
