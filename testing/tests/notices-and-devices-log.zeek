# The device summary and the notices, from labels as the bridge sends them:
# 02:..:02 starts untrusted, settles as camera (New_Device, one "new" line), then three trusted
# plug labels in a row (Type_Changed, a "type_changed" line; one or two stray labels would
# not do);
# 02:..:03 stays untrusted for more than unknown_after (Unknown_Device, its first line says
# so); 02:..:04 is labelled on two days (a "daily" line); 02:..:05 gets a single untrusted
# label (its line is written when Zeek ends).
# @TEST-EXEC: zeek -b $PACKAGE %INPUT
# @TEST-EXEC: btest-diff iot_devices.log
# @TEST-EXEC: zeek-cut note msg sub src <notice.log >notices
# @TEST-EXEC: btest-diff notices

redef IoTClass::websocket_listen = F;

function lab(ts: double, mac: string, ip: addr, label: string, conf: double,
    trusted: bool)
	{
	event IoTClass::label(IoTClass::Label($ts=ts, $uid="C1", $orig_h=ip,
	    $orig_p=1000/tcp, $resp_h=192.0.2.1, $resp_p=443/tcp,
	    $device_mac=mac, $device_ip=ip, $label=label, $confidence=conf,
	    $strategy="sequence", $n_flows=1, $trusted=trusted,
	    $reason=trusted ? "-" : "low_confidence", $top_groups=vector(),
	    $model="m@1"));
	}

event zeek_init() &priority=-20
	{
	local t = 1700000000.0;
	lab(t, "02:00:00:00:00:02", 10.0.0.2, "plug", 0.4, F);
	lab(t + 10, "02:00:00:00:00:02", 10.0.0.2, "camera", 0.98, T);
	lab(t + 20, "02:00:00:00:00:02", 10.0.0.2, "camera", 0.99, T);
	lab(t + 30, "02:00:00:00:00:02", 10.0.0.2, "plug", 0.97, T);
	lab(t + 40, "02:00:00:00:00:02", 10.0.0.2, "camera", 0.99, T);
	lab(t + 50, "02:00:00:00:00:02", 10.0.0.2, "plug", 0.97, T);
	lab(t + 60, "02:00:00:00:00:02", 10.0.0.2, "plug", 0.98, T);
	lab(t + 70, "02:00:00:00:00:02", 10.0.0.2, "plug", 0.99, T);
	lab(t, "02:00:00:00:00:03", 10.0.0.3, "hub", 0.3, F);
	lab(t + 300, "02:00:00:00:00:03", 10.0.0.3, "hub", 0.35, F);
	lab(t + 700, "02:00:00:00:00:03", 10.0.0.3, "bulb", 0.38, F);
	lab(t, "02:00:00:00:00:04", 10.0.0.4, "speaker", 0.99, T);
	lab(t + 86400, "02:00:00:00:00:04", 10.0.0.4, "speaker", 0.99, T);
	lab(t + 5, "02:00:00:00:00:05", 10.0.0.5, "kettle", 0.2, F);
	}
