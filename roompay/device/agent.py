"""The appliance's IoT module: takes signed commands over MQTT and runs the relay, exactly once.

What it guarantees (docs/protocol.md §5-§7 has the full contract):
- it acts only on topics that carry its own code, and only on commands signed
  with its own key for its own code;
- a `cmd_id` it has answered before gets that answer again as `duplicate`, and
  nothing else happens; a `seq` not above the last accepted one is a `replay`;
- every answer that changes anything is in the durable journal before the broker
  gets its PUBACK (manual acknowledgement on a persistent session), so a crash
  before that point makes the broker deliver the command again;
- a run ends on the agent's own timer, with or without a network, and never lasts
  longer in total than was paid, even across a reboot;
- run events wait in the journal's outbox and are re-sent until `run_ack`.

Device time runs `time_scale` times faster than wall time, so a simulator can
finish a 30-minute program in 1.8 s with `time_scale=1000`.
"""

import argparse
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from roompay import __version__
from roompay.clock import Clock, IdGenerator, RandomIds, SystemClock
from roompay.device.journal import Answer, Checkpoint, JournaledRun, SqliteJournal
from roompay.device.relay import Relay, SimulatedRelay
from roompay.iot.client import StartupLatch, bring_up, new_client, shut_down
from roompay.protocol.errors import InvalidTopicError, LinkError, ProtocolError
from roompay.protocol.messages import (
    AckStatus,
    ActiveRun,
    BootEvent,
    CommandAck,
    DevicePresence,
    EndReason,
    FaultEvent,
    Heartbeat,
    Message,
    RejectReason,
    RunAck,
    RunEvent,
    RunEventKind,
    StartCommand,
    StateMessage,
    StopCommand,
    decode,
    encode,
    peek_cmd_id,
)
from roompay.protocol.mqtt_url import MqttEndpoint, parse_mqtt_url
from roompay.protocol.signing import DEFAULT_KEY_ID, verify_command
from roompay.protocol.topics import (
    DEFAULT_ROOT,
    CommandName,
    EventName,
    TopicKind,
    Topics,
    check_code,
)

log = logging.getLogger(__name__)

ANSWER_RETENTION = timedelta(days=7)
"""How long after a command expired its answer is kept; past that, expiry and `seq` guard."""

RESEND_BACKOFF_LIMIT = 4
"""The outbox re-send interval doubles, up to this many times `resend_every_s`, while no
`run_ack` comes back: a server behind on its backlog must not get every event again every
interval from every device (the fleet simulator's retry storm). A `run_ack` resets it."""

Settle = Callable[[], None]
"""Sends the PUBACK of the message being handled; called once its effect is journaled."""


@dataclass(eq=False)
class _Run:
    """The run in progress. Positions are device-seconds of run time.

    A segment is a stretch with the relay on: the first starts at 0, one resumed
    after a reboot starts at the journal's lease. `seq` numbers the next event.
    """

    run_id: str
    cmd_id: str
    order_id: str
    duration_s: int
    base_s: float
    seq: int
    next_progress_s: float
    next_checkpoint_s: float
    segment_started: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    timer: threading.Thread | None = None

    def position(self, time_scale: float) -> float:
        """Return how far into the run the device is now."""
        if self.segment_started is None:
            return self.base_s
        return self.base_s + (time.monotonic() - self.segment_started) * time_scale


class DeviceAgent:
    """Connects one appliance to the broker, answers its commands and drives its relay."""

    def __init__(
        self,
        code: str,
        endpoint: MqttEndpoint,
        topics: Topics,
        relay: Relay,
        *,
        device_key: bytes,
        key_id: str = DEFAULT_KEY_ID,
        journal_path: Path | None = None,
        journal: SqliteJournal | None = None,
        time_scale: float = 1.0,
        progress_every_s: float = 60.0,
        checkpoint_every_s: float = 10.0,
        resume_window_s: float = 120.0,
        resend_every_s: float = 30.0,
        clock: Clock | None = None,
        heartbeat_s: float = 30.0,
        fw: str = f"roompay-sim/{__version__}",
        ids: IdGenerator | None = None,
        keepalive_s: int = 30,
    ) -> None:
        check_code(code)
        positive = (time_scale, progress_every_s, checkpoint_every_s, resend_every_s, heartbeat_s)
        if min(positive) <= 0 or resume_window_s < 0:
            raise ValueError(
                "time_scale, progress_every_s, checkpoint_every_s, resend_every_s and"
                " heartbeat_s must be positive, resume_window_s not negative"
            )
        if len(device_key) < 16:
            raise ValueError("the device key must be at least 16 bytes")
        if journal is not None and journal_path is not None:
            raise ValueError("give journal or journal_path, not both")
        self._code = code
        self._endpoint = endpoint
        self._topics = topics
        self._relay = relay
        self._key = device_key
        self._key_id = key_id
        self._journal = journal or SqliteJournal(journal_path)
        self._time_scale = time_scale
        self._progress_every_s = progress_every_s
        self._checkpoint_every_s = checkpoint_every_s
        self._resume_window_s = resume_window_s
        self._resend_every_s = resend_every_s
        self._run_acked = threading.Event()
        self._clock = clock or SystemClock()
        self._heartbeat_s = heartbeat_s
        self._fw = fw
        self._ids = ids or RandomIds()
        self._keepalive_s = keepalive_s
        # Guards the active run, the fault mark, the power flag and every journal write
        # that goes with a relay change, so that events keep their order.
        self._lock = threading.Lock()
        self._run: _Run | None = None
        self._faulted = False
        self._fault_code = "appliance_fault"
        self._powered = False
        self._lifecycle = threading.Lock()
        self._started = False
        self._closing = threading.Event()
        self._booted_at = time.monotonic()
        self._boot_id = 0
        self._boot_announced = False
        self._workers: list[threading.Thread] = []
        self._latch = StartupLatch()
        self._subscribe_mid: int | None = None
        self._client: mqtt.Client | None = None

    @property
    def code(self) -> str:
        """Return this device's code."""
        return self._code

    @property
    def boot_id(self) -> int:
        """Return the number of the current boot (0 before the first start)."""
        return self._boot_id

    def start(self, timeout_s: float = 10.0) -> None:
        """Boot: open the journal, recover any run, connect and announce; or raise ConnectError.

        The relay is off until a run is resumed or a command accepted. A run found
        in the journal goes on if the device was down less than `resume_window_s`
        device-seconds (counted from the last checkpoint), else it ends as
        `power_loss` billed at the last checkpoint.
        """
        with self._lifecycle:
            if self._started:
                raise LinkError(f"device {self._code} already started")
            self._closing.clear()
            # Nothing may run before a command says so, whatever state the relay woke in.
            self._relay.off()
            self._journal.open()
            self._boot_id = self._journal.boot()
            self._boot_announced = False
            self._booted_at = time.monotonic()
            with self._lock:
                self._powered = True
                self._faulted = self._journal.faulted()
                self._recover()
            self._client = self._build_client()
            self._latch = StartupLatch()
            try:
                bring_up(
                    self._client,
                    self._endpoint,
                    self._latch,
                    keepalive_s=self._keepalive_s,
                    timeout_s=timeout_s,
                )
            except LinkError:
                with self._lock:
                    self._powered = False
                    self._run = None
                self._journal.close()
                raise
            self._started = True
            with self._lock:
                run = self._run
                if run is not None and run.segment_started is None:
                    self._begin_segment(run)
            self._workers = [
                threading.Thread(target=self._beat, name=f"hb-{self._code}", daemon=True),
                threading.Thread(target=self._resend, name=f"resend-{self._code}", daemon=True),
            ]
            for worker in self._workers:
                worker.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End any run as `local_stop` (relay off), announce `offline`, disconnect; idempotent."""
        with self._lifecycle:
            if not self._started:
                return
            self._started = False
            self._closing.set()
            self._end_active_run(EndReason.LOCAL_STOP)
            self._relay.off()
            for worker in self._workers:
                worker.join(timeout_s)
            self._announce_offline(timeout_s)
            with self._lock:
                self._powered = False
            shut_down(self._mqtt)
            self._journal.close()

    def simulate_power_loss(self) -> None:
        """Die as a power cut would: relay off, connection dropped without a word, journal as is.

        The run is not ended and no `offline` is sent (the broker publishes the last
        will); messages not yet acknowledged stay in the broker's session. A new
        agent on the same journal is this device after the reboot.
        """
        with self._lifecycle:
            if not self._started:
                raise LinkError(f"device {self._code} is not running")
            self._started = False
            with self._lock:
                self._powered = False
                run, self._run = self._run, None
                if run is not None:
                    run.cancelled.set()
                self._relay.off()
            self._closing.set()
            _drop_connection(self._mqtt)
            if run is not None and run.timer is not None:
                run.timer.join()
            for worker in self._workers:
                worker.join()
            self._journal.close()

    def fault(self, code: str = "appliance_fault") -> None:
        """The appliance reports fault `code`: end any run as `fault`, refuse runs until cleared.

        The fault is announced (retained) before the run's end, so staff see why it ended.
        """
        with self._lock:
            self._journal.set_faulted(True)
            self._faulted = True
            self._fault_code = code
        self._publish_fault(code, active=True)
        self._end_active_run(EndReason.FAULT)

    def clear_fault(self) -> None:
        """The fault is repaired: accept commands again, and say so."""
        with self._lock:
            self._journal.set_faulted(False)
            self._faulted = False
            code = self._fault_code
        self._publish_fault(code, active=False)

    def _publish_fault(self, code: str, *, active: bool) -> None:
        report = FaultEvent(fault=code, active=active, ts=self._clock.now())
        topic = self._topics.event(self._code, EventName.FAULT)
        self._mqtt.publish(topic, encode(report), qos=1, retain=True)

    def door_opened(self) -> None:
        """The guest opened the appliance: end any run as `local_stop`."""
        self._end_active_run(EndReason.LOCAL_STOP)

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

    # --- boot -------------------------------------------------------------

    def _recover(self) -> None:
        """Resume or end the run the journal holds; the caller holds the lock."""
        self._run = None
        self._journal.prune_answers(self._clock.now() - ANSWER_RETENTION)
        journaled = self._journal.active_run()
        if journaled is None:
            return
        now = self._clock.now()
        down_s = (now - journaled.checkpoint_at).total_seconds() * self._time_scale
        if down_s >= self._resume_window_s:
            log.warning(
                "device %s was down %.0f s: run %s ends as power loss after %d s",
                self._code,
                down_s,
                journaled.run_id,
                journaled.elapsed_s,
            )
            self._journal.end_run(self._ended_event(journaled, EndReason.POWER_LOSS))
            return
        # Go on from the lease, not the checkpoint: the relay may have run up to the
        # lease before the power went, and the guest paid for the duration only once.
        position = float(journaled.lease_s)
        self._journal.record_events(
            journaled.run_id,
            [],
            Checkpoint(
                elapsed_s=journaled.elapsed_s,
                lease_s=self._lease_after(journaled, position),
                at=now,
            ),
        )
        self._run = _Run(
            run_id=journaled.run_id,
            cmd_id=journaled.cmd_id,
            order_id=journaled.order_id,
            duration_s=journaled.duration_s,
            base_s=position,
            seq=journaled.next_seq,
            next_progress_s=(position // self._progress_every_s + 1) * self._progress_every_s,
            next_checkpoint_s=position + self._checkpoint_every_s,
        )
        log.info(
            "device %s resumes run %s at %d of %d s",
            self._code,
            journaled.run_id,
            journaled.lease_s,
            journaled.duration_s,
        )

    def _lease_after(self, run: JournaledRun | _Run, position: float) -> int:
        return min(run.duration_s, math.ceil(position + self._checkpoint_every_s))

    def _ended_event(self, run: JournaledRun, reason: EndReason) -> RunEvent:
        return RunEvent(
            run_id=run.run_id,
            cmd_id=run.cmd_id,
            order_id=run.order_id,
            event=RunEventKind.ENDED,
            seq=run.next_seq,
            elapsed_s=run.elapsed_s,
            remaining_s=run.duration_s - run.elapsed_s,
            ts=self._clock.now(),
            reason=reason,
            actual_run_s=run.elapsed_s,
        )

    # --- connection -------------------------------------------------------

    @property
    def _mqtt(self) -> mqtt.Client:
        if self._client is None:
            raise LinkError(f"device {self._code} was never started")
        return self._client

    def _build_client(self) -> mqtt.Client:
        # A fixed client id and a persistent session: commands sent while the device
        # is away wait in the broker, and a reconnect replaces the old session. The
        # PUBACK is ours to send, once the command's effect is in the journal.
        client = new_client(self._endpoint, self._code, clean_session=False)
        client.manual_ack_set(True)
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
        with self._lock:
            if not self._powered:
                return
            # `online` only once commands can reach us, so the server may send as soon as
            # it sees it. Republished on every connect: a retained `lost` from an earlier
            # drop stays on the topic until something replaces it.
            self._publish_state(DevicePresence.ONLINE)
            if not self._boot_announced:
                self._boot_announced = True
                self._publish(EventName.BOOT, self._boot_event(), qos=1)
            self._publish_outbox()
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

    def _on_message(self, client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        def settle() -> None:
            client.ack(msg.mid, msg.qos)

        try:
            parsed = self._topics.parse(msg.topic)
        except InvalidTopicError as exc:
            log.warning("device %s ignored a message: %s", self._code, exc)
            settle()
            return
        if parsed.code != self._code or parsed.kind is not TopicKind.CMD:
            log.warning("device %s ignored a message on %s", self._code, msg.topic)
            settle()
            return
        payload = bytes(msg.payload)
        try:
            match parsed.name:
                case CommandName.START:
                    self._handle_start(payload, settle)
                case CommandName.STOP:
                    self._handle_stop(payload, settle)
                case CommandName.RUN_ACK:
                    self._handle_run_ack(payload, settle)
                case _:
                    log.info("device %s does not handle %s", self._code, parsed.name)
                    settle()
        except Exception:
            # Not acknowledged: the broker delivers it again after the next reconnect,
            # as after a crash. A bug must not kill paho's thread and with it the device.
            log.exception("device %s failed on %s", self._code, msg.topic)

    # --- commands ---------------------------------------------------------

    def _handle_start(self, payload: bytes, settle: Settle) -> None:
        try:
            command = decode(StartCommand, payload)
        except ProtocolError as exc:
            self._reject_unreadable(payload, exc, settle)
            return
        with self._lock:
            if not self._powered:
                return
            if not self._is_authentic(command):
                self._reject_forgery(command.cmd_id, settle)
                return
            refusal = self._refusal(command)
            if refusal is not None:
                self._answer(refusal, command.expires_at, settle)
                return
            if self._run is not None or self._closing.is_set():
                reason = RejectReason.BUSY
            elif self._faulted:
                reason = RejectReason.FAULT
            else:
                self._accept_start(command, settle)
                return
            self._answer(self._rejection(command.cmd_id, reason), command.expires_at, settle)

    def _handle_stop(self, payload: bytes, settle: Settle) -> None:
        try:
            command = decode(StopCommand, payload)
        except ProtocolError as exc:
            self._reject_unreadable(payload, exc, settle)
            return
        with self._lock:
            if not self._powered:
                return
            if not self._is_authentic(command):
                self._reject_forgery(command.cmd_id, settle)
                return
            refusal = self._refusal(command)
            if refusal is not None:
                self._answer(refusal, command.expires_at, settle)
                return
            run = self._run
            if run is None or run.run_id != command.run_id:
                reply = self._rejection(command.cmd_id, RejectReason.NOT_RUNNING)
                self._answer(reply, command.expires_at, settle)
                return
            log.info("device %s stops run %s: %s", self._code, run.run_id, command.reason)
            accepted = CommandAck(
                cmd_id=command.cmd_id,
                status=AckStatus.ACCEPTED,
                run_id=run.run_id,
                ts=self._clock.now(),
            )
            ended = self._end(
                run,
                EndReason.REMOTE_STOP,
                Answer(accepted, command.expires_at, accepted_seq=command.seq),
            )
            settle()
            self._publish(EventName.ACK, accepted, qos=1)
            self._publish_run_event(ended)

    def _handle_run_ack(self, payload: bytes, settle: Settle) -> None:
        try:
            run_ack = decode(RunAck, payload)
        except ProtocolError as exc:
            log.warning("device %s dropped a run_ack: %s", self._code, exc)
            settle()
            return
        with self._lock:
            if not self._powered:
                return
            dropped = self._journal.acknowledge(run_ack.run_id, run_ack.seq)
        self._run_acked.set()
        settle()
        log.info(
            "device %s: server has run %s up to %d (%d dropped from the outbox)",
            self._code,
            run_ack.run_id,
            run_ack.seq,
            dropped,
        )

    def _is_authentic(self, command: StartCommand | StopCommand) -> bool:
        return command.key_id == self._key_id and verify_command(command, self._key, self._code)

    def _refusal(self, command: StartCommand | StopCommand) -> CommandAck | None:
        """Answer a signed command that must not act; the caller holds the lock.

        The journal comes before the expiry check: a re-sent command that already ran
        must be reported as such, not as expired (which the server would refund).
        """
        earlier = self._journal.answer_for(command.cmd_id)
        if earlier is not None:
            return earlier.model_copy(
                update={"status": AckStatus.DUPLICATE, "ts": self._clock.now()}
            )
        if command.expires_at <= self._clock.now():
            return self._rejection(command.cmd_id, RejectReason.EXPIRED)
        if command.seq <= self._journal.last_seq():
            return self._rejection(command.cmd_id, RejectReason.REPLAY)
        return None

    def _answer(self, reply: CommandAck, expires_at: datetime, settle: Settle) -> None:
        """Journal a reply that changes nothing else (unless it repeats one), then send it."""
        if reply.status is not AckStatus.DUPLICATE:
            # Rejections are journaled too: a busy device must not run the same command
            # later, after the server has refunded it.
            self._journal.record_answer(Answer(reply, expires_at))
        settle()
        self._publish(EventName.ACK, reply, qos=1)

    def _reject_unreadable(self, payload: bytes, exc: ProtocolError, settle: Settle) -> None:
        settle()
        cmd_id = peek_cmd_id(payload)
        if cmd_id is None:
            log.warning("device %s dropped a command without a cmd_id: %s", self._code, exc)
            return
        log.warning("device %s rejected command %s: %s", self._code, cmd_id, exc)
        self._publish(EventName.ACK, self._rejection(cmd_id, RejectReason.BAD_PAYLOAD), qos=1)

    def _reject_forgery(self, cmd_id: str, settle: Settle) -> None:
        # Not journaled: anyone can send a bad signature, and journaling it would let
        # them burn the cmd_id of a genuine command that is still on its way.
        settle()
        self._publish(EventName.ACK, self._rejection(cmd_id, RejectReason.BAD_SIG), qos=1)

    def _rejection(self, cmd_id: str, reason: RejectReason) -> CommandAck:
        log.info("device %s rejected command %s: %s", self._code, cmd_id, reason)
        return CommandAck(
            cmd_id=cmd_id, status=AckStatus.REJECTED, reason=reason, ts=self._clock.now()
        )

    # --- runs -------------------------------------------------------------

    def _accept_start(self, command: StartCommand, settle: Settle) -> None:
        """Journal the run, PUBACK, answer, switch on; the caller holds the lock."""
        now = self._clock.now()
        run = _Run(
            run_id=self._ids.token(16),
            cmd_id=command.cmd_id,
            order_id=command.order_id,
            duration_s=command.duration_s,
            base_s=0.0,
            seq=1,
            next_progress_s=self._progress_every_s,
            next_checkpoint_s=self._checkpoint_every_s,
        )
        accepted = CommandAck(
            cmd_id=command.cmd_id, status=AckStatus.ACCEPTED, run_id=run.run_id, ts=now
        )
        started = RunEvent(
            run_id=run.run_id,
            cmd_id=run.cmd_id,
            order_id=run.order_id,
            event=RunEventKind.STARTED,
            seq=0,
            elapsed_s=0,
            remaining_s=run.duration_s,
            ts=now,
        )
        self._journal.accept_start(
            Answer(accepted, command.expires_at, accepted_seq=command.seq),
            JournaledRun(
                run_id=run.run_id,
                cmd_id=run.cmd_id,
                order_id=run.order_id,
                duration_s=run.duration_s,
                started_at=now,
                elapsed_s=0,
                lease_s=self._lease_after(run, 0.0),
                checkpoint_at=now,
                next_seq=1,
            ),
            started,
        )
        settle()
        self._publish(EventName.ACK, accepted, qos=1)
        self._run = run
        self._begin_segment(run)
        self._publish_run_event(started)

    def _begin_segment(self, run: _Run) -> None:
        """Switch on and start the run's timer; the caller holds the lock."""
        self._relay.on()
        run.segment_started = time.monotonic()
        run.timer = threading.Thread(
            target=self._time_run, args=(run,), name=f"run-{run.run_id[:8]}", daemon=True
        )
        run.timer.start()

    def _time_run(self, run: _Run) -> None:
        """Report progress, checkpoint, and end the run on the device's own clock."""
        while True:
            target = min(run.next_progress_s, run.next_checkpoint_s, run.duration_s)
            if self._sleep_until(run, target):
                return
            with self._lock:
                if self._run is not run:
                    return
                if target >= run.duration_s:
                    ended = self._end(run, EndReason.COMPLETED)
                    self._publish_run_event(ended)
                    return
                self._tick(run, target)

    def _tick(self, run: _Run, position: float) -> None:
        """Record the progress and checkpoint due at `position`; the caller holds the lock."""
        events = []
        if run.next_progress_s <= position:
            elapsed_s = round(run.next_progress_s)
            events.append(
                RunEvent(
                    run_id=run.run_id,
                    cmd_id=run.cmd_id,
                    order_id=run.order_id,
                    event=RunEventKind.PROGRESS,
                    seq=run.seq,
                    elapsed_s=elapsed_s,
                    remaining_s=max(0, run.duration_s - elapsed_s),
                    ts=self._clock.now(),
                )
            )
            run.seq += 1
            run.next_progress_s += self._progress_every_s
        checkpoint = None
        if run.next_checkpoint_s <= position:
            checkpoint = Checkpoint(
                elapsed_s=min(run.duration_s, math.floor(position)),
                lease_s=self._lease_after(run, position),
                at=self._clock.now(),
            )
            run.next_checkpoint_s += self._checkpoint_every_s
        self._journal.record_events(run.run_id, events, checkpoint)
        for event in events:
            self._publish_run_event(event)

    def _sleep_until(self, run: _Run, position: float) -> bool:
        """Wait until the run reaches `position`; True if it was cancelled first."""
        if run.segment_started is None:
            raise RuntimeError("a run timer started before its segment")
        wall_deadline = run.segment_started + (position - run.base_s) / self._time_scale
        return run.cancelled.wait(max(0.0, wall_deadline - time.monotonic()))

    def _end_active_run(self, reason: EndReason) -> None:
        """End the active run early, if there is one, counting the device time it ran."""
        with self._lock:
            run = self._run
            if run is None or not self._powered:
                return
            ended = self._end(run, reason)
            self._publish_run_event(ended)
        if run.timer is not None and run.timer is not threading.current_thread():
            run.timer.join()

    def _end(self, run: _Run, reason: EndReason, answer: Answer | None = None) -> RunEvent:
        """Switch off and journal the end (and a stop's answer); the caller holds the lock."""
        self._run = None
        run.cancelled.set()
        self._relay.off()
        if reason is EndReason.COMPLETED:
            actual_s = run.duration_s
        else:
            actual_s = min(math.floor(run.position(self._time_scale)), run.duration_s)
        ended = RunEvent(
            run_id=run.run_id,
            cmd_id=run.cmd_id,
            order_id=run.order_id,
            event=RunEventKind.ENDED,
            seq=run.seq,
            elapsed_s=actual_s,
            remaining_s=run.duration_s - actual_s,
            ts=self._clock.now(),
            reason=reason,
            actual_run_s=actual_s,
        )
        run.seq += 1
        self._journal.end_run(ended, answer)
        log.info("device %s ended run %s: %s after %d s", self._code, run.run_id, reason, actual_s)
        return ended

    def _publish_run_event(self, event: RunEvent) -> None:
        # Offline, the outbox keeps it and the next connect sends it: queueing it in
        # paho as well would only send it twice.
        if self._mqtt.is_connected():
            self._publish(EventName.RUN, event, qos=1)

    def _publish_outbox(self) -> int:
        events = self._journal.outbox()
        for event in events:
            self._publish(EventName.RUN, event, qos=1)
        return len(events)

    def _resend(self) -> None:
        interval = self._resend_every_s
        while not self._closing.wait(interval):
            sent = 0
            with self._lock:
                if self._powered and self._mqtt.is_connected():
                    sent = self._publish_outbox()
            if self._run_acked.is_set() or not sent:
                self._run_acked.clear()
                interval = self._resend_every_s
            else:
                limit = self._resend_every_s * RESEND_BACKOFF_LIMIT
                interval = min(interval * 2, limit)

    # --- presence and heartbeats -----------------------------------------

    def _boot_event(self) -> BootEvent:
        """Describe what survived the boot; the caller holds the lock."""
        run = self._run
        active = None
        if run is not None:
            elapsed_s = min(math.floor(run.position(self._time_scale)), run.duration_s)
            active = ActiveRun(
                run_id=run.run_id,
                order_id=run.order_id,
                cmd_id=run.cmd_id,
                elapsed_s=elapsed_s,
                remaining_s=run.duration_s - elapsed_s,
            )
        return BootEvent(
            boot_id=self._boot_id,
            fw=self._fw,
            active_run=active,
            unsent_results=self._journal.unsent_count(),
            ts=self._clock.now(),
        )

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
        return self._mqtt.publish(self._topics.state(self._code), encode(state), qos=1, retain=True)

    def _announce_offline(self, timeout_s: float) -> None:
        info = self._publish_state(DevicePresence.OFFLINE)
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError) as exc:
            # The broker will publish the `lost` will instead; nothing more to do.
            log.warning("device %s could not announce offline: %s", self._code, exc)

    def _publish(self, name: EventName, message: Message, qos: int) -> None:
        info = self._mqtt.publish(self._topics.event(self._code, name), encode(message), qos=qos)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("device %s could not publish %s: %s", self._code, name, info.rc)


def _drop_connection(client: mqtt.Client) -> None:
    """Cut the TCP connection with no DISCONNECT, as a power cut does, and stop paho."""
    # Never come back on this client: the reboot is a new agent.
    client.reconnect_delay_set(min_delay=3600, max_delay=3600)
    sock = client.socket()
    if isinstance(sock, socket.socket):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            log.debug("socket already closed")
    # Returns once paho's thread has noticed; it checks for that once a second.
    client.loop_stop()


def main(
    code: str,
    mqtt_url: str,
    topic_root: str,
    time_scale: float,
    progress_every_s: float,
    *,
    device_key: bytes,
    key_id: str = DEFAULT_KEY_ID,
    journal_path: Path | None = None,
) -> None:
    """Run a simulated appliance until SIGINT or SIGTERM."""
    if journal_path is None:
        log.warning("no journal file: device %s forgets its runs and answers on exit", code)
    agent = DeviceAgent(
        code,
        parse_mqtt_url(mqtt_url),
        Topics(topic_root),
        SimulatedRelay(),
        device_key=device_key,
        key_id=key_id,
        journal_path=journal_path,
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
    parser.add_argument("--journal", type=Path, help="journal file (default: in memory only)")
    parser.add_argument(
        "--key-hex", required=True, help="the device's command key, hex (32 bytes from HKDF)"
    )
    parser.add_argument("--key-id", default=DEFAULT_KEY_ID, help="the key's id, as the server's")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _parse_args()
    main(
        args.code,
        args.mqtt_url,
        args.topic_root,
        args.time_scale,
        args.progress_every_s,
        device_key=bytes.fromhex(args.key_hex),
        key_id=args.key_id,
        journal_path=args.journal,
    )
