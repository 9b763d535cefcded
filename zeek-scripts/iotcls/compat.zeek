##! What differs between the Zeek versions iotcls supports (8.0 LTS and 8.2) and between
##! their cluster backends, in one place. Everything else in the package is written against
##! the API both versions share.

@load base/misc/version
@load base/frameworks/cluster

@if ( Version::number < 80000 )
event zeek_init() &priority=100
	{
	Reporter::fatal(fmt("iotcls needs Zeek 8.0 or later, this is %s",
	    Version::info$version_string));
	}
@endif

# Zeek 8.1+ starts standalone with no cluster backend (CLUSTER_BACKEND_NONE); its WebSocket
# server then accepts clients but never acknowledges their subscriptions. Load Broker's
# backend, which every build has (8.0 has no NONE: Broker is its default). Load another
# backend *before* iotcls to use that one instead.
@ifdef ( Cluster::CLUSTER_BACKEND_NONE )
@if ( Cluster::backend == Cluster::CLUSTER_BACKEND_NONE )
@load frameworks/cluster/backend/broker
@endif
@endif

# ZeroMQ: the XPUB/XSUB proxy runs on a cluster's manager only; a standalone Zeek with the
# ZeroMQ backend has none, and then never acknowledges WebSocket clients (seen on 8.2.2).
@ifdef ( Cluster::Backend::ZeroMQ::run_proxy_thread )
@if ( ! Cluster::is_enabled() )
redef Cluster::Backend::ZeroMQ::run_proxy_thread = T;
@endif
# On 8.0, loading the backend loads only its main.zeek: starting the proxy thread and
# Cluster::init() live in connect.zeek (8.1 moved both into main.zeek and deprecated
# connect.zeek). Without it no node of a ZeroMQ cluster, standalone or not, connects.
@if ( Version::number < 80100 )
@load frameworks/cluster/backend/zeromq/connect
@endif
@endif
