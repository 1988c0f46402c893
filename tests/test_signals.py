import os
import signal
import subprocess
import sys
import time

from iiot_orchestration import registry
from iiot_orchestration.signals import stop_on_signals


def test_signals_set_the_event_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_stops_simulate_after_its_messages_are_acknowledged(conn, cli_env, mqtt_url):
    registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    registry.provision_devices(conn, "acme", [registry.DeviceRequest("aa:bb:cc:00:00:01", "gas")])
    env = {**cli_env, "IIOT_MQTT_URL": mqtt_url, "IIOT_TOPIC_PREFIX": "sigtest"}
    process = subprocess.Popen(
        [sys.executable, "-m", "iiot_orchestration.cli", "simulate", "--rate", "20"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Ctrl-C once it publishes (its first progress line), not after a fixed sleep: on a loaded
    # machine the interpreter may still be importing, before any handler is installed
    seen = ""
    while " acknowledged" not in seen and process.poll() is None:
        seen += process.stdout.read(1)
    time.sleep(1)  # let it publish for a while
    process.send_signal(signal.SIGINT)
    output = seen + process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    assert "Done:" in output
    assert "Traceback" not in output
