"""Appliances for functional tests: real agents on the test's broker."""

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from roompay.device.agent import DeviceAgent
from roompay.device.relay import SimulatedRelay
from roompay.protocol.mqtt_url import parse_mqtt_url
from roompay.protocol.signing import device_key
from roompay.services.catalog import describe_device
from tests.support.server import Stack
from tests.support.waiting import wait_for


def device_online(stack: Stack, code: str) -> bool:
    """Tell whether the server has seen the device come online."""
    with stack.runtime.ctx.sessions() as session:
        return describe_device(session, code).online


@contextmanager
def device_process(
    stack: Stack, code: str, time_scale: float = 1000.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `roompay device run` as its own process until the block ends."""
    command = [
        sys.executable,
        "-m",
        "roompay",
        "device",
        "run",
        "--code",
        code,
        "--key-hex",
        device_key(stack.settings.secret_key.encode(), code, "k1").hex(),
        "--mqtt-url",
        stack.mqtt_url,
        "--topic-root",
        stack.settings.mqtt_topic_root,
        "--time-scale",
        str(time_scale),
        "--progress-every-s",
        "600",
    ]
    process = subprocess.Popen(command, env=os.environ.copy(), stderr=subprocess.PIPE)
    try:
        wait_for(
            lambda: device_online(stack, code) or process.poll() is not None, 20, f"{code} online"
        )
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


@contextmanager
def device_agents(
    stack: Stack, codes: list[str], time_scale: float = 1000.0, heartbeat_s: float = 30.0
) -> Iterator[list[DeviceAgent]]:
    """Run in-process agents for these devices until the block ends."""
    endpoint = parse_mqtt_url(stack.mqtt_url)
    agents = [
        DeviceAgent(
            code,
            endpoint,
            stack.runtime.topics,
            SimulatedRelay(),
            device_key=device_key(stack.settings.secret_key.encode(), code, "k1"),
            time_scale=time_scale,
            progress_every_s=600,
            heartbeat_s=heartbeat_s,
        )
        for code in codes
    ]
    for agent in agents:
        agent.start()
    try:
        wait_for(lambda: all(device_online(stack, code) for code in codes), 15, "devices online")
        yield agents
    finally:
        for agent in agents:
            agent.stop()
