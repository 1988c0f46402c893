"""The Dagster UI tells the platform's story: every asset has a group from the documented set,
owners, a description, kinds and a code version, and the periodic ones a freshness policy."""

from iiot_orchestration.definitions import defs

GROUPS = {
    "ingest",
    "rollups",
    "marts",
    "billing",
    "retention",
    "certificates",
    "backups",
    "reports",
    "alerts",
}


def test_every_asset_is_described_grouped_owned_and_versioned():
    graph = defs.resolve_asset_graph()
    problems = []
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if not node.is_materializable:
            continue  # the registry tables dbt reads as sources (external)
        name = key.to_user_string()
        if node.group_name not in GROUPS:
            problems.append(f"{name}: group {node.group_name!r}")
        if not node.owners:
            problems.append(f"{name}: no owners")
        if not (node.description or "").strip():
            problems.append(f"{name}: no description")
        if not node.kinds:
            problems.append(f"{name}: no kinds")
        if not node.code_version:
            problems.append(f"{name}: no code version")
        if node.freshness_policy is None:
            problems.append(f"{name}: no freshness policy")
    assert problems == []


def test_every_job_schedule_and_sensor_says_what_it_does():
    for job in defs.jobs or []:
        assert job.description, job.name
    for schedule in defs.schedules or []:
        assert schedule.description, schedule.name
    for sensor in defs.sensors or []:
        assert sensor.description, sensor.name
