##! Delivery: no flow record is lost when the bridge crashes, its connection drops or Zeek
##! stops. Each final record a capture node publishes is kept (up to
##! :zeek:see:`IoTClass::unacked_max`) until the bridge is done with it: its label came back
##! (:zeek:see:`IoTClass::label`), the bridge acknowledged it (:zeek:see:`IoTClass::ack`: its
##! label was held back by the log policy, or it could not be used) or shed it
##! (:zeek:see:`IoTClass::shed`, counted by reason). A bridge that says
##! :zeek:see:`IoTClass::hello` gets every record still kept published again, oldest first;
##! the bridge drops the ones it already has. Live, the records kept when Zeek stops (and the
##! windows still open then, which ``zeek_done`` flushes) go to
##! :zeek:see:`IoTClass::spool_file`, and the next start reads them back and keeps them again.
##! In a cluster the workers keep what they publish and the label node (the manager) forwards
##! the bridge's acknowledgements and hellos to them.

@load base/frameworks/cluster
@load base/frameworks/input
@load ./main
@load ./devices

module IoTClass;

# One kept record and its place in publishing order: a FlowRecord, or the packed line of
# the native capture (IoTClass::native_batch).
type Kept: record {
	rec: FlowRecord &optional;
	packed: string &optional;
	seq: count;
};

# The kept records, by record_key().
global kept: table[string] of Kept;

# Publishing order of the kept records: seq -> key (acknowledged ones are deleted).
global kept_order: table[count] of string;

# No kept record has a seq below this (the cap drops from here).
global oldest_seq: count = 0;

# The seq of the next record kept.
global next_seq: count = 0;

# Records dropped because unacked_max were kept already.
global dropped_past_cap: count = 0;

# Records the bridge shed, by its reason.
global shed_counts: table[string] of count &default=0;

# Records the bridge acknowledged or labelled.
global acked: count = 0;

# Records published again to a bridge that said hello.
global republished: count = 0;

# Zeek is terminating and writes every record it keeps, and every one published from now
# on, to the spool file.
global spooling = F;

# The spool file, opened at its first record.
global spool: file;

# Whether it is open.
global spool_open = F;

# Records written to the spool file.
global spooled: count = 0;

# Lines of the spool file read at start.
global spool_read: count = 0;

# Those of them that were no record (a torn write): skipped.
global spool_bad: count = 0;

# The spool file read at start has been read to its end (or there was none): a spool
# written now replaces it, else the new records are appended to it.
global spool_loaded = F;

# One line of the spool file: a record, its offsets as seconds (to_json writes intervals
# as rounded text).
type SpoolLine: record {
	rec: FlowRecord;
	offsets_s: vector of double;
};

# One line as the Input framework reads it.
type SpoolText: record {
	s: string;
};

# Label node to capture nodes (a cluster): the bridge is done with the records *keys*
# (*reason*: why it shed them, empty when it acknowledged them).
global forget_keys: event(keys: vector of string, reason: string);

# Label node to capture nodes: a bridge said hello; raised on a capture node too, to
# publish again what it keeps.
global republish: event();

# A spool line, read at start.
global spool_line: event(desc: Input::EventDescription, tpe: Input::Event,
    s: string);

# Whether the n-th of a kind is worth a warning: the 1st, 10th, 100th...
function worth_telling(n: count): bool
	{
	while ( n >= 10 && n % 10 == 0 )
		n = n / 10;
	return n == 1;
	}

# Records the native capture plugin keeps itself (packed, in C++: nothing per record in
# script land). Defined by capture-native.zeek, which reaches the plugin, and by capture.zeek,
# where there is none (the script capture's FlowRecords are kept here).

# Keeps a packed record read back from the spool file: whether the plugin took it.
global native_keep: function(key: string, line: string): bool;

# The bridge is done with *key*: whether the plugin kept it.
global native_forget: function(key: string): bool;

# The packed records the plugin keeps, oldest first.
global native_kept: function(): vector of string;

# Packed records the plugin kept in all, keeps now, dropped past unacked_max.
global native_counts: function(): index_vec;

# How a record is known here: as the bridge names it in IoTClass::ack and a label.
function record_key(uid: string, device_mac: string, device_ip: addr,
    start: double): string
	{
	# %.6f is how Broker's JSON writes a real: the bridge's copy of start prints the same
	return fmt("%s|%s|%s|%.6f", uid, device_mac, device_ip, start);
	}

# The key of a record the bridge names.
function id_key(id: RecordId): string
	{
	return record_key(id$uid, id$device_mac, id$device_ip, id$start);
	}

# Opens the spool file (and makes its directory) for the first record written to it.
function spool_write_open()
	{
	local dir = sub(spool_file, /\/[^\/]*$/, "");
	if ( dir != spool_file && dir != "" && file_size(dir) < 0.0 )
		mkdir(dir);
	# a spool not read to its end yet is kept and appended to
	spool = spool_loaded ? open(spool_file) : open_for_append(spool_file);
	set_buf(spool, F);
	spool_open = T;
	}

# Writes one record to the spool file.
function spool_write(rec: FlowRecord)
	{
	local offs: vector of double = vector();
	for ( i in rec$offsets )
		offs += interval_to_double(rec$offsets[i]);
	local r = copy(rec);
	r$offsets = vector();
	if ( ! spool_open )
		spool_write_open();
	print spool, to_json(SpoolLine($rec=r, $offsets_s=offs));
	++spooled;
	}

# Writes one packed record to the spool file, its line as it is (print would escape its
# tabs; spool_line reads it back).
function spool_write_packed(line: string)
	{
	if ( ! spool_open )
		spool_write_open();
	write_file(spool, line + "\n");
	++spooled;
	}

# Keeps *k* under *key*, the newest, dropping the oldest past unacked_max.
function remember(key: string, k: Kept)
	{
	k$seq = next_seq;
	kept[key] = k;
	kept_order[next_seq] = key;
	++next_seq;
	while ( |kept| > unacked_max )
		{
		while ( oldest_seq !in kept_order )
			++oldest_seq;
		delete kept[kept_order[oldest_seq]];
		delete kept_order[oldest_seq];
		++dropped_past_cap;
		if ( worth_telling(dropped_past_cap) )
			Reporter::warning(fmt("iotcls: %d flow records unacknowledged by the bridge were dropped (IoTClass::unacked_max=%d kept): is the bridge running?",
			    dropped_past_cap, unacked_max));
		}
	}

# Keeps a published final record until the bridge is done with it.
function keep(rec: FlowRecord)
	{
	if ( unacked_max == 0 && ! spooling )
		return;

	local key = record_key(rec$uid, rec$device_mac, rec$device_ip, rec$start);
	if ( key in kept )
		return;

	if ( spooling )
		spool_write(rec);
	else
		remember(key, Kept($rec=rec, $seq=0));
	}

# The bridge is done with the record *key*; *reason*: why it was shed ("" when not).
function forget(key: string, reason: string)
	{
	if ( key in kept )
		{
		delete kept_order[kept[key]$seq];
		delete kept[key];
		}
	else if ( ! native_forget(key) )
		return;

	if ( reason == "" )
		{
		++acked;
		return;
		}

	local n = ++shed_counts[reason];
	if ( worth_telling(n) )
		Reporter::warning(fmt(
		    "iotcls: the bridge shed %d flow records unlabelled (%s)", n,
		    reason));
	}

# The kept records, oldest first.
function kept_records(): vector of Kept
	{
	local seqs: vector of count = vector();
	for ( s in kept_order )
		seqs += s;
	sort(seqs);
	local out: vector of Kept = vector();
	for ( i in seqs )
		out += kept[kept_order[seqs[i]]];
	return out;
	}

# The bridge is done with *ids*: forgotten here (a capture node), forwarded to the capture
# nodes (the label node of a cluster).
function settle(ids: vector of RecordId, reason: string)
	{
	local keys: vector of string = vector();
	for ( i in ids )
		keys += id_key(ids[i]);
	if ( capture_node() )
		{
		for ( i in keys )
			forget(keys[i], reason);
		}
	else if ( label_node() )
		Cluster::publish(Cluster::worker_topic, IoTClass::forget_keys, keys, reason);
	}

event IoTClass::forget_keys(keys: vector of string, reason: string)
	{
	for ( i in keys )
		forget(keys[i], reason);
	}

event IoTClass::ack(ids: vector of RecordId)
	{
	settle(ids, "");
	}

event IoTClass::shed(ids: vector of RecordId, reason: string)
	{
	settle(ids, reason == "" ? "unknown" : reason);
	}

event IoTClass::label(l: Label)
	{
	# on a capture node: its record is done with, even if the bridge's ack never comes
	if ( capture_node() )
		forget(record_key(l$uid, l$device_mac, l$device_ip, l$ts), "");
	}

event IoTClass::hello(bridge: string, endpoint: string) &priority=-5
	{
	if ( Cluster::is_enabled() && ! capture_node() )
		Cluster::publish(Cluster::worker_topic, IoTClass::republish);
	}

# Live only: a trace is read again from its start, not resumed.
function spool_enabled(): bool
	{
	return spool_file != "" && ! reading_traces() && capture_node();
	}

event spool_line(desc: Input::EventDescription, tpe: Input::Event, s: string)
	{
	++spool_read;
	if ( starts_with(s, "F2\t") || starts_with(s, "F\t") )
		{
		# a packed record (keep_packed; F: format version 1): its key from its fields, as
		# record_key() makes it
		local f = split_string(s, /\t/);
		if ( |f| != 17 )
			{
			++spool_bad;
			return;
			}
		local key = fmt("%s|%s|%s|%s", f[15], f[1], f[2], f[7]);
		if ( key !in kept && ! native_keep(key, s) )
			remember(key, Kept($packed=s, $seq=0));
		return;
		}

	local r = from_json(s, SpoolLine);
	if ( ! r$valid )
		{
		++spool_bad;
		return;
		}

	local line = r$v as SpoolLine;

	local rec = line$rec;
	rec$offsets = vector();
	for ( i in line$offsets_s )
		rec$offsets += double_to_interval(line$offsets_s[i]);
	keep(rec);
	}

event Input::end_of_data(name: string, source: string)
	{
	if ( name != "iotcls-spool" )
		return;

	Input::remove(name);
	spool_loaded = T;
	if ( ! unlink(spool_file) )
		Reporter::warning(fmt("iotcls: cannot remove %s: its records will be read again at the next start",
		    spool_file));
	Reporter::info(fmt("iotcls: %d flow records read back from %s, kept until the bridge labels them",
	    spool_read - spool_bad, spool_file));
	if ( spool_bad > 0 )
		Reporter::warning(fmt("iotcls: %d lines of %s are no flow record (a torn write?): skipped",
		    spool_bad, spool_file));
	event IoTClass::republish();
	}

event zeek_init() &priority=-5
	{
	if ( ! spool_enabled() || file_size(spool_file) < 0.0 )
		{
		spool_loaded = T;
		return;
		}

	Input::add_event([$source=spool_file, $name="iotcls-spool",
	    $reader=Input::READER_RAW, $mode=Input::MANUAL, $fields=SpoolText,
	    $ev=spool_line, $want_record=F]);
	}

# First of the zeek_done handlers: the kept records go to the spool file, and so does every
# record published after (capture flushes its open windows in zeek_done).
event zeek_done() &priority=10
	{
	if ( ! spool_enabled() )
		{
		# offline, the drain's own warnings say what was not labelled
		local n_kept = |kept| + native_counts()[1];
		if ( capture_node() && ! reading_traces() && n_kept > 0 )
			Reporter::warning(fmt("iotcls: %d flow records the bridge did not acknowledge are lost at stop (IoTClass::spool_file is empty)",
			    n_kept));
		return;
		}

	spooling = T;
	local ks = kept_records();
	for ( i in ks )
		{
		if ( ks[i]?$rec )
			spool_write(ks[i]$rec);
		else
			spool_write_packed(ks[i]$packed);
		}
	local lines = native_kept();
	for ( i in lines )
		spool_write_packed(lines[i]);
	}

# Raised at the end of zeek_done, so that it comes after the records that zeek_done's
# handlers published (the native plugin's flush raises an event per record).
global delivery_summary: event();

event zeek_done() &priority=-100
	{
	if ( ! capture_node() )
		return;

	# offline, the drain says what matters unless records had to be published again, shed
	# or dropped
	local native = native_counts();
	if ( spooling
	    || ( ! reading_traces() && next_seq + native[0] > 0 )
	    || republished > 0
	    || |shed_counts| > 0
	    || dropped_past_cap + native[2] > 0 )
		event IoTClass::delivery_summary();
	}

# What became of this node's records.
event IoTClass::delivery_summary()
	{
	local n_shed = 0;
	for ( reason, n in shed_counts )
		n_shed += n;
	local native = native_counts();
	local n_kept = next_seq + native[0];
	local n_dropped = dropped_past_cap + native[2];
	local msg = fmt("iotcls: delivery: %d flow records kept until the bridge was done with them (%d published again), %d acknowledged, %d shed by the bridge, %d dropped past IoTClass::unacked_max",
	    n_kept, republished, acked, n_shed, n_dropped);
	if ( spooling )
		msg += fmt(", %d written to %s for the next start", spooled, spool_file);
	Reporter::info(msg);
	}
