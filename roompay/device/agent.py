"""The appliance's IoT module: takes start commands over MQTT and runs the relay.

Rules it keeps (see the topic table in the protocol package):
- it acts only on topics that carry its own device code;
- a `cmd_id` it has answered before gets that answer again as `duplicate`, and
  nothing else happens;
- a run ends on the agent's own timer, with or without a network.

Device time runs `time_scale` times faster than wall time, so a simulator can
finish a 30-minute program in 1.8 s with `time_scale=1000`.
"""

import argparse
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from roompay import __version__
from roompay.clock import Clock, IdGenerator, RandomIds, SystemClock
from roompay.device.relay import Relay, SimulatedRelay
from roompay.iot.client import StartupLatch, bring_up, new_client, shut_down
from roompay.protocol.errors import InvalidTopicError, LinkError, ProtocolError
from roompay.protocol.messages import (
    AckStatus,
    CommandAck,
    DevicePresence,
    EndReason,
    Heartbeat,
    Message,
    RejectReason,
    RunEvent,
    RunEventKind,
    StartCommand,
    StateMessage,
    decode,
    encode,
    peek_cmd_id,
)
from roompay.protocol.mqtt_url import MqttEndpoint, parse_mqtt_url
from roompay.protocol.topics import (
    DEFAULT_ROOT,
    CommandName,
    EventName,
    TopicKind,
    Topics,
    check_code,
)

log = logging.getLogger(__name__)


class CommandJournal(Protocol):
    """Remembers the answer given to every command, so a re-sent command never runs twice."""

    def answer_for(self, cmd_id: str) -> CommandAck | None:
        """Return the answer given to `cmd_id`, or None if it was never seen."""

    def record(self, ack: CommandAck) -> None:
        """Remember `ack` as the answer to its command; called before the relay switches."""


class MemoryCommandJournal:
    """A journal in memory: it forgets everything when the process ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[str, CommandAck] = {}

    def answer_for(self, cmd_id: str) -> CommandAck | None:
        """Return the answer given to `cmd_id`, or None if it was never seen."""
        with self._lock:
            return self._answers.get(cmd_id)

    def record(self, ack: CommandAck) -> None:
        """Remember `ack` as the answer to its command."""
        with self._lock:
            self._answers[ack.cmd_id] = ack


@dataclass(eq=False)
class _Run:
    """One run of the appliance; `seq` is the sequence number of the next event."""

    run_id: str
    command: StartCommand
    started_at: float = 0.0
    seq: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    timer: threading.Thread | None = None


class DeviceAgent:
    """Connects one appliance to the broker, answers its commands and drives its relay."""

    def __init__(
        self,
        code: str,
        endpoint: MqttEndpoint,
        topics: Topics,
        relay: Relay,
        *,
        time_scale: float = 1.0,
        progress_every_s: float = 60.0,
        boot_id: int = 1,
        clock: Clock | None = None,
        heartbeat_s: float = 30.0,
        fw: str = f"roompay-sim/{__version__}",
        ids: IdGenerator | None = None,
        journal: CommandJournal | None = None,
        keepalive_s: int = 30,
    ) -> None:
        check_code(code)
        if time_scale <= 0 or progress_every_s <= 0 or heartbeat_s <= 0:
            raise ValueError("time_scale, progress_every_s and heartbeat_s must be positive")
        self._code = code
        self._endpoint = endpoint
        self._topics = topics
        self._relay = relay
        self._time_scale = time_scale
        self._progress_every_s = progress_every_s
        self._boot_id = boot_id
        self._clock = clock or SystemClock()
        self._heartbeat_s = heartbeat_s
        self._fw = fw
        self._ids = ids or RandomIds()
        self._journal = journal or MemoryCommandJournal()
        self._keepalive_s = keepalive_s
        # Guards the active run, its sequence numbers and the closing flag.
        self._lock = threading.Lock()
        self._run: _Run | None = None
        self._lifecycle = threading.Lock()
        self._started = False
        self._closing = threading.Event()
        self._booted_at = time.monotonic()
        self._heartbeat: threading.Thread | None = None
        self._latch = StartupLatch()
        self._subscribe_mid: int | None = None
        self._client = self._build_client()

    @property
    def code(self) -> str:
        """Return this device's code."""
        return self._code

    def start(self, timeout_s: float = 10.0) -> None:
        """Connect, announce `online` and subscribe; return once the broker acknowledged."""
        with self._lifecycle:
            if self._started:
                raise LinkError(f"device {self._code} already started")
            self._closing.clear()
            # Nothing may run before a command says so, whatever state the relay woke in.
            self._relay.off()
            # A fresh latch per start, so a restart waits for its own CONNACK and SUBACK.
            self._latch = StartupLatch()
            bring_up(
                self._client,
                self._endpoint,
                self._latch,
                keepalive_s=self._keepalive_s,
                timeout_s=timeout_s,
            )
            self._started = True
            self._heartbeat = threading.Thread(
                target=self._beat, name=f"heartbeat-{self._code}", daemon=True
            )
            self._heartbeat.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End any run (relay off), announce `offline` and disconnect; safe to call twice."""
        with self._lifecycle:
            if not self._started:
                return
            self._started = False
            self._closing.set()
            self._end_active_run(EndReason.LOCAL_STOP)
            self._relay.off()
            if self._heartbeat is not None:
                self._heartbeat.join(timeout_s)
            self._announce_offline(timeout_s)
            shut_down(self._client)

    def run_forever(self) -> None:
        """Block until SIGINT or SIGTERM, then stop cleanly. Call from the main thread."""
        received = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            received.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            received.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()

    # --- connection -------------------------------------------------------

    def _build_client(self) -> mqtt.Client:
        # A fixed client id and a persistent session: commands sent while the device
        # is away wait in the broker, and a reconnect replaces the old session.
        client = new_client(self._endpoint, self._code, clean_session=False)
        will = StateMessage(state=DevicePresence.LOST, boot_id=self._boot_id)
        client.will_set(self._topics.state(self._code), encode(will), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Any,
    ) -> None:
        if reason_code.is_failure:
            log.error("broker refused device %s: %s", self._code, reason_code)
            self._latch.fail(f"broker refused the connection: {reason_code}")
            return
        _rc, self._subscribe_mid = client.subscribe(
            self._topics.device_subscription(self._code), qos=1
        )
        log.info("device %s connected to %s", self._code, self._endpoint.url)

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Any,
    ) -> None:
        if mid != self._subscribe_mid:
            return
        if any(code.is_failure for code in reason_codes):
            self._latch.fail(f"broker refused the command subscription: {reason_codes}")
            return
        # `online` only once commands can reach us, so the server may send as soon as it
        # sees it. Republished on every connect: a retained `lost` from an earlier drop
        # stays on the topic until something replaces it.
        self._publish_state(DevicePresence.ONLINE)
        self._latch.succeed()

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Any,
    ) -> None:
        if self._started:
            log.warning("device %s lost the broker (%s); reconnecting", self._code, reason_code)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            parsed = self._topics.parse(msg.topic)
        except InvalidTopicError as exc:
            log.warning("device %s ignored a message: %s", self._code, exc)
            return
        if parsed.code != self._code or parsed.kind is not TopicKind.CMD:
            log.warning("device %s ignored a message on %s", self._code, msg.topic)
            return
        try:
            if parsed.name is CommandName.START:
                self._handle_start(bytes(msg.payload))
            else:
                log.info("device %s does not handle %s yet", self._code, parsed.name)
        except Exception:
            # A bug in one command must not kill paho's thread and with it the device.
            log.exception("device %s failed on %s", self._code, msg.topic)

    # --- commands ---------------------------------------------------------

    def _handle_start(self, payload: bytes) -> None:
        try:
            command = decode(StartCommand, payload)
        except ProtocolError as exc:
            self._reject_bad_payload(payload, exc)
            return
        with self._lock:
            ack, run = self._answer(command)
            self._publish(EventName.ACK, ack, qos=1)
            if run is not None:
                self._begin(run)

    def _reject_bad_payload(self, payload: bytes, exc: ProtocolError) -> None:
        cmd_id = peek_cmd_id(payload)
        if cmd_id is None:
            log.warning("device %s dropped a start command without a cmd_id: %s", self._code, exc)
            return
        log.warning("device %s rejected command %s: %s", self._code, cmd_id, exc)
        ack = CommandAck(
            cmd_id=cmd_id,
            status=AckStatus.REJECTED,
            reason=RejectReason.BAD_PAYLOAD,
            ts=self._clock.now(),
        )
        self._publish(EventName.ACK, ack, qos=1)

    def _answer(self, command: StartCommand) -> tuple[CommandAck, _Run | None]:
        """Decide how to answer a valid start command; the caller holds the lock."""
        now = self._clock.now()
        earlier = self._journal.answer_for(command.cmd_id)
        # The journal comes before the expiry check: a re-sent command that already
        # ran must be reported as such, not as expired (which the server would refund).
        if earlier is not None:
            duplicate = earlier.model_copy(update={"status": AckStatus.DUPLICATE, "ts": now})
            return duplicate, None
        run: _Run | None = None
        if command.expires_at < now:
            ack = self._rejection(command, RejectReason.EXPIRED)
        elif self._run is not None or self._closing.is_set():
            ack = self._rejection(command, RejectReason.BUSY)
        else:
            run = _Run(run_id=self._ids.token(16), command=command)
            ack = CommandAck(
                cmd_id=command.cmd_id, status=AckStatus.ACCEPTED, run_id=run.run_id, ts=now
            )
        # Rejections are journaled too: a busy device must not run the same command
        # later, after the server has refunded it.
        self._journal.record(ack)
        return ack, run

    def _rejection(self, command: StartCommand, reason: RejectReason) -> CommandAck:
        log.info("device %s rejected command %s: %s", self._code, command.cmd_id, reason)
        return CommandAck(
            cmd_id=command.cmd_id,
            status=AckStatus.REJECTED,
            reason=reason,
            ts=self._clock.now(),
        )

    # --- runs -------------------------------------------------------------

    def _begin(self, run: _Run) -> None:
        """Switch on and start the run's timer; the caller holds the lock."""
        self._run = run
        self._relay.on()
        run.started_at = time.monotonic()
        self._publish_run_event(run, RunEventKind.STARTED, elapsed_s=0)
        run.timer = threading.Thread(
            target=self._time_run, args=(run,), name=f"run-{run.run_id[:8]}", daemon=True
        )
        run.timer.start()

    def _time_run(self, run: _Run) -> None:
        """Report progress and end the run on the device's own clock."""
        duration_s = run.command.duration_s
        tick = 1
        while tick * self._progress_every_s < duration_s:
            if self._sleep_until(run, tick * self._progress_every_s):
                return
            with self._lock:
                if self._run is not run:
                    return
                elapsed_s = round(tick * self._progress_every_s)
                self._publish_run_event(run, RunEventKind.PROGRESS, elapsed_s=elapsed_s)
            tick += 1
        if self._sleep_until(run, duration_s):
            return
        with self._lock:
            if self._run is run:
                self._finish(run, EndReason.COMPLETED, actual_run_s=duration_s)

    def _sleep_until(self, run: _Run, device_s: float) -> bool:
        """Wait until `device_s` seconds of device time into the run; True if cancelled."""
        wall_deadline = run.started_at + device_s / self._time_scale
        return run.cancelled.wait(max(0.0, wall_deadline - time.monotonic()))

    def _end_active_run(self, reason: EndReason) -> None:
        """End the active run early, if there is one, counting the device time it ran."""
        with self._lock:
            run = self._run
            if run is None:
                return
            ran_s = int((time.monotonic() - run.started_at) * self._time_scale)
            self._finish(run, reason, actual_run_s=min(ran_s, run.command.duration_s))
        if run.timer is not None:
            run.timer.join()

    def _finish(self, run: _Run, reason: EndReason, actual_run_s: int) -> None:
        """Switch off and report the end; the caller holds the lock."""
        self._run = None
        run.cancelled.set()
        self._relay.off()
        self._publish_run_event(run, RunEventKind.ENDED, elapsed_s=actual_run_s, reason=reason)
        log.info("device %s ended run %s: %s", self._code, run.run_id, reason)

    def _publish_run_event(
        self,
        run: _Run,
        kind: RunEventKind,
        *,
        elapsed_s: int,
        reason: EndReason | None = None,
    ) -> None:
        """Publish the next event of `run`; the caller holds the lock so `seq` keeps order."""
        event = RunEvent(
            run_id=run.run_id,
            cmd_id=run.command.cmd_id,
            order_id=run.command.order_id,
            event=kind,
            seq=run.seq,
            elapsed_s=elapsed_s,
            remaining_s=max(0, run.command.duration_s - elapsed_s),
            ts=self._clock.now(),
            reason=reason,
            actual_run_s=elapsed_s if reason is not None else None,
        )
        run.seq += 1
        self._publish(EventName.RUN, event, qos=1)

    # --- presence and heartbeats -----------------------------------------

    def _beat(self) -> None:
        while not self._closing.wait(self._heartbeat_s):
            with self._lock:
                run_id = None if self._run is None else self._run.run_id
            beat = Heartbeat(
                uptime_s=int(time.monotonic() - self._booted_at),
                relay_on=self._relay.is_on,
                run_id=run_id,
                ts=self._clock.now(),
            )
            self._publish(EventName.HB, beat, qos=0)

    def _publish_state(self, presence: DevicePresence) -> mqtt.MQTTMessageInfo:
        state = StateMessage(
            state=presence, boot_id=self._boot_id, fw=self._fw, ts=self._clock.now()
        )
        return self._client.publish(
            self._topics.state(self._code), encode(state), qos=1, retain=True
        )

    def _announce_offline(self, timeout_s: float) -> None:
        info = self._publish_state(DevicePresence.OFFLINE)
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError) as exc:
            # The broker will publish the `lost` will instead; nothing more to do.
            log.warning("device %s could not announce offline: %s", self._code, exc)

    def _publish(self, name: EventName, message: Message, qos: int) -> None:
        # With QoS 1 paho keeps the message while the broker is away and sends it on
        # reconnect, so a run that ends offline is still reported.
        info = self._client.publish(self._topics.event(self._code, name), encode(message), qos=qos)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("device %s could not publish %s: %s", self._code, name, info.rc)


def main(
    code: str,
    mqtt_url: str,
    topic_root: str,
    time_scale: float,
    progress_every_s: float,
) -> None:
    """Run a simulated appliance until SIGINT or SIGTERM."""
    agent = DeviceAgent(
        code,
        parse_mqtt_url(mqtt_url),
        Topics(topic_root),
        SimulatedRelay(),
        time_scale=time_scale,
        progress_every_s=progress_every_s,
    )
    agent.start()
    agent.run_forever()


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a simulated appliance's IoT module.")
    parser.add_argument("--code", required=True, help="device code, [A-Za-z0-9_-]{1,64}")
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--topic-root", default=DEFAULT_ROOT)
    parser.add_argument("--time-scale", type=float, default=1.0, help="device seconds per second")
    parser.add_argument("--progress-every-s", type=float, default=60.0, help="in device seconds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _parse_args()
    main(args.code, args.mqtt_url, args.topic_root, args.time_scale, args.progress_every_s)
