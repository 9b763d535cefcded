##! The conversation with the iotcls bridge: flow records published on
##! :zeek:see:`IoTClass::records_topic`, the bridge's :zeek:see:`IoTClass::hello`, labels and
##! :zeek:see:`IoTClass::drained` received on :zeek:see:`IoTClass::labels_topic` through
##! Zeek's WebSocket server. Offline (``zeek -r``) processing is held until the bridge is
##! there and Zeek waits, after the trace, until every record is labelled: both on the wall
##! clock, since network time stands still then. Every final record published is kept until
##! the bridge is done with it, and published again to a bridge that says hello
##! (delivery.zeek).

@load base/frameworks/cluster
@load base/frameworks/input
@load ./main
@load ./devices
@load ./delivery

module IoTClass;

# Flow records published (this node; or kept for a bridge while none listened), and labels
# logged (the label node), since the bridge's last hello: what IoTClass::drain and
# IoTClass::drained compare.
global records_sent: count = 0;
global labels_logged: count = 0;

# The bridge has said hello, and the WebSocket endpoint id it said it with (to tell its
# disconnection from another client's).
global bridge_up = F;
global bridge_endpoint = "";

# Offline: packet processing is suspended until the bridge says hello.
global held = F;

# Offline: the trace has ended and Zeek waits for the bridge's drained.
global draining = F;

type TimerLine: record {
	s: string;
};

global wallclock_fired: event(desc: Input::EventDescription, tpe: Input::Event,
    s: string);

# Wall-clock timeouts (offline): when each ends ("hold", "drain"), and the ticks so far.
global wallclock_deadline: table[string] of time;
global wallclock_ticks = 0;

function node_name(): string
	{
	return Cluster::is_enabled() ? Cluster::node : "standalone";
	}

# Whether a record published now reaches anyone: a bridge has said hello, or a cluster
# carries it to the node the bridge is on. Otherwise it would be turned into a Broker
# message for nobody; the final records are kept, and published when a bridge says hello.
function publishing(): bool
	{
	return bridge_up || Cluster::is_enabled() || publish_without_bridge;
	}

# Publishes one finished flow record, unless a flow_policy handler keeps it back.
function publish_flow(rec: FlowRecord)
	{
	if ( ! hook flow_policy(rec, F) )
		return;

	if ( publishing() )
		Cluster::publish(records_topic, IoTClass::flow, rec);
	++records_sent;
	keep(rec);
	}

# Publishes the early record of a window (not counted: the drain counts final records).
function publish_early(rec: FlowRecord)
	{
	if ( hook flow_policy(rec, T) && publishing() )
		Cluster::publish(records_topic, IoTClass::early_flow, rec);
	}

function listen(): bool
	{
	return Cluster::listen_websocket([$listen_addr=websocket_address,
	    $listen_port=websocket_port, $tls_options=websocket_tls]);
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

# The trace *path* has ended and every window is published: ask the bridge to confirm.
function finish_offline(path: string)
	{
	if ( ! bridge_up && ( bridge_endpoint == "" || ! hold_offline ) )
		{
		Reporter::warning(fmt("iotcls: no bridge connected, %d flow records of %s were not classified",
		    records_sent, path));
		terminate();
		return;
		}

	draining = T;
	if ( ! bridge_up )
		{
		# the bridge went away during the trace: wait for one to come back, whose hello
		# publishes again what is kept, and the drain after it
		Reporter::info(fmt("iotcls: the trace has ended while no bridge is connected: waiting up to %s for one",
		    hold_timeout));
		start_wallclock("drain", hold_timeout + drain_timeout);
		return;
		}

	Cluster::publish(records_topic, IoTClass::drain, records_sent);
	start_wallclock("drain", drain_timeout);
	}

event zeek_init() &priority=-10
	{
	if ( ! label_node() )
		return;

	if ( ! Cluster::subscribe(labels_topic) )
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
		release_hold(fmt("no bridge connected within %s, processing continues: flow records are kept for one (at most IoTClass::unacked_max)",
		    hold_timeout));
	else
		{
		draining = F;
		Reporter::warning(fmt("iotcls: bridge did not confirm %d flow records within %s (%d labels logged), terminating",
		    records_sent, drain_timeout, labels_logged));
		terminate();
		}
	}

event IoTClass::hello(bridge: string, endpoint: string)
	{
	bridge_up = T;
	bridge_endpoint = endpoint;
	records_sent = 0;
	labels_logged = 0;
	Reporter::info(fmt("iotcls: bridge %s connected (%s)", bridge, endpoint));
	Cluster::publish(records_topic, IoTClass::welcome, schema_version, node_name(),
	    window_length, packets, payload_bytes, reading_traces());
	release_hold(fmt("bridge %s connected, processing continues", bridge));
	if ( capture_node() )
		event IoTClass::republish();
	}

# A bridge said hello (or the spool file was read): what it has not acknowledged is
# published again, oldest first (the bridge drops what it has already); while an offline
# drain waits, the drain is asked again too.
event IoTClass::republish()
	{
	if ( ! capture_node() || ( ! Cluster::is_enabled() && ! bridge_up ) )
		return;

	# the FlowRecords kept here, and the packed records kept here (read back from a spool)
	# or by the native capture plugin
	local ks = kept_records();
	local packed = native_kept();
	local n = |ks| + |packed|;
	for ( i in ks )
		{
		if ( ks[i]?$rec )
			Cluster::publish(records_topic, IoTClass::flow, ks[i]$rec);
		else
			packed += ks[i]$packed;
		}
	# 100 to an event, as the plugin batches them
	local batch: vector of string = vector();
	for ( i in packed )
		{
		batch += packed[i];
		if ( |batch| == 100 || i + 1 == |packed| )
			{
			Cluster::publish(records_topic, IoTClass::flows, batch);
			batch = vector();
			}
		}
	records_sent += n;
	republished += n;
	if ( n > 0 )
		Reporter::info(fmt("iotcls: %d flow records the bridge had not acknowledged are published again",
		    n));
	if ( draining )
		Cluster::publish(records_topic, IoTClass::drain, records_sent);
	}

event Cluster::websocket_client_lost(endpoint: Cluster::EndpointInfo,
    code: count, reason: string)
	{
	if ( ! bridge_up || endpoint$id != bridge_endpoint )
		return;

	bridge_up = F;
	Reporter::warning(fmt("iotcls: bridge %s disconnected (code %d): flow records are kept for it until it reconnects (at most IoTClass::unacked_max)",
	    endpoint$id, code));
	}

event IoTClass::label(l: Label)
	{
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
