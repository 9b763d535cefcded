##! iotcls: flow records of device connections go to the iotcls bridge over Zeek's
##! WebSocket API; its labels come back and go to iot_class.log, with a per-device summary in
##! iot_devices.log and notices for new, changed and unknown devices.
##!
##! One file per concern, loaded in this order:
##!
##! * compat: what differs between the supported Zeek versions and cluster backends
##! * main: the exported API (options, records, events) and iot_class.log
##! * devices: which endpoints are devices
##! * bridge: publishing records, the offline hold and drain, the bridge's events
##! * capture: per-connection windows, from packet events
##! * inventory: iot_devices.log and the notices

@load ./compat
@load ./main
@load ./devices
@load ./bridge
@load ./capture
@load ./inventory
