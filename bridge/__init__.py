"""The bridge between Zeek (WebSocket, Broker JSON) and the scorers (ZeroMQ)."""
