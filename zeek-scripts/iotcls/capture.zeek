##! Flow records from Zeek's packet events, in script land.
##!
##! Per connection key and device side, one window of at most
##! :zeek:see:`IoTClass::window_length` records its first :zeek:see:`IoTClass::packets`
##! packets (time offset, IP length, direction, first :zeek:see:`IoTClass::payload_bytes`
##! payload bytes, or the first :zeek:see:`IoTClass::dhcp_payload_bytes` of a DHCP message,
##! whose options start at byte 240). A window ends at the first packet at or after
##! ``start + window_length`` (that packet opens the next window), at
##! ``start + window_length`` when its connection ended before (a later connection with the
##! same endpoints continues it until then, as in the pcap sensor), or when the trace file
##! ends. Each ended window becomes one :zeek:type:`IoTClass::FlowRecord` per device endpoint
##! (two mirrored records when both endpoints are devices), handed to
##! :zeek:id:`IoTClass::publish_flow`.
##!
##! Cost: every packet of a device connection reaches one ``new_packet`` handler; once the
##! window holds its packets, the handler only compares the packet's time with the window's
##! end, counts it and notes it as the window's last (the ConnSize counters are stale inside
##! packet events and end with the connection). Payload bytes need ``tcp_packet`` and
##! ``udp_contents`` (no threshold event carries them). See docs/zeek.md.

@load ./main
@load ./devices
@load ./bridge

module IoTClass;

export {
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
		## The window's early record is out, or will not be due (iotcls.schema).
		early_sent: bool &default=F;
		## Identifies the window among those waiting for their early record.
		wid: count &default=0;
	};
}

redef record connection += {
	## iotcls capture state, set for connections with a device endpoint.
	iotcls: State &optional;
};

# Payload bytes of UDP packets come only through udp_contents, which needs these.
redef udp_content_deliver_all_orig = T;
redef udp_content_deliver_all_resp = T;

# uid -> the connections with capture state, to flush them at trace end (lookup_connection
# cannot find ICMP connections by their conn_id on Zeek 8.2).
global tracked: table[string] of connection;

# Windows whose connection ended before the window did, by flow_key(): the next connection
# with the same endpoints continues them, else they are published when the window ends.
global parked: table[string] of State;

# The trace has ended (offline): every window is final.
global trace_done = F;

# A parked window's end: publish it unless a later connection took it over.
global window_end: event(key: string, start: time);

# [uid, MAC] -> the windows of a mac_split connection, one per source MAC.
global split: table[string, string] of State;

# Windows whose early record is not out yet, by wid: the sweep publishes those idle for
# early_idle (a window that goes on gets it at its next packet).
global early_pending: table[count] of State;

# The last wid given out.
global last_wid = 0;

# Every early_idle: publish the early records that are due.
global early_sweep: event();

# DHCPv4 ports (base/protocols/dhcp's DHCP::ports, which a bare Zeek does not load).
const dhcp_ports: set[port] = {
	67/udp,
	68/udp
};

# Unspecified addresses: a connection with one may carry several devices' packets.
const unspecified: set[addr] = {
	0.0.0.0,
	[::]
};

# The second hex digit of a group MAC's first byte (its low bit set).
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

# delivery.zeek's window on the records a native capture plugin keeps: there is none here
# (this capture's FlowRecords are kept by delivery.zeek itself).
function native_keep(key: string, line: string): bool
	{
	return F;
	}

function native_forget(key: string): bool
	{
	return F;
	}

function native_kept(): vector of string
	{
	return vector();
	}

function native_counts(): index_vec
	{
	return vector(0, 0, 0);
	}

# Whether a connection endpoint is a device (devices.zeek decides from its address and MAC).
function is_device(a: addr, ep: endpoint): bool
	{
	return is_device_endpoint(a, ep?$l2_addr ? ep$l2_addr : "");
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
	# conn_id carries the IP protocol, also for connections of other IP protocols (IGMP:
	# unknown_transport, ports 0), which the pcap sensor records too; 65535: unknown.
	if ( id$proto != 65535 )
		return id$proto;

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
# 0: a protocol Zeek did not say.
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

# A new window of s waits for its early record.
function await_early(s: State)
	{
	s$early_sent = ! early_records;
	if ( s$early_sent )
		return;

	s$wid = ++last_wid;
	early_pending[s$wid] = s;
	}

# Whether the window's early record exists (iotcls.schema.early_cut): its first packets are
# in, or it went idle for early_idle before the window's end.
function early_exists(s: State): bool
	{
	if ( s$early_sent || s$done || s$pkts == 0 )
		return F;
	return |s$sizes| >= packets || s$last + early_idle < s$start + window_length;
	}

# Whether the window's early record is due before a packet at t is counted.
function early_due(s: State, t: time): bool
	{
	return early_exists(s)
	    && ( |s$sizes| >= packets || t - s$last >= early_idle );
	}

# Publishes the window's early record: the window as it stands.
function emit_early(s: State)
	{
	s$early_sent = T;
	delete early_pending[s$wid];
	if ( s$orig_dev )
		publish_early(make_record(s, T, s$proto));
	if ( s$resp_dev )
		publish_early(make_record(s, F, s$proto));
	}

# Publishes the window (one record per device side); it must not be published again.
function emit(s: State)
	{
	if ( s$done || s$pkts == 0 )
		return;

	if ( early_exists(s) )
		emit_early(s);
	s$early_sent = T;
	delete early_pending[s$wid];

	if ( s$orig_dev )
		publish_flow(make_record(s, T, s$proto));
	if ( s$resp_dev )
		publish_flow(make_record(s, F, s$proto));
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
	await_early(s);
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
	await_early(n);
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

event early_sweep()
	{
	local due: vector of State = vector();
	for ( wid, s in early_pending )
		if ( early_due(s, network_time()) )
			due += s;
	for ( i in due )
		emit_early(due[i]);
	schedule early_idle { early_sweep() };
	}

event zeek_init()
	{
	if ( capture_node() && early_records )
		schedule early_idle { early_sweep() };
	if ( capture_node() )
		Reporter::info("iotcls: capture in script land (per-packet events; up to 3x Zeek's CPU on a busy link): build the native plugin to avoid it (docs/zeek.md)");
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
	await_early(c$iotcls);
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
	# The packet's own time, as the pcap sensor has it: network time never goes back, so
	# a packet stamped earlier than the one before it would get the later time.
	local t = get_current_packet_ts();
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

	if ( early_due(s, t) )
		emit_early(s);

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

	# A window's first packet is at offset 0, whatever the connection's start says.
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
