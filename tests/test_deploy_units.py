"""The deployment files run only what exists, and the units and the containers run the same.

ops/systemd (units, their shared drop-in, the example environment) and ops/container (image,
compose file): every command they run is a command of the `iiot` CLI (or of Dagster's) with
options it accepts, found by walking the click commands; every IIOT_* variable they name is a
setting (`iiot_orchestration.settings.VARIABLES`) or one of the unit variables documented in
docs/operations.md; `systemd-analyze verify` accepts the units (on a copy whose paths point at
this checkout's virtualenv, since verify wants the binaries to exist). No container engine is
needed: the image and the compose file are read, not built.
"""

from __future__ import annotations

import http.server
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml

from iiot_orchestration.settings import VARIABLES

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "ops" / "systemd"
CONTAINER = ROOT / "ops" / "container"
COMPOSE = CONTAINER / "compose.yaml"
CONTAINERFILE = CONTAINER / "Containerfile"
OPERATIONS = ROOT / "docs" / "operations.md"
DROP_IN = SYSTEMD / "iiot-.service.d" / "10-common.conf"
ENV_EXAMPLE = SYSTEMD / "iiot.env.example"
CELERY_WORKER = SYSTEMD / "iiot-dagster-celery-worker@.service"
# where the units and the image install the project, and where it is here
VENV_BIN = "/opt/iiot/venv/bin/"
APP = "/opt/iiot/app/"
HERE_BIN = Path(sys.executable).parent
# the instances a template unit is checked as: ingest slots, Celery worker names
INSTANCES = {"iiot-ingest@.service": ("0", "1"), "iiot-dagster-celery-worker@.service": ("1", "b")}
VARIABLE = re.compile(r"\bIIOT_[A-Z0-9_]*[A-Z0-9]\b")
EXEC_KEYS = ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop")
# what the platform runs, each once under systemd and in compose.yaml
PROGRAMS = {
    ("iiot", "db", "migrate"),
    ("dagster", "instance", "migrate"),
    ("iiot", "ingest"),
    ("dagster-webserver",),
    ("dagster-daemon", "run"),
    ("iiot", "dagster-metrics"),
    ("iiot", "alert-webhook"),
    ("iiot", "api"),
    ("dagster-celery", "worker", "start"),
}


# --- the commands: click's own parsing ----------------------------------------------------------


def click_commands() -> dict[str, click.Command]:
    from dagster._cli import cli as dagster_cli
    from dagster._daemon.cli import cli as daemon_cli
    from dagster_celery.cli import main as celery_cli
    from dagster_webserver.cli import dagster_webserver

    from iiot_orchestration.cli import main

    return {
        "iiot": main,
        "dagster": dagster_cli,
        "dagster-daemon": daemon_cli,
        "dagster-webserver": dagster_webserver,
        "dagster-celery": celery_cli,
    }


def here(argument: str) -> str:
    """A path of the installation as it is in this checkout (click checks that files exist)."""
    if argument.startswith(VENV_BIN):
        return str(HERE_BIN / argument.removeprefix(VENV_BIN))
    if argument.startswith(APP):
        return str(ROOT / argument.removeprefix(APP))
    return argument


def parse_command(argv: list[str]) -> tuple[str, ...]:
    """Parse ``argv`` as its program's click command does, without running it; returns the
    command's path (``("iiot", "db", "migrate")``). Fails naming what does not exist."""
    program = Path(argv[0]).name
    commands = click_commands()
    assert program in commands, f"{argv[0]} is not a command of iiot or Dagster"
    command, args, path = commands[program], [here(a) for a in argv[1:]], [program]
    while isinstance(command, click.Group):
        ctx = click.Context(command, info_name=" ".join(path))
        assert args, f"`{' '.join(path)}` needs a command"
        assert not args[0].startswith("-"), f"`{' '.join(path)}` needs a command first"
        name = args.pop(0)
        sub = command.get_command(ctx, name)
        assert sub is not None, (
            f"`{' '.join(path)}` has no command {name!r}: {command.list_commands(ctx)}"
        )
        command, path = sub, [*path, name]
    try:
        command.make_context(" ".join(path), args)
    except click.ClickException as exc:
        raise AssertionError(f"`{' '.join(argv)}`: {exc.format_message()}") from None
    return tuple(path)


def check_program(argv: list[str]) -> tuple[str, ...] | None:
    """A venv program is parsed by click; anything else must be an executable of this system."""
    if argv[0].startswith(VENV_BIN) or "/" not in argv[0]:
        return parse_command(argv)
    assert Path(argv[0]).is_file(), f"{argv[0]} does not exist"
    return None


# --- systemd units ------------------------------------------------------------------------------


def read_unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file or drop-in, in order; continuation lines joined."""
    entries, section, pending = [], "", ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_files() -> list[Path]:
    return sorted(p for p in SYSTEMD.iterdir() if p.suffix in (".service", ".target"))


def services() -> list[tuple[Path, str]]:
    """Every service as systemd names it: a template once per instance of INSTANCES."""
    found = []
    for path in unit_files():
        if path.suffix != ".service":
            continue
        if path.name.endswith("@.service"):
            assert path.name in INSTANCES, f"{path.name}: a template INSTANCES does not know"
            found += [(path, path.name.replace("@", f"@{i}")) for i in INSTANCES[path.name]]
        else:
            found.append((path, path.name))
    return found


def effective(path: Path) -> list[tuple[str, str, str]]:
    """The unit with the drop-ins systemd adds: iiot-.service.d/ for every iiot-*.service."""
    entries = read_unit(path)
    if path.name.startswith("iiot-") and path.suffix == ".service":
        for drop_in in sorted((SYSTEMD / "iiot-.service.d").glob("*.conf")):
            entries += read_unit(drop_in)
    return entries


def values(entries: list[tuple[str, str, str]], key: str) -> list[str]:
    return [value for _, k, value in entries if k == key]


def specifiers(text: str, name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    prefix, _, instance = stem.partition("@")
    return text.replace("%i", instance).replace("%p", prefix).replace("%%", "%")


def env_example(*, commented: bool) -> dict[str, str]:
    """The assignments of iiot.env.example; ``commented`` adds the commented-out examples."""
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        assignment = line.removeprefix("#") if commented else line
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", assignment.strip())
        if match:
            env[match[1]] = match[2]
    return env


def unit_environment(entries: list[tuple[str, str, str]]) -> dict[str, str]:
    env = {}
    for value in values(entries, "Environment"):
        for word in shlex.split(value):
            name, _, setting = word.partition("=")
            env[name] = setting
    return env


def expand(command: str, name: str, env: dict[str, str]) -> list[str]:
    """An Exec*= line as systemd runs it: prefixes off, specifiers, ${VAR} within a word, $VAR
    alone as a word split at whitespace (none when empty)."""
    argv = []
    for word in shlex.split(specifiers(command.lstrip("-@:+!"), name)):
        alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if alone:
            argv += env.get(alone[1], "").split()
            continue
        argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m[1]], word))
    return argv


def unit_commands(env_file: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    for path, name in services():
        entries = effective(path)
        # EnvironmentFile= values take precedence over Environment= ones
        env = {**unit_environment(entries), **env_file}
        for key in EXEC_KEYS:
            for command in values(entries, key):
                yield name, expand(command, name, env)


@pytest.mark.parametrize("commented", [False, True], ids=["example", "with-commented-options"])
def test_every_command_of_the_units_exists_with_its_options(commented):
    programs = set()
    for name, argv in unit_commands(env_example(commented=commented)):
        try:
            path = check_program(argv)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
        if path:
            programs.add(path)
    assert programs == PROGRAMS


def test_units_restart_run_as_the_service_user_and_are_sandboxed():
    target = read_unit(SYSTEMD / "iiot.target")
    assert values(target, "WantedBy") == ["multi-user.target"]
    for path, name in services():
        entries = effective(path)
        one = {key: value for _, key, value in entries}  # the last assignment of each
        assert one["Restart"] in ("on-failure", "always"), name
        assert re.fullmatch(r"\d+s?", one["RestartSec"]), name
        assert one["User"] == "iiot", name
        assert one["NoNewPrivileges"] == "yes", name
        assert one["ProtectSystem"] == "strict", name
        assert one["PrivateTmp"] == "yes", name
        writable = " ".join(values(entries, "ReadWritePaths")).split()
        assert "/var/lib/iiot" in writable, name
        assert values(entries, "EnvironmentFile")[0] == "/etc/iiot/iiot.env", name
        assert "iiot.target" in values(entries, "PartOf"), name
        assert "iiot.target" in values(entries, "WantedBy"), name
        env = unit_environment(entries)
        assert env["IIOT_DATA_DIR"] == "/var/lib/iiot", name
        for key in ("ReadWritePaths", "WorkingDirectory"):
            for directory in " ".join(values(entries, key)).split():
                inside = directory.startswith(("/var/lib/iiot", APP.rstrip("/")))
                assert inside, (name, key, directory)
    ingest = effective(SYSTEMD / "iiot-ingest@.service")
    assert any("--slot %i" in command for command in values(ingest, "ExecStart"))
    assert values(ingest, "RestartPreventExitStatus") == ["2"]  # a configuration error
    assert values(ingest, "KillMode") == ["mixed"]  # SIGTERM to the slot, which drains


def test_the_celery_worker_unit_runs_the_worker_the_celery_tests_start():
    """Each instance is a worker named after it, on IIOT_CELERY_QUEUE (dagster unless the
    environment files say otherwise): exactly the command iiot_orchestration.celery_workers
    starts for tests/test_celery_workers.py, after copying the Celery instance file into
    DAGSTER_HOME; systemd stops it with SIGTERM to the whole group, the CLI's child Celery
    included, and waits for the step in hand."""
    from iiot_orchestration.celery_workers import INSTANCE_CONFIG, worker_argv

    entries = effective(CELERY_WORKER)
    for instance in INSTANCES[CELERY_WORKER.name]:
        name = CELERY_WORKER.name.replace("@", f"@{instance}")
        for env_file, queue in (({}, "dagster"), ({"IIOT_CELERY_QUEUE": "billing"}, "billing")):
            env = {**unit_environment(entries), **env_file}
            [start] = [expand(c, name, env) for c in values(entries, "ExecStart")]
            assert [here(a) for a in start] == worker_argv(instance, queue)
            [copy] = [expand(c, name, env) for c in values(entries, "ExecStartPre")]
            target = "/var/lib/iiot/dagster_home/dagster.yaml"
            assert [here(a) for a in copy[-2:]] == [str(INSTANCE_CONFIG), target]
    # dagster-celery starts `celery` from PATH
    assert unit_environment(entries)["PATH"].split(":")[0] == VENV_BIN.rstrip("/")
    assert values(entries, "KillMode") == []  # control-group
    assert int(values(entries, "TimeoutStopSec")[-1].removesuffix("s")) >= 60


def documented_unit_variables() -> set[str]:
    """The IIOT_* variables docs/operations.md's tables give that are not settings: those the
    unit files read themselves."""
    rows = re.findall(r"^\s*\| `(IIOT_[A-Z0-9_]+)`", OPERATIONS.read_text(), re.MULTILINE)
    return set(rows) - {v.name for v in VARIABLES}


def deploy_files() -> list[Path]:
    return sorted(
        p for p in [*SYSTEMD.rglob("*"), *CONTAINER.rglob("*")] if p.is_file() and p.stat().st_size
    )


def test_every_variable_is_a_setting_or_documented():
    settings = {v.name for v in VARIABLES}
    documented = documented_unit_variables()
    used = set()
    for path in deploy_files():
        names = set(VARIABLE.findall(path.read_text()))
        unknown = names - settings - documented
        assert not unknown, f"{path.relative_to(ROOT)} names {sorted(unknown)}: not a setting"
        used |= names
    assert documented, "docs/operations.md documents no unit variable"
    assert documented <= used, f"documented but used nowhere: {sorted(documented - used)}"


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not on PATH: install the Debian package systemd")
    units = tmp_path / "units"
    shutil.copytree(SYSTEMD, units)
    for path in units.rglob("*"):
        if path.is_file():
            text = path.read_text().replace(VENV_BIN, f"{HERE_BIN}/").replace(APP, f"{ROOT}/")
            path.write_text(text)
    names = [p.name for p in unit_files()] + [name for _, name in services()]
    targets = [str(units / name) for name in dict.fromkeys(names)]
    env = {"PATH": "/usr/bin:/bin", "SYSTEMD_UNIT_PATH": f"{units}:", "SYSTEMD_LOG_COLOR": "0"}
    result = subprocess.run(
        [analyze, "verify", *targets], env=env, capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    # warnings (an unknown key, a bad value) do not change the exit code: any line about our
    # units fails the test; lines about the host's own units do not
    ours = [line for line in output.splitlines() if "iiot" in line or str(units) in line]
    assert result.returncode == 0, output
    assert not ours, output

    security = subprocess.run(
        [analyze, "security", "--offline=true", str(units / "iiot-api.service")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "--offline" in security.stderr:  # systemd before 250
        return
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert exposure, security.stdout[-500:]
    assert float(exposure[1]) <= 3.0, security.stdout[-500:]


# --- the image and the compose file -------------------------------------------------------------


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for raw in CONTAINERFILE.read_text().splitlines():
        if raw.strip().startswith("#") and not pending:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line:
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def exec_form(arguments: str) -> list[str]:
    return yaml.safe_load(arguments)  # a JSON array


def image_sources() -> set[str]:
    """What the image copies from the repository, by path."""
    copied = set()
    for instruction, arguments in containerfile():
        if instruction == "COPY":
            words = [w for w in arguments.split() if not w.startswith("--")]
            copied |= {w.rstrip("/") for w in words[:-1]}
    return copied


def test_the_image_installs_the_project_and_runs_iiot_as_a_user():
    instructions = containerfile()
    first = dict(instructions)
    assert re.fullmatch(r"\S*python:3\.\d+-slim\S*", first["FROM"]), first["FROM"]
    users = [arguments for instruction, arguments in instructions if instruction == "USER"]
    assert users, "the image must not run as root"
    assert users[-1] not in ("root", "0"), "the image must not run as root"
    assert exec_form(first["ENTRYPOINT"]) == ["iiot"]
    assert parse_command(["iiot", *exec_form(first["CMD"])]) == ("iiot", "api")
    health = first["HEALTHCHECK"]
    assert "CMD [" in health, health
    assert exec_form(health.split("CMD", 1)[1])[0] == "iiot-healthcheck"
    assert any(
        "healthcheck.py" in a and a.endswith("/usr/local/bin/iiot-healthcheck")
        for i, a in instructions
        if i == "COPY"
    )
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    packages = set(wheel["targets"]["wheel"]["packages"])
    needed = packages | {"dbt_models", "dagster.yaml", "workspace.yaml", "pyproject.toml"}
    copied = image_sources()
    assert needed <= copied, f"the image lacks {sorted(needed - copied)}"
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def iiot_services() -> dict[str, dict]:
    """The services that run the iiot image."""
    image = compose()["services"]["migrate"]["image"]
    return {name: s for name, s in compose()["services"].items() if s.get("image") == image}


def container_argv(service: dict) -> list[str]:
    entrypoint = service.get("entrypoint") or exec_form(dict(containerfile())["ENTRYPOINT"])
    command = service.get("command") or exec_form(dict(containerfile())["CMD"])
    return [*entrypoint, *command]


def test_compose_runs_the_units_commands_on_the_image():
    services_ = compose()["services"]
    needed = {"postgres", "mosquitto", "migrate", "ingest-0", "ingest-1", "dagster-webserver"}
    needed |= {"dagster-daemon", "api", "alert-webhook", "prometheus", "alertmanager"}
    assert needed <= services_.keys(), sorted(needed - services_.keys())
    build = services_["migrate"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == CONTAINERFILE
    programs = set()
    for name, service in iiot_services().items():
        try:
            programs.add(parse_command(container_argv(service)))
        except AssertionError as exc:
            raise AssertionError(f"compose service {name}: {exc}") from None
        test = (service.get("healthcheck") or {}).get("test")
        if test:
            assert test[0] == "CMD", (name, test)
            if test[1] != "iiot-healthcheck":  # the image's own, tested below
                parse_command(test[1:])
    assert programs == PROGRAMS


def test_compose_celery_worker_is_the_units_but_for_its_name():
    """The compose worker (profile celery) runs the unit's command on the default queue; its
    replicas keep dagster-celery's unique names (no -n); celery.yaml is mounted, as the image
    lacks ops/; the broker variable celery.yaml requires is set."""
    from iiot_orchestration.celery_workers import worker_argv

    worker = compose()["services"]["dagster-celery-worker"]
    assert worker["profiles"] == ["celery"]
    expected = worker_argv("NAME", "dagster")
    name_at = expected.index("-n")
    del expected[name_at : name_at + 2]
    program, *args = container_argv(worker)  # the image's PATH finds the program
    assert [program, *(here(a) for a in args)] == [Path(expected[0]).name, *expected[1:]]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    celery_dir = (COMPOSE.parent / mounts[f"{APP}ops/dagster/celery"]).resolve()
    assert celery_dir == ROOT / "ops" / "dagster" / "celery"
    assert worker["environment"]["IIOT_CELERY_BROKER_URL"].startswith("pyamqp://")
    assert "IIOT_BACKUP_DATABASE_URL" in worker["environment"]  # backups run on workers too
    rabbitmq = compose()["services"]["rabbitmq"]
    assert rabbitmq["profiles"] == ["celery"]
    assert rabbitmq["network_mode"] == worker["network_mode"] == "service:pod"


def test_compose_ingest_slots_ports_and_alert_receiver_agree():
    slots = {}
    for name, service in iiot_services().items():
        argv = container_argv(service)
        if argv[:2] != ["iiot", "ingest"]:
            continue
        options = dict(zip(argv[2::2], argv[3::2], strict=True))
        slot = int(options["--slot"])
        slots[slot] = int(options["--slots"])
        port = int(options.get("--metrics-port", 9108)) + slot
        assert service["healthcheck"]["test"][2] == f"http://127.0.0.1:{port}/health/ready", name
    assert sorted(slots) == list(range(len(slots))), "slots are numbered 0..N-1"
    assert set(slots.values()) == {len(slots)}, "every slot must be given --slots N"
    prometheus = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    for job in prometheus["scrape_configs"]:
        if job["job_name"] == "iiot-ingest" and job.get("static_configs"):
            targets = {t for c in job["static_configs"] for t in c["targets"]}
            for slot in slots:
                assert f"127.0.0.1:{9108 + slot}" in targets
    main = click_commands()["iiot"]
    webhook = main.get_command(click.Context(main), "alert-webhook")
    port = next(p.default for p in webhook.params if p.name == "port")
    alertmanager = yaml.safe_load((ROOT / "ops" / "alertmanager" / "alertmanager.yml").read_text())
    urls = [w["url"] for r in alertmanager["receivers"] for w in r.get("webhook_configs", [])]
    assert urls
    assert all(url.startswith(f"http://127.0.0.1:{port}/") for url in urls), urls


def test_compose_mounts_files_that_exist():
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
        for env_file in service.get("env_file", []):
            assert env_file.get("required") is False, name  # ./iiot.env is the operator's


def broker_settings(path: Path) -> dict[str, str]:
    """Mosquitto's global settings of a file: before its first listener, paths aside."""
    settings = {}
    for line in path.read_text().splitlines():
        key, _, value = line.strip().partition(" ")
        if not key or key.startswith("#"):
            continue
        if key == "listener":
            break
        settings[key] = value
    settings.pop("persistence_location", None)
    return settings


def test_compose_broker_keeps_the_production_broker_settings():
    production = broker_settings(ROOT / "ops" / "mosquitto" / "mosquitto.conf")
    assert production["max_queued_messages"] == "0"
    assert broker_settings(CONTAINER / "mosquitto.conf") == production


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path in ("/health/live", "/ok") else 503)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def test_the_image_health_check(health_server):
    script = [sys.executable, str(CONTAINER / "healthcheck.py")]
    base = f"http://127.0.0.1:{health_server}"

    def run(*args: str, port: str = "1") -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "IIOT_API_PORT": port}
        return subprocess.run([*script, *args], env=env, capture_output=True, text=True)

    assert run(f"{base}/ok").returncode == 0
    failed = run(f"{base}/health/ready")
    assert failed.returncode == 1
    assert "503" in failed.stderr
    assert run(port=str(health_server)).returncode == 0  # the API's /health/live by default
    assert run().returncode == 1  # nothing listens
