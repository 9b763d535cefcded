##! Which endpoints are devices: by MAC (:zeek:see:`IoTClass::device_macs`), by network
##! (:zeek:see:`IoTClass::device_nets`), else :zeek:see:`Site::local_nets`; group addresses
##! never are (iotcls.flows.DeviceSelector decides the same way for the pcap sensor).

@load base/utils/site
@load ./main

module IoTClass;

export {
	## Whether an endpoint with address *a* and link-layer address *l2* (empty when
	## unknown) is a device. The native capture plugin asks this once per endpoint of each
	## new connection, so the selection lives here only and follows Config::set_value.
	global is_device_endpoint: function(a: addr, l2: string): bool;
}

# Group addresses are never devices.
const multicast_nets: set[subnet] = {
	224.0.0.0/4,
	[ff00::]/8
};

# Directed broadcast addresses of the IPv4 device networks up to /30; recomputed when
# device_nets or Site::local_nets change (Config::set_value, Option::set).
global directed_broadcasts: set[addr] = {};

function broadcasts(nets: set[subnet]): set[addr]
	{
	local out: set[addr] = {};
	for ( n in nets )
		{
		if ( is_v6_subnet(n) || subnet_width(n) > 30 )
			next;

		local size = 1;
		local k = 32 - subnet_width(n);
		while ( k > 0 )
			{
			size = size * 2;
			--k;
			}
		local base = addr_to_counts(subnet_to_addr(n))[0];
		add out[counts_to_addr(vector(base + size - 1))];
		}
	return out;
	}

function nets_changed(ID: string, new_value: set[subnet]): set[subnet]
	{
	if ( ID == "IoTClass::device_nets" )
		directed_broadcasts = broadcasts(|new_value| > 0 ? new_value :
		    Site::local_nets);
	else if ( |device_nets| == 0 )
		directed_broadcasts = broadcasts(new_value);
	return new_value;
	}

function is_device_endpoint(a: addr, l2: string): bool
	{
	if ( l2 != "" && l2 in device_macs )
		return T;
	if ( a in multicast_nets || a == 255.255.255.255 || a in directed_broadcasts )
		return F;
	if ( |device_nets| > 0 )
		return a in device_nets;
	if ( |device_macs| > 0 )
		return F;
	return a in Site::local_nets;
	}

# Where flow records are captured: the workers of a cluster, or a standalone Zeek.
function capture_node(): bool
	{
	return ! Cluster::is_enabled()
	    || Cluster::local_node_type() == Cluster::WORKER;
	}

event zeek_init() &priority=-10
	{
	directed_broadcasts = broadcasts(|device_nets| > 0 ? device_nets :
	    Site::local_nets);
	Option::set_change_handler("IoTClass::device_nets", nets_changed);
	Option::set_change_handler("Site::local_nets", nets_changed);

	for ( m in device_macs )
		if ( to_lower(m) != m )
			Reporter::warning(fmt("iotcls: IoTClass::device_macs entry %s is not lower case and never matches",
			    m));

	if ( capture_node()
	    && |device_macs| == 0
	    && |device_nets| == 0
	    && |Site::local_nets| == 0 )
		Reporter::warning("iotcls: no devices configured: set IoTClass::device_nets, IoTClass::device_macs or Site::local_nets");
	}
