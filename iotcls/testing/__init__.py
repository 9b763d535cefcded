"""Stand-ins for the world outside iotcls (a Zeek speaking its WebSocket protocol, traffic
records, load), shared by the tests and the benchmarks."""
