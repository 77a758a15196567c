"""The appliance's IoT module: an agent that obeys the server over MQTT and drives a relay.

`roompay.device.agent` is not imported here so that `python -m roompay.device.agent`
runs it without importing it twice.
"""

from roompay.device.relay import Relay, SimulatedRelay, Switch

__all__ = ["Relay", "SimulatedRelay", "Switch"]
