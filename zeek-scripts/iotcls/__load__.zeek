##! iotcls: IoT device classification beside Zeek. Load with ``zeek -i eth0 iotcls`` (after
##! ``iotcls zeek-install``) or ``@load iotcls`` in local.zeek; see docs/zeek.md.
@load ./main
