##! What the labels say per device: ``iot_devices.log``, like Zeek's ``known_*`` logs (one
##! line when a device is first settled, one per device per day, one on every change of its
##! trusted type), and the Notice framework's alerts:
##!
##! * :zeek:enum:`IoTClass::New_Device`: a device got its first label;
##! * :zeek:enum:`IoTClass::Type_Changed`: a device's trusted type changed (how an
##!   impersonating or re-flashed device shows);
##! * :zeek:enum:`IoTClass::Unknown_Device`: a device has stayed without a trusted label
##!   for :zeek:see:`IoTClass::unknown_after`.
##!
##! Each notice sets ``$identifier``, so Zeek's notice suppression applies per device (and per
##! pair of types for Type_Changed). Times are label times (the start of the labelled
##! window): offline runs give the same lines as live ones. Runs where labels are logged:
##! the manager of a cluster, or a standalone Zeek.

@load base/frameworks/logging
@load base/frameworks/notice
@load ./main

module IoTClass;

export {
	## The iot_devices.log stream.
	redef enum Log::ID += { DEVICES_LOG };

	## A default logging policy hook for iot_devices.log.
	global log_policy_devices: Log::PolicyHook;

	redef enum Notice::Type += {
		## A device got its first label.
		New_Device,
		## A device's trusted type changed: :zeek:see:`IoTClass::type_change_labels`
		## trusted labels in a row name a type other than the one it had.
		Type_Changed,
		## A device has had no trusted label for :zeek:see:`IoTClass::unknown_after`
		## (since it was first seen, or since its last trusted label).
		Unknown_Device,
	};

	## How long a device may go without a trusted label before
	## :zeek:enum:`IoTClass::Unknown_Device` (once per such stretch).
	option unknown_after: interval = 10min;

	## Trusted labels in a row of a new type before a device's type counts as changed;
	## a single stray label does not raise :zeek:enum:`IoTClass::Type_Changed`.
	option type_change_labels: count = 3;

	## How long a device that sends nothing is remembered; after that it is new again.
	const device_expire = 7day &redef;

	## One line of iot_devices.log.
	type DeviceInfo: record {
		## Start of the labelled window that decided this line.
		ts: time &log;
		## The device: its MAC, else its address.
		device: string &log;
		## MAC of the device, unset when unknown.
		mac: string &log &optional;
		## Address of the device (as last seen).
		ip: addr &log;
		## Its type: the trusted label, else the latest label.
		label: string &log;
		## Whether *label* is trusted.
		trusted: bool &log;
		## Calibrated probability of the label that decided this line.
		confidence: double &log;
		## Why the latest label is not trusted, unset when it is.
		reason: string &log &optional;
		## Why this line: ``new`` (the device's first line), ``trusted`` (its first
		## trusted type after an untrusted stretch was logged), ``type_changed``,
		## ``unknown`` (no trusted label for unknown_after), ``daily`` (the first label
		## of a new day).
		change: string &log;
		## The trusted type before this line, where it changed.
		previous: string &log &optional;
		## When the device was first labelled.
		first_seen: time &log;
		## Labels of the device so far.
		n_labels: count &log;
		## Model identifier.
		model: string &log;
	};

	## Raised for each iot_devices.log entry.
	global log_iot_devices: event(rec: DeviceInfo);
}

# What the labels so far say about one device.
type DeviceState: record {
	first_seen: time;
	# The latest label.
	last: Label;
	# The trusted type; empty before the first trusted label.
	trusted_label: string &default="";
	# A new trusted type not yet confirmed, and its trusted labels in a row.
	candidate: string &default="";
	candidate_n: count &default=0;
	# Start of the current stretch without a trusted label (unset while trusted).
	untrusted_since: time &optional;
	# The current untrusted stretch was reported (Unknown_Device).
	unknown_noticed: bool &default=F;
	n_labels: count &default=0;
	# Day (UTC) of the device's latest line; empty before its first.
	logged_day: string &default="";
};

# Device key (MAC, else address) -> its state.
global devices: table[string] of DeviceState &read_expire=device_expire;

function day_of(t: time): string
	{
	return strftime("%Y-%m-%d", t);
	}

function log_device(key: string, s: DeviceState, change: string,
    previous: string)
	{
	local l = s$last;
	local trusted = s$trusted_label != "";
	local info = DeviceInfo($ts=double_to_time(l$ts), $device=key, $ip=l$device_ip,
	    $label=trusted ? s$trusted_label : l$label, $trusted=trusted,
	    $confidence=l$confidence,
	    $change=s$logged_day == "" ? "new" : change,
	    $first_seen=s$first_seen, $n_labels=s$n_labels, $model=l$model);
	if ( l$device_mac != "" )
		info$mac = l$device_mac;
	if ( ! l$trusted && l$reason != "" && l$reason != "-" )
		info$reason = l$reason;
	if ( previous != "" )
		info$previous = previous;
	s$logged_day = day_of(info$ts);
	Log::write(DEVICES_LOG, info);
	}

function describe(l: Label): string
	{
	return l$trusted ? fmt("%s (trusted, %.2f)", l$label, l$confidence) : fmt(
	    "%s (untrusted: %s, %.2f)", l$label, l$reason, l$confidence);
	}

event zeek_init() &priority=5
	{
	Log::create_stream(DEVICES_LOG, [$columns=DeviceInfo, $ev=log_iot_devices,
	    $path="iot_devices", $policy=log_policy_devices]);
	}

# Whatever a label says about its device: the device's state, its notices and its lines.
function note_label(l: Label)
	{
	local key = l$device_mac != "" ? l$device_mac : cat(l$device_ip);
	local t = double_to_time(l$ts);
	if ( key !in devices )
		{
		devices[key] = DeviceState($first_seen=t, $last=l, $untrusted_since=t);
		NOTICE([$note=New_Device, $msg=fmt("new device %s (%s): %s", key, l$device_ip,
		    describe(l)), $sub=l$label, $src=l$device_ip,
		    $identifier=key]);
		}

	local s = devices[key];
	local day = day_of(t);
	s$last = l;
	++s$n_labels;
	if ( l$trusted )
		{
		delete s$untrusted_since;
		s$unknown_noticed = F;
		if ( s$trusted_label == "" )
			{
			s$trusted_label = l$label;
			log_device(key, s, "trusted", "");
			return;
			}
		if ( l$label == s$trusted_label )
			s$candidate = "";
		else
			{
			if ( l$label != s$candidate )
				{
				s$candidate = l$label;
				s$candidate_n = 0;
				}
			++s$candidate_n;
			if ( s$candidate_n >= type_change_labels )
				{
				local old = s$trusted_label;
				s$trusted_label = l$label;
				s$candidate = "";
				NOTICE([$note=Type_Changed, $msg=fmt(
				    "device %s (%s) changed type: %s, was %s",
				    key, l$device_ip, describe(l), old),
				    $sub=fmt("%s -> %s", old, l$label),
				    $src=l$device_ip, $identifier=cat(key, "|",
				    old, "|", l$label)]);
				log_device(key, s, "type_changed", old);
				return;
				}
			}
		}
	else
		{
		if ( ! s?$untrusted_since )
			s$untrusted_since = t;
		if ( ! s$unknown_noticed && t - s$untrusted_since >= unknown_after )
			{
			s$unknown_noticed = T;
			NOTICE([$note=Unknown_Device, $msg=fmt(
			    "device %s (%s) has had no trusted label for %s: %s",
			    key, l$device_ip, t - s$untrusted_since, describe(l)),
			    $sub=l$label, $src=l$device_ip, $identifier=key]);
			log_device(key, s, "unknown", "");
			return;
			}
		}

	if ( s$logged_day != "" && s$logged_day != day )
		log_device(key, s, "daily", "");
	}

event IoTClass::label(l: Label) &priority=-5
	{
	note_label(l);
	}

# An early label counts for the device as a final one does: a device's first label and a
# change of its trusted type are known as soon as they are decided.
event IoTClass::early_label(l: Label) &priority=-5
	{
	note_label(l);
	}

# Every device labelled gets a line, also one that never settled before the end.
event zeek_done()
	{
	for ( key, s in devices )
		if ( s$logged_day == "" )
			log_device(key, s, "new", "");
	}
