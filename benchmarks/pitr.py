"""The point-in-time recovery drill's RTO against a bare `pgbackrest restore` of the same backup
to the same WAL position, in the same run.

A cluster of its own (initdb into a directory under /tmp, run as the postgres OS user when this
runs as root) archives into a pgBackRest repository set up by `pitr.setup`, as
`iiot backup pitr setup --apply` does. Its database gets the logical backup benchmark's data
(1 million readings by default, IIOT_BENCH_PITR_READINGS; 50 tenants, 500 devices, rollups), a
full pgBackRest backup, then a tenth as many rows again (WAL that every restore replays). Then,
three times each (IIOT_BENCH_PITR_ROUNDS), alternating:

- the drill (`pitr.run_drill`): a snapshot of the database and its WAL position, that WAL
  archived, the backup restored into a scratch cluster to exactly that position, started,
  promoted and verified (row counts of every table, fingerprints, smoke queries). Its RTO is
  restore + recovery + verification; taking the snapshot and archiving come before, as they
  would before any restore.
- bare: `pgbackrest restore` of the same backup to the same position, the few settings a
  restored copy needs (port, socket, archiving off), `pg_ctl start` and the wait until it is
  promoted: the floor of any point-in-time restore.

Target: the drill's RTO at most 1.2 x the bare restore (best of each).
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

import psycopg

from benchmarks.backup import load
from iiot_orchestration import migrate, pitr
from iiot_orchestration.services import free_port
from iiot_orchestration.settings import load_settings

READINGS = int(os.environ.get("IIOT_BENCH_PITR_READINGS", "1000000"))
ROUNDS = int(os.environ.get("IIOT_BENCH_PITR_ROUNDS", "3"))
TARGETS = {"rpo_hours": (("pro", 26),), "rto_minutes": (("pro", 240),)}


def _bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found or shutil.which("pgbackrest") is None:
        raise SystemExit("needs initdb (postgresql-15) and pgbackrest (the pgbackrest package)")
    return found[-1].parent


def bare_restore(
    config: pitr.PitrConfig, root: Path, label: str, lsn: str, bindir: Path
) -> tuple[float, float]:
    """(seconds of pgbackrest restore, seconds of start to promotion) into ``root``."""
    data = root / "bare"
    pitr.make_dir(data, config.os_user, 0o700, adopt=True)
    socket_dir = pitr.private_socket_dir(config.os_user)
    cluster = pitr.LocalCluster(
        data, free_port(), socket_dir, bindir, config.os_user, root / "bare.log"
    )
    try:
        started = time.perf_counter()
        pitr.pgbackrest(
            config,
            "restore",
            f"--pg1-path={data}",
            f"--set={label}",
            "--type=lsn",
            f"--target={lsn}",
            "--target-exclusive",
            "--target-action=promote",
            "--archive-mode=off",
        )
        files = time.perf_counter() - started
        # the settings the drill's scratch cluster runs with, the source's conf aside
        (data / "postgresql.conf").write_text("")
        (data / "pg_hba.conf").write_text("local all all trust\n")
        with (data / "postgresql.auto.conf").open("a") as auto:
            auto.write(
                f"port = {cluster.port}\nlisten_addresses = ''\n"
                f"unix_socket_directories = '{socket_dir}'\nhot_standby = off\n"
                "autovacuum = off\n"
            )
        started = time.perf_counter()
        cluster.start()
        cluster.wait_ready("postgres")
        return files, time.perf_counter() - started
    finally:
        cluster.stop("immediate")
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(socket_dir, ignore_errors=True)


def main() -> None:
    bindir = _bindir()
    os_user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    home = Path(tempfile.mkdtemp(prefix="iiot-bench-pitr-"))
    pitr.make_dir(home, os_user, 0o755, adopt=True)
    port = free_port()
    source = pitr.init_cluster(
        home / "source", bindir=bindir, os_user=os_user, port=port, socket_dir=home
    )
    settings = load_settings(
        {
            "IIOT_DATA_DIR": str(home / "var"),
            "IIOT_PITR_STANZA": "bench",
            "IIOT_PITR_REPO": str(home / "repo"),
            "IIOT_PITR_CONFIG": str(home / "pgbackrest" / "pgbackrest.conf"),
            "IIOT_PITR_SCRATCH_DIR": str(home / "scratch"),
            "IIOT_PITR_OS_USER": os_user,
            "IIOT_PITR_PG_BINDIR": str(bindir),
        }
    )
    config = pitr.require_config(settings)
    url = f"postgresql://postgres@127.0.0.1:{port}/iiot_bench"
    try:
        source.start()
        with psycopg.connect(url.replace("/iiot_bench", "/postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE iiot_bench")
        migrate.migrate(url, "auto", echo=lambda _: None)
        pitr.setup(url, config, apply=True)
        source.stop()
        source.start()
        pitr.setup(url, config)
        print(f"loading {READINGS:,} readings...", flush=True)
        rows = load(url, READINGS)
        full = pitr.take_backup(url, config, "full")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_wal (n integer, payload text)")
            conn.execute(
                "INSERT INTO bench_wal SELECT n, repeat(md5(n::text), 3)"
                " FROM generate_series(1, %s) n",
                (READINGS // 10,),
            )
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        drills, bares = [], []
        for _ in range(ROUNDS):
            drill = pitr.run_drill(url, config, **TARGETS)
            assert drill.passed, drill.result.error
            drills.append(drill)
            bares.append(
                bare_restore(config, home, drill.result.backup_id, drill.target_lsn, bindir)
            )
    finally:
        source.stop("immediate")
        shutil.rmtree(home, ignore_errors=True)
    best = min(drills, key=lambda d: d.result.rto)
    r = best.result
    files, recovery = min(bares, key=sum)
    bare = files + recovery
    rto = r.rto.total_seconds()
    restore = r.restore_s - best.recovery_s
    print(
        f"{rows:,} readings + {READINGS // 10:,} rows after the backup, database "
        f"{size / 2**20:,.0f} MiB; full backup {full.backup.size / 2**20:,.0f} MiB "
        f"({full.backup.repo_size / 2**20:,.0f} MiB lz4) in {full.seconds:.1f} s; "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'case':<56}{'seconds':>9}{'ratio':>8}")
    print(f"{'bare: pgbackrest restore + start + WAL replay (baseline)':<56}{bare:>9.2f}{1:>8.2f}")
    print(f"{'  of which pgbackrest restore':<56}{files:>9.2f}{files / bare:>8.2f}")
    print(f"{'  of which start, replay, promotion':<56}{recovery:>9.2f}{recovery / bare:>8.2f}")
    print(f"{'drill RTO: restore + recovery + verification':<56}{rto:>9.2f}{rto / bare:>8.2f}")
    for label, seconds in (
        ("  of which pgbackrest restore", restore),
        ("  of which start, replay, promotion", best.recovery_s),
        ("  of which verification", r.verify_s),
    ):
        print(f"{label:<56}{seconds:>9.2f}{seconds / bare:>8.2f}")
    print("rounds (drill restore / recovery / verification = RTO; bare restore / recovery):")
    for n, (d, (f, rec)) in enumerate(zip(drills, bares, strict=True), 1):
        dr = d.result
        print(
            f"  {n}: drill {dr.restore_s - d.recovery_s:.2f} / {d.recovery_s:.2f} / "
            f"{dr.verify_s:.2f} = {dr.rto.total_seconds():.2f} s ({d.attempts} attempt(s)); "
            f"bare {f:.2f} / {rec:.2f} = {f + rec:.2f} s"
        )
    rpo = r.rpo.total_seconds() if r.rpo else float("nan")
    print(f"RPO measured by the best drill: {rpo:.1f} s")
    print(f"target: ratio <= 1.20 -> {'met' if rto / bare <= 1.20 else 'NOT met'}")
