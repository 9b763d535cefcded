##! Flow records from the native capture plugin (zeek-plugin/, ``IoTClass::Capture``): an
##! analyzer on each connection with a device endpoint keeps the windows in C++ exactly as
##! capture.zeek does in script land, and raises one :zeek:see:`IoTClass::native_flow` per
##! finished record (and one :zeek:see:`IoTClass::native_early_flow` per early record), or,
##! by default, packs them and raises one :zeek:see:`IoTClass::native_flows` per
##! :zeek:see:`IoTClass::native_batch` records. Nothing runs per packet in script land,
##! and UDP contents are not turned on for every connection.

@load ./main
@load ./devices
@load ./delivery
@load ./bridge

module IoTClass;

export {
	## Plugin to script: one finished flow record.
	global native_flow: event(rec: FlowRecord);

	## Plugin to script: the early record of a window (with
	## :zeek:see:`IoTClass::early_records`).
	global native_early_flow: event(rec: FlowRecord);

	## Plugin to script: packed records, final and early, in publishing order; *keys*:
	## each final record's delivery key (record_key() in delivery.zeek), "" for an early
	## one; *finals*: how many final records the batch stands for. While nobody would
	## receive them (see :zeek:see:`IoTClass::publish_without_bridge`), the plugin
	## keeps the final records, sends only their count, and makes no early ones.
	global native_flows: event(recs: vector of string, keys: vector of string,
	    finals: count);
}

# Raised after the plugin's flush: every record of the trace is published before the drain.
global native_flushed: event(path: string);

event zeek_init()
	{
	if ( capture_node() )
		{
		if ( IoTClass::__native_packing() )
			Reporter::info(fmt("iotcls: capture in the native plugin (IoTClass::Capture): flow records packed, one script event per %d",
			    native_batch));
		else
			Reporter::info("iotcls: capture in the native plugin (IoTClass::Capture): one script event per flow record (IoTClass::native_batch is 0, or an IoTClass::flow_policy handler takes each)");
		}
	}

# delivery.zeek's window on the records the plugin keeps.
function native_keep(key: string, line: string): bool
	{
	return IoTClass::__native_keep(key, line);
	}

function native_forget(key: string): bool
	{
	return IoTClass::__native_forget(key);
	}

function native_kept(): vector of string
	{
	return IoTClass::__native_unacked();
	}

function native_counts(): index_vec
	{
	return IoTClass::__native_delivery();
	}

# Packed records published while Zeek stops (*keys*: their record_key(), "" for an early
# record): the final ones go to the spool file. Before, the plugin keeps them itself.
function spool_packed(recs: vector of string, keys: vector of string)
	{
	for ( i in keys )
		{
		if ( keys[i] != "" )
			spool_write_packed(recs[i]);
		}
	}

event IoTClass::native_flow(rec: FlowRecord)
	{
	publish_flow(rec);
	}

event IoTClass::native_early_flow(rec: FlowRecord)
	{
	publish_early(rec);
	}

event IoTClass::native_flows(recs: vector of string, keys: vector of string,
    finals: count)
	{
	if ( |recs| > 0 && publishing() )
		Cluster::publish(records_topic, IoTClass::flows, recs);
	records_sent += finals;
	# the plugin keeps the final ones until the bridge is done with them (delivery.zeek)
	if ( spooling )
		spool_packed(recs, keys);
	}

event Pcap::file_done(path: string)
	{
	if ( ! capture_node() )
		return;

	IoTClass::__native_flush();
	event IoTClass::native_flushed(path);
	}

event IoTClass::native_flushed(path: string)
	{
	if ( label_node() )
		finish_offline(path);
	}

event zeek_done()
	{
	if ( capture_node() )
		IoTClass::__native_flush();
	}
