// SPDX-License-Identifier: BSD-3-Clause
//
// Flow-record windows of device connections, kept in C++ instead of in script land.
//
// zeek-scripts/iotcls/capture.zeek is the specification: per connection key, one window
// of at most IoTClass::window_length records its first IoTClass::packets packets (offset,
// IP length, direction, first payload bytes) and counts all of them; a packet at or after
// start + window_length publishes the window and opens the next one; a window whose
// connection ended first is parked by its unordered endpoints, continued by a later
// connection with the same endpoints, else published when it ends; at the trace's end every
// window is published. Each published window becomes one record per device side. Packed
// (bridge/records.py's packed format: one line of text per record), they leave in batches of
// IoTClass::native_batch records, one IoTClass::native_flows event per batch, so that script
// land and Broker's conversion cost next to nothing per record; where IoTClass::flow_policy
// has handlers (they take a FlowRecord) or native_batch is 0, each record is an
// IoTClass::FlowRecord raised as IoTClass::native_flow. Before that, a window's early record (its first
// packets, or what it holds once idle for IoTClass::early_idle; iotcls/schema.py's
// early_cut) is raised as IoTClass::native_early_flow. The pcap sensor (iotcls/flows.py)
// builds the same records.
//
// Which endpoints are devices is not decided here: IoTClass::is_device_endpoint (script
// land) is asked once per endpoint of each new connection, so Config::set_value changes and
// Site::local_nets apply as they do for the script capture.

#pragma once

#include <zeek/Conn.h>
#include <zeek/EventHandler.h>
#include <zeek/Func.h>
#include <zeek/ID.h>
#include <zeek/IP.h>
#include <zeek/IPAddr.h>
#include <zeek/Type.h>
#include <zeek/Val.h>
#include <zeek/ZVal.h>
#include <zeek/zeek-version.h>
#include <cstdint>
#include <deque>
#include <memory>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace plugin::IoTClass_Capture {

/**
 * One window of one connection key: what capture.zeek's IoTClass::State holds. Shared by
 * the mirrored records of a device-to-device connection.
 */
struct Window {
    // Endpoints, oriented like the connection the window's packets currently belong to.
    zeek::IPAddr orig_h;
    zeek::IPAddr resp_h;
    uint32_t orig_p = 0; // host order; ICMP: type
    uint32_t resp_p = 0; // host order; ICMP: code
    bool orig_dev = false;
    bool resp_dev = false;
    std::string orig_mac; // device MAC for the record: "" when none or a group MAC
    std::string resp_mac;
    std::string uid;
    uint32_t proto = 0; // IP protocol number

    double start = 0.0; // the window's first packet (the connection's start for the first)
    double last = 0.0;  // the window's latest packet
    uint64_t pkts = 0;
    uint64_t bytes = 0;

    // The recorded packets, at most IoTClass::packets of them, their payloads one after
    // the other in payload_data (raw bytes; hex in a FlowRecord, base64 in a packed line):
    // two buffers a window, not four vectors and a string per packet.
    struct Recorded {
        double offset;
        uint32_t size;
        uint32_t payload_end; // where its payload ends in payload_data
        bool from_orig;       // sent by orig_h
    };
    std::vector<Recorded> recorded;
    std::string payload_data;

    /** The payload of recorded packet *i* (empty once the window is published). */
    std::string_view Payload(size_t i) const {
        uint32_t begin = i ? recorded[i - 1].payload_end : 0;
        uint32_t end = recorded[i].payload_end;
        return end <= payload_data.size() ? std::string_view(payload_data).substr(begin, end - begin) :
                                            std::string_view();
    }

    // Script values of the fields above, made for the first record that needs them and
    // shared by the window's later records (Flip() swaps them, a new uid drops uid_val).
    zeek::AddrValPtr orig_h_val;
    zeek::AddrValPtr resp_h_val;
    zeek::StringValPtr orig_mac_val;
    zeek::StringValPtr resp_mac_val;
    zeek::StringValPtr uid_val;

    bool done = false;       // published for good (trace end); later packets wait for a roll
    bool mac_split = false;  // see ConnCapture::ByMac()
    bool early_sent = false; // the early record is out, or will not be due

    /** Swaps the roles of the endpoints (a flipped or restarted connection). */
    void Flip();

    /** Restarts the window at time *t* (after it was published). */
    void Reset(double t);

    /** Sets the uid of the connection the window's packets belong to. */
    void SetUID(std::string arg_uid) {
        if ( arg_uid != uid ) {
            uid = std::move(arg_uid);
            uid_val = nullptr;
        }
    }
};

using WindowPtr = std::shared_ptr<Window>;

/**
 * The capture state of one device connection (capture.zeek's ``c$iotcls`` and, for a
 * mac_split connection, its ``split`` entries). Fed by the analyzer or tap analyzer that
 * HookSetupAnalyzerTree() attached to the connection.
 */
class ConnCapture {
public:
    ConnCapture(zeek::Connection* conn, WindowPtr w, const std::string& orig_l2);
    ~ConnCapture();

    ConnCapture(const ConnCapture&) = delete;
    ConnCapture& operator=(const ConnCapture&) = delete;

    /**
     * One packet of the connection (each packet that raises ``new_packet``).
     *
     * @param t the packet's own timestamp (get_current_packet_ts(), not network time).
     * @param ip its IP header.
     * @param l2_src its link-layer source address, or null.
     * @param payload the bytes a payload is cut from: the transport payload (TCP, UDP) or
     * the IP payload (other IP protocols); null where none is recorded (ICMP, and packets
     * Zeek's transport analyzers skip, for which the script's tcp_packet/udp_contents never
     * come).
     * @param len the number of bytes at *payload*.
     */
    void Packet(double t, const zeek::IP_Hdr* ip, const u_char* l2_src, const u_char* payload, int len);

    /** The connection ends: publish or park its windows. */
    void Done();

    /** The trace ended: publish every window (they stay, marked done). */
    void Flush();

private:
    friend class Recorder;

    // Orients *w* by the connection, which Zeek may have flipped since.
    void Orient(Window& w) const;

    // The window of the device that sent the current packet of a mac_split connection.
    Window* ByMac(const u_char* l2_src, double t);

    zeek::Connection* conn;
    WindowPtr cur; // capture.zeek's c$iotcls
    bool dhcp;     // UDP with port 67 or 68 on either side

    // mac_split: windows by source MAC, as Zeek formats it; the first is keyed by the
    // originator's l2 address even when that is a group MAC.
    std::unordered_map<std::string, WindowPtr> split;

    // Intrusive list of live connections, for Recorder::Flush().
    ConnCapture* prev = nullptr;
    ConnCapture* next = nullptr;
    bool linked = false;
};

/**
 * Plugin-wide state: the script-land handles (options, is_device_endpoint, the record
 * type, native_flow), the parked windows and the live connections.
 */
class Recorder {
public:
    /** Looks up the package's script-land pieces; without them nothing is captured. */
    void InitPostScript();

    /** Attaches capture to a new connection when it has a device endpoint. */
    void Attach(zeek::Connection* conn);

    /** Network time advanced to *t*: publish parked windows that have ended. */
    void Advance(double t);

    /** Publishes every open and parked window; returns the number of records raised. */
    uint64_t Flush();

    /** Publishes *w* (one record per device side) unless already done or empty, after
     * its early record where it has one. */
    void Emit(Window& w);

    /** Raises IoTClass::native_flows with the packed records waiting, if any. */
    void SendBatch();

    // Delivery (delivery.zeek) of packed final records: each is kept here by its key until
    // the bridge is done with it, at most IoTClass::unacked_max of them (the oldest go first,
    // counted), so that script land does nothing per record to keep it.

    /** Keeps *line* under *key* (unless kept already or IoTClass::unacked_max is 0);
     * whether it is kept. */
    bool Keep(std::string key, std::string line);

    /** The bridge is done with *key*: whether it was kept. */
    bool Forget(const std::string& key);

    /** The kept lines, oldest first. */
    std::vector<std::string> Unacked() const;

    /** Records kept in all, kept now, and dropped past IoTClass::unacked_max. */
    uint64_t KeptTotal() const { return kept_total; }
    uint64_t KeptNow() const { return unacked.size(); }
    uint64_t Dropped() const { return dropped; }

    /** A new window: whether it will have an early record. */
    void AwaitEarly(Window& w) const { w.early_sent = ! EarlyRecords(); }

    /** Whether *w* has an early record not published yet (capture.zeek's early_exists()). */
    bool EarlyExists(const Window& w) const;

    /** Whether the early record of *w* is due at time *t* (capture.zeek's early_due()). */
    bool EarlyDue(const Window& w, double t) const;

    /** Publishes the early record of *w*: the window as it stands. */
    void EmitEarly(Window& w);

    /** *w* recorded a packet: publish its early record if that completed it, else note when
     * it will be due if no packet comes. */
    void Recorded(const WindowPtr& w);

    /** A connection whose window has not ended is gone: keep the window for a successor. */
    void Park(const WindowPtr& w, TransportProto transport);

    void Link(ConnCapture* c);
    void Unlink(ConnCapture* c);

    // Current option values (Config::set_value may change them at any time).
    double WindowLength() const { return window_length->GetVal()->AsInterval(); }
    uint64_t Packets() const { return packets->GetVal()->AsCount(); }
    uint64_t PayloadBytes() const { return payload_bytes->GetVal()->AsCount(); }
    uint64_t DhcpPayloadBytes() const { return dhcp_payload_bytes->GetVal()->AsCount(); }
    bool MacListed(const std::string& mac) const;
    bool MacsListed() const;
    bool EarlyRecords() const { return early_records && early_records->GetVal()->AsBool(); }
    double EarlyIdle() const { return early_idle ? early_idle->GetVal()->AsInterval() : 0.0; }
    uint64_t BatchSize() const { return packable ? native_batch->GetVal()->AsCount() : 0; }
    double BatchDelay() const { return native_batch_delay->GetVal()->AsInterval(); }

    bool TraceDone() const { return trace_done; }

    /** Whether the iotcls package is loaded, so that there is anything to capture for. */
    bool Ready() const { return ready; }

private:
    bool IsDevice(const zeek::IPAddr& a, const std::string& l2);
    bool CaptureNode();
    // Whether published records reach anyone now (bridge.zeek's publishing()).
    bool Publishing();
    // One record of *w* out: packed into the batch, or raised as a FlowRecord event.
    void Out(Window& w, bool dev_is_orig, bool early);
    void Raise(const zeek::EventHandlerPtr& ev, Window& w, bool dev_is_orig);
    // *wanted*: whether anyone takes the batch's lines (a bridge listens, or Zeek flushes
    // its windows at the end, when they may go to the spool); else a final record is only
    // kept, and counted in the batch.
    void Pack(const Window& w, bool dev_is_orig, bool early, bool wanted);
    std::string ParkKey(const Window& w, TransportProto transport) const;

    bool ready = false;
    int capture_node = -1; // unknown until the first connection

    // publishing()'s last answer, and the network time it was asked at.
    bool publishing = true;
    double publishing_asked = -1.0;

    zeek::detail::IDPtr window_length;
    zeek::detail::IDPtr packets;
    zeek::detail::IDPtr payload_bytes;
    zeek::detail::IDPtr dhcp_payload_bytes;
    zeek::detail::IDPtr device_macs;
    zeek::detail::IDPtr device_nets;
    zeek::detail::IDPtr local_nets;
    zeek::detail::IDPtr early_records;
    zeek::detail::IDPtr early_idle;
    zeek::FuncPtr is_device_endpoint;
    zeek::FuncPtr capture_node_func;
    zeek::FuncPtr publishing_func;
    zeek::EventHandlerPtr native_flow;
    zeek::EventHandlerPtr native_early_flow;
    zeek::EventHandlerPtr native_flows;
    zeek::detail::IDPtr native_batch;
    zeek::detail::IDPtr native_batch_delay;
    zeek::detail::IDPtr unacked_max;

    // Kept packed records by key, and their keys in keeping order (an entry whose key was
    // forgotten or kept again since is stale, skipped, and compacted away now and then).
    struct Kept {
        uint64_t seq;
        std::string line;
    };
    std::unordered_map<std::string, Kept> unacked;
    std::deque<std::pair<uint64_t, std::string>> unacked_order;
    uint64_t kept_total = 0;
    uint64_t dropped = 0;

    // Whether records may travel packed: native_flows is handled and no flow_policy handler
    // needs a FlowRecord.
    bool packable = false;

    // Packed records waiting for the next native_flows event, in publishing order, with the
    // delivery key of each final record ("" for an early one: delivery.zeek's record_key()),
    // and the network time the oldest of them was added.
    std::vector<std::string> batch;
    std::vector<std::string> batch_keys;
    uint64_t batch_records = 0; // in the batch, with lines or (final ones nobody takes) without
    uint64_t batch_finals = 0;
    double batch_since = 0.0;
    bool flushing = false;     // in Flush(): every record is wanted
    std::vector<char> scratch; // where Pack() writes a line, sized for the longest so far
    zeek::RecordTypePtr flow_record;
    zeek::VectorTypePtr interval_vec;
    zeek::VectorTypePtr count_vec;
    zeek::VectorTypePtr string_vec;

    // FlowRecord field offsets.
    int f_device_mac, f_device_ip, f_device_port, f_remote_ip, f_remote_port, f_proto, f_start, f_last, f_total_bytes,
        f_total_packets, f_offsets, f_sizes, f_directions, f_payloads, f_uid, f_device_is_orig;

    // endpoint record: l2_addr.
    int f_conn_orig = -1, f_conn_resp = -1, f_endp_l2 = -1;

    // Parked windows by unordered endpoints, and when each ends (earliest first); an entry
    // whose window was taken over or replaced since is skipped.
    struct Parked {
        WindowPtr w;
    };
    struct Expiry {
        double at;
        double start;
        std::string key;
        bool operator>(const Expiry& o) const { return at > o.at; }
    };
    std::unordered_map<std::string, Parked> parked;
    std::priority_queue<Expiry, std::vector<Expiry>, std::greater<Expiry>> expiries;

    // Windows whose early record falls due at a network time unless a packet comes first
    // (capture.zeek's early_sweep, which runs every early_idle); an entry is stale once its
    // window recorded another packet, was published or is gone.
    struct IdleEntry {
        double at;
        double last;
        std::weak_ptr<Window> w;
        bool operator>(const IdleEntry& o) const { return at > o.at; }
    };
    std::priority_queue<IdleEntry, std::vector<IdleEntry>, std::greater<IdleEntry>> idle;

    // IoTClass::is_device_endpoint()'s answers by endpoint (address and l2_addr), valid
    // while the options it reads keep their values (Option::set replaces a value; holding
    // them keeps a replaced one from coming back at the same address).
    std::unordered_map<std::string, bool> devices;
    zeek::ValPtr devices_macs, devices_nets, devices_local;

    ConnCapture* live = nullptr; // head of the list of live connections
    bool trace_done = false;
    uint64_t raised = 0;
};

extern Recorder recorder;

} // namespace plugin::IoTClass_Capture
