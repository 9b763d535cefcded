##! Flow records for IoT device classification, published to the iotcls bridge over Zeek's
##! WebSocket API; the bridge's labels come back as events and go to ``iot_class.log``.
##!
##! Per connection key and device side, the script keeps one window of at most
##! :zeek:see:`IoTClass::window_length` and records its first :zeek:see:`IoTClass::packets`
##! packets (time offset, IP length, direction, first :zeek:see:`IoTClass::payload_bytes`
##! payload bytes, or the first :zeek:see:`IoTClass::dhcp_payload_bytes` of a DHCP message,
##! whose options start at byte 240). A window ends at the first packet at or after
##! ``start + window_length`` (that packet opens the next window), at
##! ``start + window_length`` when its connection ended before (a later connection with the
##! same endpoints continues it until then, as in the pcap sensor), or when the trace file
##! ends. Each ended window becomes one :zeek:see:`IoTClass::flow` event per device endpoint
##! (two mirrored events when both endpoints are devices) on
##! :zeek:see:`IoTClass::records_topic`. The record is defined once, in iotcls/schema.py;
##! :zeek:type:`IoTClass::FlowRecord` mirrors it field by field.
##!
##! Capture mechanism and its cost. Every packet of a device connection reaches one
##! ``new_packet`` handler; once the window holds its packets, the handler only compares the
##! packet's time with the window's end, counts it and notes it as the window's last (the
##! ConnSize counters are stale inside packet events and end with the connection). Payload
##! bytes need ``tcp_packet`` and ``udp_contents`` (no threshold event carries them).
##! ConnThreshold packet and duration thresholds would cost nothing per packet after the
##! first N, but they cannot tell the time of a window's last packet (``last``) nor the size
##! of the packet that opens the next window, both of which the record needs exactly; see
##! docs/zeek.md for the comparison.

@load base/misc/version
@load base/frameworks/cluster
@load base/frameworks/input
@load base/frameworks/logging
@load base/utils/site

# A standalone Zeek 8.1+ has no cluster backend (CLUSTER_BACKEND_NONE); its WebSocket server
# then accepts clients but never acknowledges their subscriptions. Load Broker's backend,
# which every Zeek build has. Load another backend *before* iotcls to use it instead.
@ifdef ( Cluster::CLUSTER_BACKEND_NONE )
@if ( Cluster::backend == Cluster::CLUSTER_BACKEND_NONE )
@load frameworks/cluster/backend/broker
@endif
@endif

# ZeroMQ's XPUB/XSUB proxy runs on a cluster's manager only; a standalone Zeek with the
# ZeroMQ backend has none, and then never acknowledges WebSocket clients (seen on 8.2.2).
@ifdef ( Cluster::Backend::ZeroMQ::run_proxy_thread )
@if ( ! Cluster::is_enabled() )
redef Cluster::Backend::ZeroMQ::run_proxy_thread = T;
@endif
@endif

module IoTClass;

export {
	## The iot_class.log stream.
	redef enum Log::ID += { LOG };

	## A default logging policy hook for the stream.
	global log_policy: Log::PolicyHook;

	## Version of the flow record (iotcls.schema.SCHEMA_VERSION); sent to the bridge in
	## :zeek:see:`IoTClass::welcome`.
	const schema_version = 2;

	## Endpoints that are devices, by MAC address (lower case, as Zeek writes
	## ``l2_addr``: ``"20:f8:5e:ca:91:52"``). An endpoint is a device when its MAC is
	## listed or its address is in :zeek:see:`IoTClass::device_nets` (as the pcap sensor's
	## ``--devices`` and ``--local-nets``).
	option device_macs: set[string] = {};

	## Endpoints inside these networks are devices, except multicast and broadcast
	## addresses. Empty, and :zeek:see:`IoTClass::device_macs` empty too: use
	## :zeek:see:`Site::local_nets` (looked up at each new connection, so later changes
	## to it apply; Zeek adds the private address space to it by default). Empty with
	## MACs listed: only those MACs are devices, as the pcap sensor's ``--devices``.
	option device_nets: set[subnet] = {};

	## Longest span of one flow record; the schema's ``window_s``.
	option window_length: interval = 60sec;

	## Packets per window whose timing, size, direction and payload are recorded.
	option packets: count = 10;

	## Transport payload bytes kept per recorded packet (sent hex-encoded).
	option payload_bytes: count = 64;

	## Payload bytes kept instead of :zeek:see:`IoTClass::payload_bytes` for a DHCP
	## packet (UDP, either port 67 or 68): its options, where a client names its host
	## name, vendor class and parameter list, start at byte 240. The schema's
	## ``DHCP_PAYLOAD_BYTES`` (a whole message of a 576-byte datagram). Unused when
	## :zeek:see:`IoTClass::payload_bytes` is 0: then no payload is kept.
	option dhcp_payload_bytes: count = 548;

	## Topic the flow records (and :zeek:see:`IoTClass::welcome`,
	## :zeek:see:`IoTClass::drain`) are published on; the bridge subscribes to it.
	const records_topic = "zeek/iotcls/flows" &redef;

	## Topic the bridge publishes labels and control events on; the logging node subscribes.
	const labels_topic = "zeek/iotcls/labels" &redef;

	## Whether the logging node (manager, or a standalone Zeek) starts a WebSocket server.
	## Where one is already running with the same address, port and default options
	## (zeekctl's ``UseWebSocket``), Zeek 7.2+ reuses it instead of opening a second one.
	const websocket_listen = T &redef;

	## Address the WebSocket server listens on.
	const websocket_address = 127.0.0.1 &redef;

	## Port the WebSocket server listens on (Zeek's and zeekctl's default).
	const websocket_port = 27759/tcp &redef;

	## Offline (``zeek -r``): hold packet processing until the bridge has said
	## :zeek:see:`IoTClass::hello`, so that no record is published before anyone listens.
	const hold_offline = T &redef;

	## Offline: how long (wall clock) to wait for the bridge before processing anyway.
	const hold_timeout = 30sec &redef;

	## Offline: after the trace ends, how long (wall clock) to wait for
	## :zeek:see:`IoTClass::drained` before terminating anyway.
	const drain_timeout = 300sec &redef;

	## One flow record: mirrors ``iotcls.schema.FlowRecord`` field by field. Times are
	## doubles (Broker's JSON renders a ``time`` with millisecond resolution, a ``double``
	## with six decimals), offsets are intervals (nanoseconds on the wire), payloads hex.
	type FlowRecord: record {
		## MAC of the device endpoint, empty when Zeek saw none.
		device_mac: string;
		## Address of the device endpoint.
		device_ip: addr;
		## Port of the device endpoint (ICMP: type or code, as in ``conn_id``).
		device_port: count;
		## Address of the other endpoint.
		remote_ip: addr;
		## Port of the other endpoint.
		remote_port: count;
		## IP protocol number (6, 17, 1 or 58).
		proto: count;
		## Time of the window's first packet, epoch seconds.
		start: double;
		## Time of the window's last packet, epoch seconds.
		last: double;
		## Sum of the IP lengths of all the window's packets.
		total_bytes: count;
		## Number of the window's packets.
		total_packets: count;
		## Per recorded packet: time since ``start``.
		offsets: vector of interval;
		## Per recorded packet: IP length (IPv6: payload length + 40).
		sizes: vector of count;
		## Per recorded packet: 1 device to remote, 0 remote to device.
		directions: vector of count;
		## Per recorded packet: first transport payload bytes, lower-case hex.
		payloads: vector of string;
		## The connection's uid.
		uid: string;
		## Whether the device originated the connection.
		device_is_orig: bool;
	};

	## A label from the bridge: one per classified flow record.
	type Label: record {
		## Start of the labelled window, epoch seconds.
		ts: double;
		## The connection's uid.
		uid: string;
		## The connection's originator address.
		orig_h: addr;
		## The connection's originator port.
		orig_p: port;
		## The connection's responder address.
		resp_h: addr;
		## The connection's responder port.
		resp_p: port;
		## MAC of the device, empty when unknown.
		device_mac: string;
		## Address of the device.
		device_ip: addr;
		## Device type.
		label: string;
		## Calibrated probability of the label.
		confidence: double;
		## How the label was decided from the device's flows.
		strategy: string;
		## Flows the decision used.
		n_flows: count;
		## Whether the label passed the trust checks.
		trusted: bool;
		## Why it is not trusted; ``-`` when trusted.
		reason: string;
		## Feature groups that drove the label.
		top_groups: vector of string;
		## Model identifier.
		model: string;
	};

	## The columns of iot_class.log (iotcls.logschema.FIELDS; ``iotcls classify`` writes
	## the same columns).
	type Info: record {
		## Start of the labelled window.
		ts: time &log;
		## The connection's uid.
		uid: string &log;
		## The connection's endpoints.
		id: conn_id &log;
		## Transport protocol.
		proto: transport_proto &log;
		## MAC of the device, unset when unknown.
		device_mac: string &log &optional;
		## Address of the device.
		device_ip: addr &log;
		## Device type.
		label: string &log;
		## Calibrated probability of the label.
		confidence: double &log;
		## How the label was decided from the device's flows.
		strategy: string &log;
		## Flows the decision used.
		n_flows: count &log;
		## Whether the label passed the trust checks.
		trusted: bool &log;
		## Why it is not trusted; unset when trusted.
		reason: string &log &optional;
		## Feature groups that drove the label.
		top_groups: vector of string &log;
		## Model identifier.
		model: string &log;
	};

	## Per-connection capture state (one window; shared by mirrored device sides).
	## Capture state of one window of one connection key (shared by mirrored device
	## sides). It outlives a connection that ends within the window: the next connection
	## with the same endpoints continues it, as the pcap sensor's windows do.
	type State: record {
		## Whether the originator (of *id*) is a device.
		orig_dev: bool;
		## Whether the responder (of *id*) is a device.
		resp_dev: bool;
		## Device MAC of the originator, empty when none (or a group MAC).
		orig_mac: string;
		## Device MAC of the responder, empty when none (or a group MAC).
		resp_mac: string;
		## The connection the window's packets are oriented by.
		id: conn_id;
		## Its uid.
		uid: string;
		## IP protocol number (0: another protocol, on a Zeek before 7.2).
		proto: count;
		## Time of the window's first packet.
		start: time;
		## Time of the window's latest packet.
		last: time;
		## Packets of the window so far (both directions).
		pkts: count &default=0;
		## Sum of their IP lengths.
		bytes: count &default=0;
		## Recorded packets: offsets.
		offsets: vector of interval &default=vector();
		## Recorded packets: IP lengths.
		sizes: vector of count &default=vector();
		## Recorded packets: sent by the originator of *id*.
		from_orig: vector of bool &default=vector();
		## Recorded packets: payload, hex.
		payloads: vector of string &default=vector();
		## Slot whose payload the next tcp_packet/udp_contents fills; -1: none.
		pay_slot: int &default=-1;
		## The window was published for good; nothing more to publish.
		done: bool &default=F;
		## Devices are selected by MAC and an endpoint is an unspecified address (0.0.0.0,
		## ::): its packets may come from several devices (DHCP discovers, IPv6 duplicate
		## address detection), each with a window of its own, by source MAC.
		mac_split: bool &default=F;
	};

	## Zeek to bridge: one ended window of one device endpoint.
	global flow: event(rec: FlowRecord);

	## Zeek to bridge, in reply to :zeek:see:`IoTClass::hello`: the capture settings.
	global welcome: event(schema_version: count, node: string,
	    window_length: interval, packets: count, payload_bytes: count,
	    offline: bool);

	## Zeek to bridge, offline: the trace has ended and *records* flow records were
	## published in all; answer with :zeek:see:`IoTClass::drained` once every one of
	## them is labelled.
	global drain: event(records: count);

	## Bridge to Zeek: the bridge is connected (*endpoint*: the id from Zeek's ack).
	global hello: event(bridge: string, endpoint: string);

	## Bridge to Zeek: a label, written to iot_class.log.
	global label: event(l: Label);

	## Bridge to Zeek: all *records* records received so far are scored and *labels*
	## label events were sent before this event.
	global drained: event(records: count, labels: count);

	## Raised for each iot_class.log entry.
	global log_iot_class: event(rec: Info);
}

redef record connection += {
	## iotcls capture state, set for connections with a device endpoint.
	iotcls: State &optional;
};

# Payload bytes of UDP packets come only through udp_contents, which needs these.
redef udp_content_deliver_all_orig = T;
redef udp_content_deliver_all_resp = T;

type TimerLine: record {
	s: string;
};

global wallclock_fired: event(desc: Input::EventDescription, tpe: Input::Event,
    s: string);

# Wall-clock timeouts (offline): when each ends, and the ticks started so far.
global wallclock_deadline: table[string] of time;
global wallclock_ticks = 0;

# uid -> the connections with capture state, to flush them at trace end (lookup_connection
# cannot find ICMP connections by their conn_id on Zeek 8.2).
global tracked: table[string] of connection;

# Windows whose connection ended before the window did, by flow_key(): the next connection
# with the same endpoints continues them, else they are published when the window ends.
global parked: table[string] of State;

# The trace has ended (offline): every window is final.
global trace_done = F;

global window_end: event(key: string, start: time);

# [uid, MAC] -> the windows of a mac_split connection, one per source MAC.
global split: table[string, string] of State;

# DHCPv4 ports (base/protocols/dhcp's DHCP::ports, which a bare Zeek does not load).
const dhcp_ports: set[port] = {
	67/udp,
	68/udp
};

const unspecified: set[addr] = {
	0.0.0.0,
	[::]
};

global records_sent: count = 0;
global labels_logged: count = 0;
global bridge_up = F;
global bridge_endpoint = "";
global held = F;
global draining = F;

function capture_node(): bool
	{
	return ! Cluster::is_enabled()
	    || Cluster::local_node_type() == Cluster::WORKER;
	}

function label_node(): bool
	{
	return ! Cluster::is_enabled()
	    || Cluster::local_node_type() == Cluster::MANAGER;
	}

function node_name(): string
	{
	return Cluster::is_enabled() ? Cluster::node : "standalone";
	}

function publish_flow(rec: FlowRecord)
	{
@if ( Version::at_least("7.2.0") )
	Cluster::publish(records_topic, IoTClass::flow, rec);
@else
	Broker::publish(records_topic, IoTClass::flow, rec);
@endif
	}

function publish_welcome()
	{
@if ( Version::at_least("7.2.0") )
	Cluster::publish(records_topic, IoTClass::welcome, schema_version, node_name(),
	    window_length, packets, payload_bytes, reading_traces());
@else
	Broker::publish(records_topic, IoTClass::welcome, schema_version, node_name(),
	    window_length, packets, payload_bytes, reading_traces());
@endif
	}

function publish_drain()
	{
@if ( Version::at_least("7.2.0") )
	Cluster::publish(records_topic, IoTClass::drain, records_sent);
@else
	Broker::publish(records_topic, IoTClass::drain, records_sent);
@endif
	}

function subscribe_labels(): bool
	{
@if ( Version::at_least("7.2.0") )
	return Cluster::subscribe(labels_topic);
@else
	return Broker::subscribe(labels_topic);
@endif
	}

function listen(): bool
	{
@if ( Version::at_least("7.2.2") )
	return Cluster::listen_websocket([$listen_addr=websocket_address,
	    $listen_port=websocket_port]);
@else
@if ( Version::at_least("7.2.0") )
	return Cluster::listen_websocket([$listen_host=cat(websocket_address),
	    $listen_port=websocket_port]);
@else
	return Broker::listen_websocket(cat(websocket_address), websocket_port) !=
	    0/tcp;
@endif
@endif
	}

# Offline, network time stands still while processing is suspended and after the trace
# ends, so scheduled events never fire there, and neither do the Input framework's
# heartbeats, which a STREAM reader needs to read anything. A MANUAL raw reader reads its
# command's output at once in its own thread, so ``sleep 1; echo`` comes back after one
# second of wall clock whatever network time does. One-second ticks, not one long sleep:
# Zeek waits for a running reader when it terminates, so a tick delays exit by 1 s at most.
function wallclock_tick(what: string)
	{
	++wallclock_ticks;
	Input::add_event([$source=fmt("sleep 1; echo %s |", what), $name=fmt(
	    "iotcls-%s-tick-%d", what, wallclock_ticks),
	    $reader=Input::READER_RAW, $mode=Input::MANUAL, $fields=TimerLine,
	    $ev=wallclock_fired, $want_record=F]);
	}

function start_wallclock(what: string, after: interval)
	{
	wallclock_deadline[what] = current_time() + after;
	wallclock_tick(what);
	}

function release_hold(why: string)
	{
	if ( ! held )
		return;

	held = F;
	Reporter::info(fmt("iotcls: %s", why));
	continue_processing();
	}

# Group addresses are never devices (iotcls.flows.DeviceSelector does the same).
const multicast_nets: set[subnet] = {
	224.0.0.0/4,
	[ff00::]/8
};
const odd_hex: set[string] = {
	"1",
	"3",
	"5",
	"7",
	"9",
	"b",
	"d",
	"f"
};

# Directed broadcast addresses of the IPv4 device networks up to /30.
global directed_broadcasts: set[addr] = {};

function broadcasts(nets: set[subnet]): set[addr]
	{
	local out: set[addr] = {};
	for ( n in nets )
		{
		if ( is_v6_subnet(n) || subnet_width(n) > 30 )
			next;

		local size = 1;
		local k = 32 - subnet_width(n);
		while ( k > 0 )
			{
			size = size * 2;
			--k;
			}
		local base = addr_to_counts(subnet_to_addr(n))[0];
		add out[counts_to_addr(vector(base + size - 1))];
		}
	return out;
	}

function nets_changed(ID: string, new_value: set[subnet]): set[subnet]
	{
	if ( ID == "IoTClass::device_nets" )
		directed_broadcasts = broadcasts(|new_value| > 0 ? new_value :
		    Site::local_nets);
	else if ( |device_nets| == 0 )
		directed_broadcasts = broadcasts(new_value);
	return new_value;
	}

function is_device(a: addr, ep: endpoint): bool
	{
	if ( ep?$l2_addr && ep$l2_addr in device_macs )
		return T;
	if ( a in multicast_nets || a == 255.255.255.255 || a in directed_broadcasts )
		return F;
	if ( |device_nets| > 0 )
		return a in device_nets;
	if ( |device_macs| > 0 )
		return F;
	return a in Site::local_nets;
	}

# The device's MAC for the record: empty for a group (multicast/broadcast) MAC.
function device_mac(ep: endpoint): string
	{
	if ( ! ep?$l2_addr || sub_bytes(ep$l2_addr, 2, 1) in odd_hex )
		return "";
	return ep$l2_addr;
	}

function ip_proto(id: conn_id): count
	{
@if ( Version::at_least("7.2.0") )
	# Zeek 7.2+ carries the IP protocol in conn_id, also for connections of other IP
	# protocols (IGMP: unknown_transport, ports 0), which the pcap sensor records too.
	if ( id$proto != 65535 )
		return id$proto;
@endif
	local tp = get_port_transport_proto(id$orig_p);
	if ( tp == tcp )
		return 6;
	if ( tp == udp )
		return 17;
	if ( tp == icmp )
		return is_v6_addr(id$orig_h) ? 58 : 1;
	return 0;
	}

# IP protocols whose payload comes from Zeek's transport analyzers (and ICMP, kept empty);
# 0: a Zeek before 7.2 that does not say which.
const transport_protos: set[count] = {
	0,
	1,
	6,
	17,
	58
};

# The IP payload of the current packet (other IP protocols, such as IGMP: Zeek has no
# payload event for them), hex, from the raw frame; empty where the link layer is not
# Ethernet.
function ip_payload(p: pkt_hdr, ip_len: count): string
	{
	# pcap_packet's link_type says LINK_UNKNOWN on Zeek 8.2 for Ethernet: ask the header.
	local l2 = get_current_packet_header()$l2;
	if ( l2$encap != LINK_ETHERNET )
		return "";

	local raw = get_current_packet();
	local off = 14;
	if ( l2?$vlan )
		off += 4;
	if ( l2?$inner_vlan )
		off += 4;
	local hl = p?$ip ? p$ip$hl : 40;
	if ( ip_len <= hl )
		return "";

	local n = ip_len - hl;
	return bytestring_to_hexstr(sub_bytes(raw$data, off + hl + 1, n < payload_bytes ? n :
	    payload_bytes));
	}

# Endpoints without direction: a restarted connection may have them either way round.
function flow_key(id: conn_id): string
	{
	local a = fmt("%s|%s", id$orig_h, id$orig_p);
	local b = fmt("%s|%s", id$resp_h, id$resp_p);
	return a < b ? fmt("%s|%s", a, b) : fmt("%s|%s", b, a);
	}

function make_record(s: State, dev_is_orig: bool, proto: count): FlowRecord
	{
	local dirs: vector of count = vector();
	for ( i in s$from_orig )
		dirs += ( s$from_orig[i] == dev_is_orig ) ? 1 : 0;

	return FlowRecord($device_mac=dev_is_orig ? s$orig_mac : s$resp_mac,
	    $device_ip=dev_is_orig ? s$id$orig_h : s$id$resp_h,
	    $device_port=port_to_count(dev_is_orig ? s$id$orig_p : s$id$resp_p),
	    $remote_ip=dev_is_orig ? s$id$resp_h : s$id$orig_h,
	    $remote_port=port_to_count(dev_is_orig ? s$id$resp_p : s$id$orig_p),
	    $proto=proto, $start=time_to_double(s$start), $last=time_to_double(
	    s$last), $total_bytes=s$bytes, $total_packets=s$pkts,
	    $offsets=s$offsets, $sizes=s$sizes, $directions=dirs,
	    $payloads=s$payloads, $uid=s$uid, $device_is_orig=dev_is_orig);
	}

# Publishes the window (one record per device side); it must not be published again.
function emit(s: State)
	{
	if ( s$done || s$pkts == 0 )
		return;

	if ( s$orig_dev )
		{
		publish_flow(make_record(s, T, s$proto));
		++records_sent;
		}
	if ( s$resp_dev )
		{
		publish_flow(make_record(s, F, s$proto));
		++records_sent;
		}
	s$done = T;
	}

# Orients s by connection c (which has the same endpoints, maybe the other way round).
function rebase(s: State, c: connection)
	{
	if ( s$id$orig_h != c$id$orig_h || s$id$orig_p != c$id$orig_p )
		{
		local d = s$orig_dev;
		s$orig_dev = s$resp_dev;
		s$resp_dev = d;
		local m = s$orig_mac;
		s$orig_mac = s$resp_mac;
		s$resp_mac = m;
		local flipped: vector of bool = vector();
		for ( i in s$from_orig )
			flipped += ! s$from_orig[i];
		s$from_orig = flipped;
		}
	s$id = c$id;
	s$uid = c$uid;
	}

# The packet at t opens a new window of connection c: publish the current one.
function roll(c: connection, s: State, t: time)
	{
	emit(s);
	rebase(s, c);
	s$done = F;
	s$start = t;
	s$pkts = 0;
	s$bytes = 0;
	s$offsets = vector();
	s$sizes = vector();
	s$from_orig = vector();
	s$payloads = vector();
	s$pay_slot = -1;
	}

# The window of the device that sent the current packet (an originator of a mac_split
# connection), by the packet's source MAC; a MAC that is no device gets a window that
# publishes nothing.
function by_mac(c: connection, s: State, t: time): State
	{
	local l2 = get_current_packet_header()$l2;
	if ( ! l2?$src || l2$src == s$orig_mac )
		return s;
	if ( [c$uid, l2$src] in split )
		return split[c$uid, l2$src];

	local n = State($orig_dev=l2$src in device_macs, $resp_dev=s$resp_dev,
	    $orig_mac=l2$src, $resp_mac=s$resp_mac, $id=c$id, $uid=c$uid,
	    $proto=s$proto, $start=t, $last=t, $mac_split=T);
	split[c$uid, l2$src] = n;
	return n;
	}

# Publishes the windows of a mac_split connection.
function emit_split(uid: string)
	{
	local gone: set[string, string] = set();
	for ( [u, mac], s in split )
		if ( u == uid )
			{
			emit(s);
			add gone[u, mac];
			}
	for ( [u, mac] in gone )
		delete split[u, mac];
	}

# Publishes every window: the trace has ended, or Zeek is terminating.
function flush_all()
	{
	for ( uid, c in tracked )
		emit(c$iotcls);
	for ( key, s in parked )
		emit(s);
	parked = table();
	for ( [u, mac], ms in split )
		emit(ms);
	split = table();
	}

event window_end(key: string, start: time)
	{
	if ( key in parked && parked[key]$start == start )
		{
		emit(parked[key]);
		delete parked[key];
		}
	}

function finish_offline(path: string)
	{
	if ( ! bridge_up )
		{
		Reporter::warning(fmt("iotcls: no bridge connected, %d flow records of %s were not classified",
		    records_sent, path));
		terminate();
		return;
		}

	draining = T;
	publish_drain();
	start_wallclock("drain", drain_timeout);
	}

event zeek_init() &priority=5
	{
	Log::create_stream(IoTClass::LOG, [$columns=Info, $ev=log_iot_class,
	    $path="iot_class", $policy=log_policy]);
	}

event zeek_init() &priority=-10
	{
	directed_broadcasts = broadcasts(|device_nets| > 0 ? device_nets :
	    Site::local_nets);
	Option::set_change_handler("IoTClass::device_nets", nets_changed);
	Option::set_change_handler("Site::local_nets", nets_changed);

	for ( m in device_macs )
		if ( to_lower(m) != m )
			Reporter::warning(fmt("iotcls: IoTClass::device_macs entry %s is not lower case and never matches",
			    m));

	if ( capture_node()
	    && |device_macs| == 0
	    && |device_nets| == 0
	    && |Site::local_nets| == 0 )
		Reporter::warning("iotcls: no devices configured: set IoTClass::device_nets, IoTClass::device_macs or Site::local_nets");

	if ( ! label_node() )
		return;

	if ( ! subscribe_labels() )
		Reporter::error(fmt("iotcls: cannot subscribe to %s", labels_topic));

	if ( websocket_listen && ! listen() )
		Reporter::error(fmt("iotcls: cannot listen for WebSocket clients on %s:%s",
		    websocket_address, websocket_port));

	if ( reading_traces() && hold_offline && capture_node() )
		{
		held = T;
		suspend_processing();
		start_wallclock("hold", hold_timeout);
		}
	}

event wallclock_fired(desc: Input::EventDescription, tpe: Input::Event,
    s: string)
	{
	Input::remove(desc$name);
	if ( ! ( s == "hold" && held ) && ! ( s == "drain" && draining ) )
		return;

	if ( current_time() < wallclock_deadline[s] )
		{
		wallclock_tick(s);
		return;
		}

	if ( s == "hold" )
		release_hold(fmt("no bridge connected within %s, processing continues: flow records published before one connects are lost",
		    hold_timeout));
	else
		{
		draining = F;
		Reporter::warning(fmt("iotcls: bridge did not confirm %d flow records within %s (%d labels logged), terminating",
		    records_sent, drain_timeout, labels_logged));
		terminate();
		}
	}

event new_connection(c: connection) &priority=5
	{
	if ( ! capture_node() )
		return;

	local key = flow_key(c$id);
	if ( key in parked )
		{
		local p = parked[key];
		delete parked[key];
		if ( network_time() < p$start + window_length )
			{
			# The window goes on in this connection.
			rebase(p, c);
			c$iotcls = p;
			tracked[c$uid] = c;
			return;
			}
		emit(p);
		}

	local om = is_device(c$id$orig_h, c$orig);
	local rm = is_device(c$id$resp_h, c$resp);
	if ( ! om && ! rm )
		return;

	c$iotcls = State($orig_dev=om, $resp_dev=rm, $orig_mac=device_mac(c$orig),
	    $resp_mac=device_mac(c$resp), $id=c$id, $uid=c$uid, $proto=ip_proto(
	    c$id), $start=c$start_time, $last=c$start_time);
	tracked[c$uid] = c;
	if ( |device_macs| > 0
	    && c$orig?$l2_addr
	    && ( c$id$orig_h in unspecified || c$id$resp_h in unspecified ) )
		{
		c$iotcls$mac_split = T;
		split[c$uid, c$orig$l2_addr] = c$iotcls;
		}
	}

event new_packet(c: connection, p: pkt_hdr)
	{
	if ( ! c?$iotcls )
		return;

	local s = c$iotcls;
@ifdef ( get_current_packet_ts )
	# The packet's own time, as the pcap sensor has it: network time never goes back, so
	# a packet stamped earlier than the one before it would get the later time.
	local t = get_current_packet_ts();
@else
	local t = network_time();
@endif
	local ip_len = 0;
	local src: addr;
	if ( p?$ip )
		{
		ip_len = p$ip$len;
		src = p$ip$src;
		}
	else if ( p?$ip6 )
		{
		ip_len = p$ip6$len + 40;
		src = p$ip6$src;
		}
	else
		return;

	if ( s$mac_split && src == s$id$orig_h )
		{
		s = by_mac(c, s, t);
		c$iotcls = s;
		}

	if ( t >= s$start + window_length )
		roll(c, s, t);
	else if ( s$done )
		return;

	s$last = t;
	++s$pkts;
	s$bytes += ip_len;
	if ( |s$sizes| >= packets )
		{
		# This packet is not recorded: no payload event may fill a slot for it.
		s$pay_slot = -1;
		return;
		}

	# A window's first packet is at offset 0 also where its time is network time (before
	# Zeek 7.1), which may be later than the packet's own (the connection's start).
	s$offsets += s$pkts == 1 ? 0sec : t - s$start;
	s$sizes += ip_len;
	s$from_orig += src == s$id$orig_h;
	if ( s$proto in transport_protos || payload_bytes == 0 )
		{
		# tcp_packet / udp_contents fill the slot; ICMP payloads stay empty.
		s$payloads += "";
		s$pay_slot = |s$payloads| - 1;
		}
	else
		s$payloads += ip_payload(p, ip_len);
	}

event tcp_packet(c: connection, is_orig: bool, flags: string, seq: count,
    ack: count, len: count, payload: string)
	{
	if ( ! c?$iotcls || c$iotcls$pay_slot < 0 )
		return;

	local s = c$iotcls;
	if ( payload_bytes > 0 && |payload| > 0 )
		s$payloads[s$pay_slot] = bytestring_to_hexstr(sub_bytes(payload, 1,
		    payload_bytes));
	s$pay_slot = -1;
	}

event udp_contents(u: connection, is_orig: bool, contents: string)
	{
	if ( ! u?$iotcls || u$iotcls$pay_slot < 0 )
		return;

	local s = u$iotcls;
	local n = payload_bytes;
	if ( n > 0 && ( u$id$orig_p in dhcp_ports || u$id$resp_p in dhcp_ports ) )
		n = dhcp_payload_bytes;
	if ( n > 0 && |contents| > 0 )
		s$payloads[s$pay_slot] = bytestring_to_hexstr(sub_bytes(contents, 1, n));
	s$pay_slot = -1;
	}

event connection_state_remove(c: connection) &priority=-5
	{
	if ( ! c?$iotcls )
		return;

	delete tracked[c$uid];
	local s = c$iotcls;
	if ( s$mac_split )
		{
		emit_split(c$uid);
		return;
		}
	if ( s$done )
		return;

	local t = network_time();
	if ( trace_done || t >= s$start + window_length )
		{
		emit(s);
		return;
		}

	# The window may go on in a later connection with the same endpoints.
	local key = flow_key(c$id);
	if ( key in parked )
		emit(parked[key]);
	parked[key] = s;
	schedule s$start + window_length - t { window_end(key, s$start) };
	}

event Pcap::file_done(path: string)
	{
	if ( ! capture_node() )
		return;

	trace_done = T;
	flush_all();
	if ( label_node() )
		finish_offline(path);
	}

event zeek_done()
	{
	if ( capture_node() )
		flush_all();
	}

event IoTClass::hello(bridge: string, endpoint: string)
	{
	bridge_up = T;
	bridge_endpoint = endpoint;
	Reporter::info(fmt("iotcls: bridge %s connected (%s)", bridge, endpoint));
	publish_welcome();
	release_hold(fmt("bridge %s connected, processing continues", bridge));
	}

function bridge_lost(id: string, detail: string)
	{
	if ( ! bridge_up || id != bridge_endpoint )
		return;

	bridge_up = F;
	Reporter::warning(fmt("iotcls: bridge %s disconnected%s: labels are lost until it reconnects",
	    id, detail));
	}

# Zeek 7.2.0 raises this event with the endpoint only; 7.2.1 added the close code and reason.
@if ( Version::at_least("7.2.1") )
event Cluster::websocket_client_lost(endpoint: Cluster::EndpointInfo,
    code: count, reason: string)
	{
	bridge_lost(endpoint$id, fmt(" (code %d)", code));
	}
@else
@if ( Version::at_least("7.2.0") )
event Cluster::websocket_client_lost(endpoint: Cluster::EndpointInfo)
	{
	bridge_lost(endpoint$id, "");
	}
@endif
@endif

event IoTClass::label(l: Label)
	{
	local info = Info($ts=double_to_time(l$ts), $uid=l$uid, $id=conn_id(
	    $orig_h=l$orig_h, $orig_p=l$orig_p, $resp_h=l$resp_h,
	    $resp_p=l$resp_p), $proto=get_port_transport_proto(l$resp_p),
	    $device_ip=l$device_ip, $label=l$label, $confidence=l$confidence,
	    $strategy=l$strategy, $n_flows=l$n_flows, $trusted=l$trusted,
	    $top_groups=l$top_groups, $model=l$model);
	if ( l$device_mac != "" )
		info$device_mac = l$device_mac;
	if ( l$reason != "" && l$reason != "-" )
		info$reason = l$reason;

	Log::write(IoTClass::LOG, info);
	++labels_logged;
	}

event IoTClass::drained(records: count, labels: count)
	{
	if ( ! draining )
		return;

	draining = F;
	if ( records != records_sent )
		Reporter::warning(fmt(
		    "iotcls: published %d flow records, the bridge received %d",
		    records_sent, records));
	if ( labels != labels_logged )
		Reporter::warning(fmt("iotcls: the bridge sent %d labels, %d were logged",
		    labels, labels_logged));
	terminate();
	}
