"""iotcls: real-time, trustworthy IoT device classification beside a Zeek sensor."""

__version__ = "0.1.0"
