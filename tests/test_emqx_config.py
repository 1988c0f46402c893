"""ops/emqx/ checked without EMQX (none runs here): the HOCON parsed, and the ACL's rules
evaluated with MQTT wildcard semantics on topics built by the project's own code, against the
rights of the Mosquitto ACL that `iiot pki broker-config` writes (docs/ingest.md, "EMQX
cluster")."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from firmware.simulator import telemetry_topic
from iiot_orchestration import ota, ota_acks, pki
from iiot_orchestration.settings import VARIABLES_BY_NAME
from ingest_daemon.daemon import IngestConfig
from ingest_daemon.validation import mac_from_topic

EMQX = Path(__file__).resolve().parent.parent / "ops" / "emqx"
PREFIX = VARIABLES_BY_NAME["IIOT_TOPIC_PREFIX"].default
GROUP = IngestConfig.group
DEVICE_A, DEVICE_B = "aa:bb:cc:00:11:22", "aa:bb:cc:00:11:33"
PLATFORM = pki.PLATFORM_COMMON_NAME
DEVICE_LISTENER_PORT = 8883


# --- HOCON --------------------------------------------------------------------------------


def emqx_conf(text: str | None = None) -> Any:
    pyhocon = pytest.importorskip(
        "pyhocon", reason="pyhocon (the dev extra) is not installed: cannot parse emqx.conf"
    )
    if text is None:
        return pyhocon.ConfigFactory.parse_file(str(EMQX / "emqx.conf"))
    return pyhocon.ConfigFactory.parse_string(text)


def seconds(value: Any) -> float:
    """A HOCON duration as pyhocon reads it (timedelta, relativedelta) or EMQX writes it."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if hasattr(value, "months"):
        assert not value.years, f"{value}: years are not a fixed duration"
        assert not value.months, f"{value}: months are not a fixed duration"
        return timedelta(
            days=value.days, hours=value.hours, minutes=value.minutes, seconds=value.seconds
        ).total_seconds()
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)", str(value))
    assert match, f"{value!r} is not a duration"
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86_400}[match[2]]
    return int(match[1]) * unit


def config_problems(conf: Any) -> list[str]:
    """What in ``conf`` contradicts the project: empty when it is consistent."""
    problems: list[str] = []

    def expect(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    seeds = list(conf.get("cluster.static.seeds", []))
    expect(conf.get("cluster.discovery_strategy") in ("static", "dns"), "no cluster discovery")
    if conf.get("cluster.discovery_strategy") == "static":
        expect(len(set(seeds)) == 3, f"3 distinct static seeds expected, got {seeds}")
        expect(all(re.fullmatch(r"emqx@[\w.-]+", s) for s in seeds), f"bad seeds {seeds}")
        expect(conf.get("node.name") in seeds, "node.name is not one of the seeds")

    ingest = IngestConfig(database_url="", mqtt_url="")
    expiry = ingest.session_expiry_s
    expect(
        seconds(conf.get("mqtt.session_expiry_interval")) == expiry,
        f"mqtt.session_expiry_interval is not the ingest's {expiry} s",
    )
    expect(conf.get("durable_sessions.enable") is True, "durable sessions are off")
    expect(
        seconds(conf.get("durable_sessions.message_retention_period")) >= expiry,
        "durable sessions drop messages before a stopped slot's session expires",
    )
    expect(conf.get("mqtt.shared_subscription") is True, "shared subscriptions are off")
    expect(
        conf.get("mqtt.shared_subscription_strategy")
        in ("random", "round_robin", "round_robin_per_group", "sticky", "local"),
        "shared_subscription_strategy is not one of EMQX 5's that spreads a group's messages",
    )
    expect(conf.get("mqtt.mqueue_store_qos0") is False, "QoS 0 messages take queue room")

    listeners = conf.get("listeners.ssl")
    devices = next(
        (v for v in listeners.values() if str(v.get("bind")).endswith(f":{DEVICE_LISTENER_PORT}")),
        None,
    )
    expect(devices is not None, f"no SSL listener on {DEVICE_LISTENER_PORT}")
    if devices is not None:
        ssl = devices.get("ssl_options")
        expect(ssl.get("verify") == "verify_peer", "devices: verify is not verify_peer")
        expect(ssl.get("fail_if_no_peer_cert") is True, "devices: a client without certificate")
        expect(ssl.get("enable_crl_check") is True, "devices: no CRL check")
        expect(Path(ssl.get("cacertfile")).name == pki.CA_CERT_FILE, "devices: not the PKI's CA")
        # the names write_broker_config gives the broker's own certificate and key
        expect(Path(ssl.get("certfile")).name == "server.crt", "devices: not the PKI's server.crt")
        expect(Path(ssl.get("keyfile")).name == "server.key", "devices: not the PKI's server.key")
        expect(devices.get("enable_authn") is False, "devices: a password chain beside TLS")
        zone = conf.get(f"zones.{devices.get('zone')}")
        expect(zone.get("mqtt.peer_cert_as_clientid") == "cn", "devices: client id is not CN")
        expect(zone.get("mqtt.peer_cert_as_username") == "cn", "devices: user name is not CN")
    refresh = seconds(conf.get("crl_cache.refresh_interval"))
    expect(refresh < pki.CRL_VALIDITY.total_seconds(), "the CRL cache outlives the CRL")

    platform = [v for v in listeners.values() if v is not devices]
    expect(len(platform) >= 1, "no listener for the platform's clients")
    for listener in platform:
        expect(listener.get("enable_authn") is True, f"{listener.get('bind')}: no authentication")
        expect(
            listener.get("ssl_options.verify") == "verify_none",
            f"{listener.get('bind')}: platform clients authenticate by password, not certificate",
        )
        zone = conf.get(f"zones.{listener.get('zone')}")
        expect(
            "peer_cert_as_clientid" not in zone.get("mqtt"),
            "a platform zone replaces the slots' client ids <group>-<slot>",
        )
        inflight = zone.get("mqtt.max_inflight")
        expect(
            ingest.batch_rows <= inflight <= 65_535,
            f"max_inflight {inflight} is below the ingest's batch of {ingest.batch_rows}",
        )
        queue = zone.get("mqtt.max_mqueue_len")
        expect(
            queue == "infinity" or queue >= ingest.queue_messages,
            f"max_mqueue_len {queue} is below the daemon's queue of {ingest.queue_messages}",
        )
    durable = {zone.get("durable_sessions.enable") for zone in map(zone_of(conf), platform)}
    # EMQX 5 refuses a durable session's $share subscription (0x9E): a group of several slots
    # needs a zone whose sessions are not durable, one slot the durable one
    expect(durable == {True, False}, "the platform needs a durable and a non-durable zone")
    for name in ("tcp", "ws", "wss"):
        expect(
            conf.get(f"listeners.{name}.default.enable", True) is False,
            f"the default {name} listener is open",
        )

    expect(conf.get("authorization.no_match") == "deny", "authorization.no_match is not deny")
    files = [s for s in conf.get("authorization.sources") if s.get("type") == "file"]
    expect(
        len(files) == 1 and Path(files[0].get("path")).name == "acl.conf",
        "the authorization source is not the acl.conf file",
    )
    return problems


def zone_of(conf: Any):
    return lambda listener: conf.get(f"zones.{listener.get('zone')}")


def test_emqx_conf_matches_the_project() -> None:
    assert config_problems(emqx_conf()) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("session_expiry_interval = 7d", "session_expiry_interval = 2h", "session_expiry"),
        ("message_retention_period = 7d", "message_retention_period = 1d", "drop messages"),
        ("fail_if_no_peer_cert = true", "fail_if_no_peer_cert = false", "without certificate"),
        ("enable_crl_check = true", "enable_crl_check = false", "no CRL check"),
        ("peer_cert_as_clientid = cn", "peer_cert_as_clientid = disabled", "client id is not CN"),
        ('cacertfile = "/etc/emqx/iiot/ca.crt"', 'cacertfile = "/etc/ca.pem"', "PKI's CA"),
        ("max_inflight = 65535", "max_inflight = 32", "below the ingest's batch"),
        ("refresh_interval = 5m", "refresh_interval = 8d", "outlives the CRL"),
        ('"emqx@emqx3.iiot.internal"', '"emqx@emqx2.iiot.internal"', "3 distinct"),
        ("no_match = deny", "no_match = allow", "no_match"),
        ("tcp.default { enable = false }", "tcp.default { enable = true }", "default tcp"),
    ],
)
def test_a_wrong_setting_is_named(old: str, new: str, problem: str) -> None:
    text = (EMQX / "emqx.conf").read_text()
    assert old in text
    problems = config_problems(emqx_conf(text.replace(old, new, 1)))
    assert any(problem in p for p in problems), problems


def test_malformed_hocon_is_refused() -> None:
    with pytest.raises(Exception, match=r"(?i)expected|unexpected|parse"):
        emqx_conf("listeners { ssl.devices { bind = ")


# --- the ACL ------------------------------------------------------------------------------

TOKEN = re.compile(
    r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<atom>[a-z][A-Za-z0-9_@]*|\'[^\']*\')'
    r"|(?P<punct>[{}\[\],.]))"
)


def parse_acl(text: str) -> list[Any]:
    """The rules of an EMQX ACL file: Erlang terms (tuples, lists, atoms, strings), each ended
    by a full stop, %% comments dropped. Tuples become tuples, atoms str, strings ('s', text)."""
    text = "\n".join(line.split("%", 1)[0] for line in text.splitlines())
    tokens: list[tuple[str, str]] = []
    position = 0
    while text[position:].strip():
        match = TOKEN.match(text, position)
        if not match:
            raise ValueError(f"unexpected {text[position:].strip()[:20]!r}")
        kind = match.lastgroup or ""
        tokens.append((kind, match[kind]))
        position = match.end()

    def term(i: int) -> tuple[Any, int]:
        kind, value = tokens[i]
        if kind == "string":
            return ("s", value[1:-1].encode().decode("unicode_escape")), i + 1
        if kind == "atom":
            return value.strip("'"), i + 1
        if value in "{[":
            close, items, i = {"{": "}", "[": "]"}[value], [], i + 1
            while tokens[i][1] != close:
                item, i = term(i)
                items.append(item)
                if tokens[i][1] == ",":
                    i += 1
                elif tokens[i][1] != close:
                    raise ValueError(f"expected , or {close}, got {tokens[i][1]!r}")
            return (tuple(items) if close == "}" else items), i + 1
        raise ValueError(f"unexpected {value!r}")

    rules, i = [], 0
    while i < len(tokens):
        rule, i = term(i)
        if i >= len(tokens) or tokens[i][1] != ".":
            raise ValueError("a rule does not end with a full stop")
        rules.append(rule)
        i += 1
    return rules


def words_match(name: list[str], pattern: list[str]) -> bool:
    """MQTT matching of a topic (or of a requested filter, as EMQX's emqx_topic:match does: a
    wildcard in it is only covered by a wildcard of the pattern) against a filter."""
    if not pattern:
        return not name
    if pattern[0] == "#":
        return True
    if not name or name[0] == "#":
        return False
    if pattern[0] == "+" or pattern[0] == name[0]:
        return words_match(name[1:], pattern[1:])
    return False


def topic_matches(topic: str, pattern: str) -> bool:
    if topic.startswith("$") and not pattern.startswith("$"):
        return False
    return words_match(topic.split("/"), pattern.split("/"))


def real_topic(topic_filter: str) -> str:
    """What EMQX's authorization checks for a subscription: the filter after $share/<group>/."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def emqx_allows(rules: list[Any], username: str, action: str, topic: str) -> bool:
    for rule in rules:
        if rule == ("deny", "all") or rule == ("allow", "all"):
            return rule[0] == "allow"
        permission, who, rule_action, topics = rule
        if who != "all":
            kind, value = who
            assert kind in ("username", "user"), f"a rule on {kind}: not modelled here"
            if isinstance(value, tuple) and value[0] == "re":
                if not re.search(value[1][1], username):
                    continue
            elif value[1] != username:
                continue
        if rule_action not in ("all", action):
            continue
        for pattern in topics:
            if isinstance(pattern, tuple) and pattern[0] == "eq":
                if pattern[1][1] == topic:
                    return permission == "allow"
            elif topic_matches(topic, pattern[1].replace("${username}", username)):
                return permission == "allow"
    return False  # authorization.no_match = deny


def mosquitto_allows(username: str, action: str, topic: str) -> bool:
    """The same question to the Mosquitto ACL `iiot pki broker-config` writes."""
    text = pki.MOSQUITTO_ACL.format(prefix=PREFIX, platform=PLATFORM)
    user, grants = None, []
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if parts[0] == "user":
            user = parts[1]
        elif parts[0] == "topic" and user == username:
            grants.append((parts[1], parts[2]))
        elif parts[0] == "pattern":
            grants.append((parts[1], parts[2].replace("%u", username)))
    wanted = {"publish": "write", "subscribe": "read"}[action]
    return any(
        access in (wanted, "readwrite") and topic_matches(topic, pattern)
        for access, pattern in grants
    )


def acl_rules() -> list[Any]:
    return parse_acl((EMQX / "acl.conf").read_text())


def requests() -> list[tuple[str, str, str]]:
    """(user name, action, topic or filter) for every topic the project builds, each asked by
    the platform, its device and another device."""
    ingest = IngestConfig(database_url="", mqtt_url="", prefix=PREFIX, group=GROUP)
    asked: list[tuple[str, str]] = []
    for mac in (DEVICE_A, DEVICE_B):
        asked += [
            ("publish", telemetry_topic(PREFIX, mac)),
            ("publish", ota.ack_topic(PREFIX, mac)),
            ("publish", ota.update_topic(PREFIX, mac)),
            ("subscribe", ota.update_topic(PREFIX, mac)),
            ("subscribe", telemetry_topic(PREFIX, mac)),
        ]
    asked += [("subscribe", real_topic(f)) for f in ingest.subscriptions]
    asked += [
        ("subscribe", ota_acks.subscription(PREFIX)),
        ("subscribe", f"{PREFIX}/devices/+/cert_update"),
        ("subscribe", f"{PREFIX}/#"),
        ("subscribe", "#"),
        ("subscribe", "$SYS/#"),
        ("publish", f"other/devices/{DEVICE_A}/telemetry"),
        ("publish", f"{PREFIX}/devices/{DEVICE_A}/telemetry/extra"),
    ]
    return [(user, a, t) for user in (PLATFORM, DEVICE_A, DEVICE_B) for a, t in asked]


def test_acl_parses_and_ends_with_deny_all() -> None:
    rules = acl_rules()
    assert rules[-1] == ("deny", "all")
    assert len(rules) >= 3


@pytest.mark.parametrize(("username", "action", "topic"), requests())
def test_acl_grants_what_the_mosquitto_acl_grants(username: str, action: str, topic: str) -> None:
    assert emqx_allows(acl_rules(), username, action, topic) == mosquitto_allows(
        username, action, topic
    )


def test_a_device_writes_only_its_own_topics() -> None:
    rules = acl_rules()
    own, other = telemetry_topic(PREFIX, DEVICE_A), telemetry_topic(PREFIX, DEVICE_B)
    assert emqx_allows(rules, DEVICE_A, "publish", own)
    assert not emqx_allows(rules, DEVICE_B, "publish", own)
    assert not emqx_allows(rules, DEVICE_A, "publish", other)
    assert emqx_allows(rules, DEVICE_A, "publish", ota.ack_topic(PREFIX, DEVICE_A))
    assert not emqx_allows(rules, DEVICE_B, "publish", ota.ack_topic(PREFIX, DEVICE_A))
    assert emqx_allows(rules, DEVICE_A, "subscribe", ota.update_topic(PREFIX, DEVICE_A))
    assert not emqx_allows(rules, DEVICE_B, "subscribe", ota.update_topic(PREFIX, DEVICE_A))
    # a device may not forge the platform's certificate updates, nor read others'
    assert not emqx_allows(rules, DEVICE_A, "publish", ota.update_topic(PREFIX, DEVICE_A))
    assert not emqx_allows(rules, DEVICE_A, "subscribe", f"{PREFIX}/devices/+/cert_update")
    # the topic a device may write is the one ingest reads its MAC from
    assert mac_from_topic(own, PREFIX) == DEVICE_A


def test_the_ingest_filter_is_granted_to_the_platform_only() -> None:
    rules = acl_rules()
    shared, plain = IngestConfig(database_url="", mqtt_url="").subscriptions
    assert shared == f"$share/{GROUP}/{PREFIX}/devices/+/telemetry"
    assert plain == real_topic(shared)
    assert emqx_allows(rules, PLATFORM, "subscribe", real_topic(shared))
    assert not emqx_allows(rules, DEVICE_A, "subscribe", real_topic(shared))
    assert emqx_allows(rules, PLATFORM, "subscribe", ota_acks.subscription(PREFIX))
    assert not emqx_allows(rules, PLATFORM, "subscribe", "$SYS/#")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # a rule that names every device instead of the connected one
        ('"iiot/devices/${username}/telemetry"', '"iiot/devices/+/telemetry"'),
        ("{deny, all}.", "{allow, all}."),
        ('{username, "iiot-platform"}', "all"),
    ],
)
def test_a_wrong_acl_is_caught(old: str, new: str) -> None:
    text = (EMQX / "acl.conf").read_text()
    assert old in text
    rules = parse_acl(text.replace(old, new, 1))
    differing = [r for r in requests() if emqx_allows(rules, *r) != mosquitto_allows(*r)]
    assert differing


@pytest.mark.parametrize(
    "text",
    [
        '{allow, all, publish, ["a/b"]}',  # no full stop
        '{allow, all, publish, ["a/b"}.',
        '{allow, all, publish, ["a/b"]}. junk(',
        "{allow, all publish}.",
    ],
)
def test_malformed_acl_is_refused(text: str) -> None:
    with pytest.raises((ValueError, IndexError)):
        parse_acl(text)
