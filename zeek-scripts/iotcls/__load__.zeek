##! iotcls: flow records of device connections go to the iotcls bridge over Zeek's
##! WebSocket API; its labels come back and go to iot_class.log, with a per-device summary in
##! iot_devices.log and notices for new, changed and unknown devices.
##!
##! One file per concern, loaded in this order:
##!
##! * compat: what differs between the supported Zeek versions and cluster backends
##! * main: the exported API (options, records, events) and iot_class.log
##! * devices: which endpoints are devices
##! * delivery: records kept until the bridge is done with them, published again to a bridge
##!   that says hello, spooled to disk when Zeek stops
##! * bridge: publishing records, the offline hold and drain, the bridge's events
##! * capture-native or capture: per-connection windows, by the native plugin where it is
##!   loaded (zeek-plugin/, C++, nothing per packet in script land), else from packet events
##! * inventory: iot_devices.log and the notices

# One copy only: a second one (zkg's site/packages/iotcls beside ``iotcls zeek-install``'s
# site/iotcls, say) would define everything twice. It says so and stands back.
@ifndef ( IoTClass::package_dir )
@load ./compat
@load ./main
@load ./devices
@load ./delivery
@load ./bridge
@ifdef ( IoTClass::__native_flush )
@load ./capture-native
@else
@load ./capture
@endif
@load ./inventory
@else
event zeek_init()
	{
	Reporter::warning(fmt("iotcls: loaded twice, from %s and from %s: the second copy is ignored; remove one (zkg remove iotcls, or rm -r the site/iotcls that iotcls zeek-install wrote)",
	    IoTClass::package_dir, @DIR));
	}
@endif
