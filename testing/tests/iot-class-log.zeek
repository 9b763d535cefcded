# Labels from the bridge become iot_class.log lines (the columns of iotcls/logschema.py, which
# testing/Scripts/check-log-columns compares them with): a trusted one, and an untrusted one
# with its reason and no MAC.
# @TEST-EXEC: zeek -b $PACKAGE %INPUT
# @TEST-EXEC: btest-diff iot_class.log
# @TEST-EXEC: check-log-columns iot_class.log $LOGSCHEMA

redef IoTClass::websocket_listen = F;

event zeek_init() &priority=-20
	{
	event IoTClass::label(IoTClass::Label($ts=1700000000.25, $uid="CabcDEF1",
	    $orig_h=10.0.0.2, $orig_p=41000/tcp, $resp_h=192.0.2.10,
	    $resp_p=443/tcp, $device_mac="02:00:00:00:00:02",
	    $device_ip=10.0.0.2, $label="camera", $confidence=0.97,
	    $strategy="sequence", $n_flows=3, $trusted=T, $reason="-",
	    $top_groups=vector("payload", "sizes"),
	    $model="default-model@abc"));
	event IoTClass::label(IoTClass::Label($ts=1700000001.5, $uid="CabcDEF2",
	    $orig_h=10.0.0.3, $orig_p=123/udp, $resp_h=192.0.2.20,
	    $resp_p=123/udp, $device_mac="", $device_ip=10.0.0.3, $label="plug",
	    $confidence=0.41, $strategy="sequence", $n_flows=1, $trusted=F,
	    $reason="low_confidence", $top_groups=vector(),
	    $model="default-model@abc"));
	}
