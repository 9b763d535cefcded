# zeek -r with no bridge: processing is held for hold_timeout (wall clock), then goes on;
# the records that would have been published are counted in a warning, none reaches a
# bridge, iot_class.log stays empty, Zeek terminates at the trace's end.
# @TEST-EXEC: make-trace home >home.pcap
# @TEST-EXEC: zeek -b -C -r home.pcap $PACKAGE %INPUT >output 2>stderr
# @TEST-EXEC: grep -v '^warning: .*listen' stderr | sed -E 's/^[0-9.]+ //' >warnings
# @TEST-EXEC: btest-diff output
# @TEST-EXEC: btest-diff warnings
# @TEST-EXEC: test ! -e iot_class.log

redef IoTClass::device_nets = {10.0.0.0/24};
redef IoTClass::websocket_listen = F;
redef IoTClass::hold_timeout = 1sec;

hook IoTClass::flow_policy(rec: IoTClass::FlowRecord, early: bool) &priority=-10
	{
	print fmt("%s %s %s:%s -> %s:%s/%s %.3f pkts=%d bytes=%d sizes=%s dirs=%s",
	    early ? "early" : "final", rec$device_mac, rec$device_ip,
	    rec$device_port, rec$remote_ip, rec$remote_port, rec$proto,
	    rec$start, rec$total_packets, rec$total_bytes, rec$sizes,
	    rec$directions);
	}
