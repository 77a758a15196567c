"""The MQTT transport: the server's device link (`link`), the paho client set-up both
ends share (`client`), and an embedded broker for development (`broker`).

Nothing is re-exported here, so that a device importing `roompay.iot.client` does not
pay for importing the broker.
"""
