# `zeek -r trace.pcap iotcls` run from the root of an iotcls checkout finds this directory
# first (Zeek's search path starts with "."), and it is the Python package, not the Zeek
# package. Load the Zeek package of the same checkout instead.
@load ../zeek-scripts/iotcls
