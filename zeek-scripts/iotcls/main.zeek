##! The iotcls API: its options, the flow record Zeek sends, the label the bridge sends back,
##! the events between the two, and iot_class.log (one line per label).
##!
##! The flow record is defined once, in iotcls/schema.py; :zeek:type:`IoTClass::FlowRecord`
##! mirrors it field by field, and :zeek:type:`IoTClass::Info` has the columns of
##! iotcls/logschema.py, which ``iotcls classify`` writes too.

@load base/frameworks/cluster
@load base/frameworks/logging
@load base/utils/site

module IoTClass;

export {
	## The iot_class.log stream.
	redef enum Log::ID += { LOG };

	## A default logging policy hook for the stream.
	global log_policy: Log::PolicyHook;

	## Where this copy of the package was loaded from.
	const package_dir = @DIR;

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

	## Transport payload bytes kept per recorded packet (hex in a FlowRecord, base64 in a
	## packed line).
	option payload_bytes: count = 64;

	## Payload bytes kept instead of :zeek:see:`IoTClass::payload_bytes` for a DHCP
	## packet (UDP, either port 67 or 68): its options, where a client names its host
	## name, vendor class and parameter list, start at byte 240. The schema's
	## ``DHCP_PAYLOAD_BYTES`` (a whole message of a 576-byte datagram). Unused when
	## :zeek:see:`IoTClass::payload_bytes` is 0: then no payload is kept.
	option dhcp_payload_bytes: count = 548;

	## Publish each window's early record too (iotcls.schema.early_record): the window as
	## it stands when its first :zeek:see:`IoTClass::packets` packets are in, or after
	## :zeek:see:`IoTClass::early_idle` without a packet, so that a new device is labelled
	## within a second or two instead of at its first window's end. Its label goes to
	## iot_devices.log and the notices, not to iot_class.log (one line per final record).
	option early_records: bool = T;

	## How long a window waits without a packet before its early record is published (the
	## schema's ``EARLY_IDLE_S``).
	option early_idle: interval = 500msec;

	## Native capture plugin: records per :zeek:see:`IoTClass::flows` event. The plugin
	## packs each record into one line of text (bridge/records.py's packed format) and
	## publishes them in batches, so that neither script land nor Broker handles a
	## FlowRecord per record (about half of what capture costs a busy Zeek otherwise;
	## docs/zeek.md). 0, or any :zeek:see:`IoTClass::flow_policy` handler (it takes a
	## FlowRecord): one :zeek:see:`IoTClass::flow` event per record, as the script
	## capture publishes them.
	option native_batch: count = 100;

	## Native capture plugin: the longest a packed record waits for its batch to fill
	## (network time, which Zeek moves on while a live link is quiet).
	option native_batch_delay: interval = 200msec;

	## Standalone Zeek: publish flow records while no bridge has said
	## :zeek:see:`IoTClass::hello` too, for subscribers of
	## :zeek:see:`IoTClass::records_topic` other than the bridge. By default they are
	## published only while a bridge listens (always in a cluster, whose nodes carry them
	## to the one the bridge is on): turning a record into a Broker message is about half
	## of what the capture costs a busy Zeek, and the final records are kept and published
	## when a bridge says hello anyway.
	option publish_without_bridge: bool = F;

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

	## TLS for the WebSocket server: set ``$cert_file`` and ``$key_file`` (PEM) to serve
	## ``wss://`` only; with ``$enable_peer_verification=T`` and ``$ca_file``, only clients
	## with a certificate that CA signed may connect. See docs/zeek.md.
	const websocket_tls = Cluster::WebSocketTLSOptions() &redef;

	## Final flow records kept (per capture node) until the bridge is done with them, and
	## published again when a bridge says :zeek:see:`IoTClass::hello`; past this many, the
	## oldest is dropped and counted. 0: none is kept. About 2.7 kB each (10 packets, 64 bytes).
	option unacked_max: count = 100000;

	## Live: where the kept records and the windows still open go when Zeek stops, to be read
	## back at the next start (relative to Zeek's working directory; zeekctl keeps a node's
	## ``.state`` across restarts). Empty: they are lost, counted in a warning.
	option spool_file: string = ".state/iotcls-spool.json";

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

	## Names one published flow record in :zeek:see:`IoTClass::ack` and
	## :zeek:see:`IoTClass::shed` (a :zeek:type:`IoTClass::Label` names its record the same
	## way: ``uid``, ``device_mac``, ``device_ip`` and ``ts``, the window start).
	type RecordId: record {
		## The connection's uid.
		uid: string;
		## MAC of the device endpoint, empty when Zeek saw none.
		device_mac: string;
		## Address of the device endpoint.
		device_ip: addr;
		## Time of the window's first packet.
		start: double;
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

	## Decides whether a flow record is published to the bridge (*early*: the early record
	## of a window, else its final record); a handler that breaks keeps it back (for
	## example, devices the operator does not want classified). With the native capture
	## plugin, a handler costs a FlowRecord and an event per record: see
	## :zeek:see:`IoTClass::native_batch`.
	global flow_policy: hook(rec: FlowRecord, early: bool);

	## Zeek to bridge: one ended window of one device endpoint.
	global flow: event(rec: FlowRecord);

	## Zeek to bridge: the early record of a window (a prefix of its final record, which
	## follows on :zeek:see:`IoTClass::flow`).
	global early_flow: event(rec: FlowRecord);

	## Zeek to bridge: packed flow records from the native capture plugin, final and
	## early ones in publishing order, one line of text each (bridge/records.py's packed
	## format; see :zeek:see:`IoTClass::native_batch`).
	global flows: event(recs: vector of string);

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

	## Bridge to Zeek: the label of an early record: for the device log and the notices,
	## not for iot_class.log.
	global early_label: event(l: Label);

	## Bridge to Zeek: the bridge is done with these flow records (each labelled, its label
	## sent before or held back by the log policy, or refused as unusable): Zeek stops
	## keeping them.
	global ack: event(ids: vector of RecordId);

	## Bridge to Zeek: the bridge dropped these flow records unlabelled for *reason*
	## (overload: ``queue_full``, ``label_backlog``...): counted, not published again.
	global shed: event(ids: vector of RecordId, reason: string);

	## Bridge to Zeek: all *records* records received so far are scored and *labels*
	## label events were sent before this event.
	global drained: event(records: count, labels: count);

	## Raised for each iot_class.log entry.
	global log_iot_class: event(rec: Info);
}

event zeek_init() &priority=5
	{
	Log::create_stream(IoTClass::LOG, [$columns=Info, $ev=log_iot_class,
	    $path="iot_class", $policy=log_policy]);
	}

# Where labels are logged: the manager of a cluster, or a standalone Zeek.
function label_node(): bool
	{
	return ! Cluster::is_enabled()
	    || Cluster::local_node_type() == Cluster::MANAGER;
	}

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
	}
