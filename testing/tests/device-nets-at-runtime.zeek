# IoTClass::device_nets is an option: Config::set_value changes it while Zeek runs, and
# connections that start afterwards follow the new value (10.0.0.3 becomes a device 30 s in;
# its NTP connection, which began before, stays unrecorded; its DNS query at 75 s is recorded).
# @TEST-EXEC: make-trace home >home.pcap
# @TEST-EXEC: zeek -b -C -r home.pcap $PACKAGE %INPUT >output 2>&1
# @TEST-EXEC: btest-diff output

@load base/frameworks/config

redef IoTClass::device_nets = {10.0.0.2/32};
redef IoTClass::websocket_listen = F;
redef IoTClass::hold_offline = F;

global changed = F;

event new_packet(c: connection, p: pkt_hdr)
	{
	if ( ! changed && network_time() >= double_to_time(1700000030.0) )
		{
		changed = T;
		Config::set_value("IoTClass::device_nets", set(10.0.0.0/24));
		print fmt("device_nets now %s", IoTClass::device_nets);
		}
	}

hook IoTClass::flow_policy(rec: IoTClass::FlowRecord, early: bool)
	{
	if ( ! early )
		print fmt("record: %s %s -> %s:%s", rec$device_mac, rec$device_ip,
		    rec$remote_ip, rec$remote_port);
	}
