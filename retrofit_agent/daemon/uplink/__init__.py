"""``retrofit-agent uplink``: the daemon's messages and captures off the vehicle, nothing lost.

A second process beside the daemon: ZeroMQ in, a durable SQLite journal, MQTT 5 out, and
captured images to an S3-compatible store. See the README's "Uplink" section.
"""
