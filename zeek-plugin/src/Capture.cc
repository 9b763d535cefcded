// SPDX-License-Identifier: BSD-3-Clause
//
// See Capture.h for what this implements and why.

#include "Capture.h"

#include <netinet/tcp.h>
#include <zeek/Event.h>
#include <zeek/EventRegistry.h>
#include <zeek/Reporter.h>
#include <zeek/RunState.h>
#include <zeek/analyzer/Analyzer.h>
#include <zeek/analyzer/Manager.h>
#include <zeek/iosource/Packet.h>
#include <zeek/packet_analysis/protocol/ip/SessionAdapter.h>
#include <zeek/packet_analysis/protocol/tcp/TCPSessionAdapter.h>
#include <algorithm>
#include <charconv>
#include <cinttypes>
#include <chrono>
#include <cmath>
#include <cstring>

namespace plugin::IoTClass_Capture {

Recorder recorder;

namespace {

// The analyzer component's name (zeek -NN lists it; Analyzer::disable_analyzer takes
// Analyzer::ANALYZER_IOTCLASS_CAPTURE).
constexpr const char* ANALYZER_NAME = "IoTClass_Capture";

const zeek::IPAddr unspecified_v4("0.0.0.0");
const zeek::IPAddr unspecified_v6("::");

// A MAC as Zeek writes l2_addr: lower-case hex pairs joined by colons.
std::string format_mac(const u_char* m) {
    static const char hex[] = "0123456789abcdef";
    std::string s(17, ':');
    for ( int i = 0; i < 6; ++i ) {
        s[i * 3] = hex[m[i] >> 4];
        s[i * 3 + 1] = hex[m[i] & 0x0f];
    }
    return s;
}

// The device MAC a record carries: empty for a group (multicast, broadcast) address, whose
// first octet has its low bit set (devices.zeek's device_mac()).
std::string device_mac(const std::string& l2) {
    if ( l2.size() < 2 || std::strchr("13579bdf", l2[1]) )
        return "";
    return l2;
}

// Payload bytes as the record carries them: lower-case hex (bytestring_to_hexstr()),
// written straight into the string value's buffer.
zeek::StringValPtr hex_val(std::string_view bytes) {
    static const char hex[] = "0123456789abcdef";
    auto n = bytes.size() * 2;
    auto* buf = new u_char[n + 1];
    for ( size_t i = 0; i < bytes.size(); ++i ) {
        auto b = static_cast<unsigned char>(bytes[i]);
        buf[i * 2] = hex[b >> 4];
        buf[i * 2 + 1] = hex[b & 0x0f];
    }
    buf[n] = 0;
    return zeek::make_intrusive<zeek::StringVal>(new zeek::String(true, buf, static_cast<int>(n)));
}

// IP protocols whose payload the script capture never records: ICMP (no payload event), and
// 0, a protocol Zeek did not say.
bool payload_free(uint32_t proto) { return proto == 0 || proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6; }

// A connection's endpoints without direction, plus its transport: what capture.zeek's
// flow_key() makes of a conn_id ("addr|port/proto" twice, in order).
std::string park_key(const zeek::IPAddr& a, uint32_t ap, const zeek::IPAddr& b, uint32_t bp, TransportProto transport) {
    uint32_t ab[4];
    uint32_t bb[4];
    a.CopyIPv6(ab);
    b.CopyIPv6(bb);
    int c = std::memcmp(ab, bb, sizeof(ab));
    bool swap = c > 0 || (c == 0 && ap > bp);

    std::string k;
    k.reserve(2 * (sizeof(ab) + sizeof(ap)) + 1);
    auto put = [&k](const uint32_t* addr, uint32_t port) {
        k.append(reinterpret_cast<const char*>(addr), 16);
        k.append(reinterpret_cast<const char*>(&port), sizeof(port));
    };
    put(swap ? bb : ab, swap ? bp : ap);
    put(swap ? ab : bb, swap ? ap : bp);
    k.push_back(static_cast<char>(transport));
    return k;
}

/**
 * Feeds a connection's packets to its ConnCapture as a child of the session adapter, the
 * way ConnSize counts them: used on Zeek 8.0 for every transport, and for connections of
 * other IP protocols (IGMP, ...) on every version (their session adapter has no taps).
 */
class CaptureAnalyzer final : public zeek::analyzer::Analyzer {
public:
    CaptureAnalyzer(zeek::Connection* c, WindowPtr w, const std::string& orig_l2)
        : Analyzer(ANALYZER_NAME, c), capture(c, std::move(w), orig_l2), transport(c->ConnTransport()) {}

    void Done() override {
        capture.Done();
        Analyzer::Done();
    }

protected:
    void DeliverPacket(int len, const u_char* data, bool is_orig, uint64_t seq, const zeek::IP_Hdr* ip,
                       int caplen) override;

private:
    ConnCapture capture;
    TransportProto transport;
};

void CaptureAnalyzer::DeliverPacket(int len, const u_char* data, bool is_orig, uint64_t seq, const zeek::IP_Hdr* ip,
                                    int caplen) {
    Analyzer::DeliverPacket(len, data, is_orig, seq, ip, caplen);

    // The packet's own timestamp and source MAC, as get_current_packet_ts() and
    // get_current_packet_header() give them to the script capture.
    const zeek::Packet* pkt = zeek::run_state::current_pkt;
    double t = pkt ? pkt->time : zeek::run_state::current_timestamp;
    const u_char* l2_src = pkt ? pkt->l2_src : nullptr;

    switch ( transport ) {
        case TRANSPORT_TCP:
            // TCPSessionAdapter hands its packet children the segment's payload, the
            // bytes tcp_packet carries.
            capture.Packet(t, ip, l2_src, data, len);
            break;

        case TRANSPORT_UDP:
            // The UDP analyzer forwards the datagram's payload, the bytes udp_contents
            // carries (only once its checksum passed).
            capture.Packet(t, ip, l2_src, data, len);
            break;

        case TRANSPORT_ICMP: capture.Packet(t, ip, l2_src, nullptr, 0); break;

        default: {
            // Other IP protocols: the script capture cuts the raw IP payload, after the
            // IPv4 header or the fixed IPv6 header (extension headers included), of the
            // length the IP header says; *data* starts after any extension headers.
            const u_char* start = data;
            int hl = 20;
            if ( ip->IP4_Hdr() )
                hl = ip->IP4_Hdr()->ip_hl * 4;
            else {
                start = reinterpret_cast<const u_char*>(ip->IP6_Hdr()) + 40;
                hl = 40;
            }
            int n = static_cast<int>((data + len) - start);
            n = std::min(n, static_cast<int>(ip->TotalLen()) - hl);
            capture.Packet(t, ip, l2_src, start, std::max(n, 0));
            break;
        }
    }
}

#if ZEEK_VERSION_NUMBER >= 80100
/**
 * Feeds a TCP, UDP or ICMP connection's packets to its ConnCapture as a tap of the session
 * adapter (Zeek 8.1+): a tap sees every packet that raises new_packet, including those the
 * transport analyzers skip (bad checksum without -C, a bad TCP header, ICMP cut short by
 * the snap length), which child analyzers never see. Skipped packets get no payload, as
 * in the script capture, where no tcp_packet or udp_contents comes for them.
 */
class CaptureTap final : public zeek::packet_analysis::TapAnalyzer {
public:
    CaptureTap(zeek::Connection* c, WindowPtr w, const std::string& orig_l2)
        : capture(c, std::move(w), orig_l2), transport(c->ConnTransport()) {}

    void TapPacket(const zeek::Packet& pkt, zeek::packet_analysis::PacketAction action,
                   zeek::packet_analysis::SkipReason skip_reason) override;

    void Done() override { capture.Done(); }

private:
    ConnCapture capture;
    TransportProto transport;
};

void CaptureTap::TapPacket(const zeek::Packet& pkt, zeek::packet_analysis::PacketAction action,
                           zeek::packet_analysis::SkipReason /* skip_reason */) {
    const zeek::IP_Hdr* ip = pkt.ip_hdr.get();
    if ( ! ip )
        return;

    const u_char* payload = nullptr;
    int n = 0;

    if ( action == zeek::packet_analysis::PacketAction::Deliver && transport != TRANSPORT_ICMP ) {
        // The lengths the TCP and UDP analyzers work with: *remaining* is what was
        // captured after the IP header (all of it for a reassembled datagram, which no
        // longer lives in the packet's buffer), *len* what the IP header says.
        const u_char* data = ip->Payload();
        int len = ip->PayloadLen();
        int remaining = ip->Reassembled() ? len : static_cast<int>((pkt.data + pkt.cap_len) - data);
        if ( len != 0 )
            remaining = std::min(remaining, len);
        if ( (transport == TRANSPORT_TCP && ip->TotalLen() == 0) || (transport == TRANSPORT_UDP && len == 0) )
            len = remaining; // segmentation offload zeroed the IP length

        int hl = 8;
        if ( transport == TRANSPORT_TCP )
            hl = reinterpret_cast<const struct tcphdr*>(data)->th_off * 4;

        payload = data + hl;
        n = std::max(std::min(len, remaining) - hl, 0);
    }

    capture.Packet(pkt.time, ip, pkt.l2_src, payload, n);
}
#endif

} // namespace

// -- Window ---------------------------------------------------------------------------------

void Window::Flip() {
    std::swap(orig_h, resp_h);
    std::swap(orig_p, resp_p);
    std::swap(orig_dev, resp_dev);
    std::swap(orig_mac, resp_mac);
    std::swap(orig_h_val, resp_h_val);
    std::swap(orig_mac_val, resp_mac_val);
    for ( auto& r : recorded )
        r.from_orig = ! r.from_orig;
}

void Window::Reset(double t) {
    done = false;
    start = t;
    last = t;
    pkts = 0;
    bytes = 0;
    recorded.clear();
    payload_data.clear();
}

// -- ConnCapture ----------------------------------------------------------------------------

ConnCapture::ConnCapture(zeek::Connection* arg_conn, WindowPtr w, const std::string& orig_l2)
    : conn(arg_conn), cur(std::move(w)) {
    dhcp = conn->ConnTransport() == TRANSPORT_UDP && (ntohs(conn->OrigPort()) == 67 || ntohs(conn->OrigPort()) == 68 ||
                                                      ntohs(conn->RespPort()) == 67 || ntohs(conn->RespPort()) == 68);

    if ( cur->mac_split )
        split.emplace(orig_l2, cur);

    recorder.Link(this);
}

ConnCapture::~ConnCapture() { recorder.Unlink(this); }

void ConnCapture::Orient(Window& w) const {
    // capture.zeek's rebase(): Zeek flips a connection whose first packet came from the
    // responder once it knows better; a window continued from a parked one may have been
    // recorded the other way round.
    if ( w.orig_p != ntohs(conn->OrigPort()) || w.orig_h != conn->OrigAddr() )
        w.Flip();
}

Window* ConnCapture::ByMac(const u_char* l2_src, double t) {
    // Devices are selected by MAC and an endpoint is an unspecified address: the
    // originator's packets may come from several devices (DHCP discovers, IPv6 duplicate
    // address detection), each with a window of its own. A MAC that is no device gets a
    // window that publishes nothing.
    if ( ! l2_src )
        return cur.get();

    std::string mac = format_mac(l2_src);
    if ( mac == cur->orig_mac )
        return cur.get();

    if ( auto it = split.find(mac); it != split.end() ) {
        cur = it->second;
        return cur.get();
    }

    auto n = std::make_shared<Window>();
    n->orig_h = conn->OrigAddr();
    n->resp_h = conn->RespAddr();
    n->orig_p = ntohs(conn->OrigPort());
    n->resp_p = ntohs(conn->RespPort());
    n->orig_dev = recorder.MacListed(mac);
    n->resp_dev = cur->resp_dev;
    n->orig_mac = mac;
    n->resp_mac = cur->resp_mac;
    n->uid = cur->uid;
    n->proto = cur->proto;
    n->start = t;
    n->last = t;
    n->mac_split = true;
    recorder.AwaitEarly(*n);
    split.emplace(mac, n);
    cur = std::move(n);
    return cur.get();
}

void ConnCapture::Packet(double t, const zeek::IP_Hdr* ip, const u_char* l2_src, const u_char* payload, int len) {
    Window* w = cur.get();
    Orient(*w);

    uint32_t ip_len = ip->TotalLen();
    zeek::IPAddr src = ip->IPHeaderSrcAddr();

    if ( w->mac_split && src == w->orig_h ) {
        w = ByMac(l2_src, t);
        Orient(*w);
    }

    // An early record due before this packet counts goes out without it.
    if ( recorder.EarlyDue(*w, t) )
        recorder.EmitEarly(*w);

    if ( t >= w->start + recorder.WindowLength() ) {
        // This packet opens the next window.
        recorder.Emit(*w);
        w->Reset(t);
        w->SetUID(conn->GetUID().Base62("C"));
        recorder.AwaitEarly(*w);
    }
    else if ( w->done )
        return;

    w->last = t;
    ++w->pkts;
    w->bytes += ip_len;

    auto n = w->recorded.size();
    if ( n >= recorder.Packets() )
        return;

    // Most windows of one packet (a SYN never answered) stay at one; the others take all
    // they will need at their second.
    if ( n == 1 )
        w->recorded.reserve(recorder.Packets());

    uint64_t limit = recorder.PayloadBytes();
    if ( payload && len > 0 && limit > 0 && ! payload_free(w->proto) ) {
        // DHCP options, where a client names itself, start at byte 240.
        if ( dhcp )
            limit = recorder.DhcpPayloadBytes();
        w->payload_data.append(reinterpret_cast<const char*>(payload), std::min<uint64_t>(len, limit));
    }

    // A window's first packet is at offset 0, whatever the connection's start says.
    w->recorded.push_back(Window::Recorded{w->pkts == 1 ? 0.0 : t - w->start, ip_len,
                                           static_cast<uint32_t>(w->payload_data.size()), src == w->orig_h});

    recorder.Recorded(cur); // ByMac() made *w* the current window
}

void ConnCapture::Done() {
    if ( ! linked )
        return; // already done

    recorder.Unlink(this);

    if ( cur->mac_split ) {
        for ( auto& [mac, w] : split )
            recorder.Emit(*w);
        split.clear();
        return;
    }

    Window& w = *cur;
    if ( w.done || w.pkts == 0 )
        return;

    double t = zeek::run_state::network_time;
    if ( recorder.TraceDone() || t >= w.start + recorder.WindowLength() ) {
        recorder.Emit(w);
        return;
    }

    // The window may go on in a later connection with the same endpoints.
    Orient(w);
    recorder.Park(cur, conn->ConnTransport());
}

void ConnCapture::Flush() {
    Orient(*cur);
    recorder.Emit(*cur);
}

// -- Recorder -------------------------------------------------------------------------------

void Recorder::InitPostScript() {
    // All of these come with the iotcls package (main.zeek, devices.zeek,
    // capture-native.zeek); without it the plugin stays idle. zeek::id::find_type() and
    // find_func() would abort on a missing name, so look the identifiers up first.
    auto type_of = [](const char* name) -> zeek::RecordTypePtr {
        const auto& id = zeek::id::find(name);
        if ( ! id || ! id->IsType() || id->GetType()->Tag() != zeek::TYPE_RECORD )
            return nullptr;
        return zeek::cast_intrusive<zeek::RecordType>(id->GetType());
    };
    auto func_of = [](const char* name) -> zeek::FuncPtr {
        const auto& id = zeek::id::find(name);
        if ( ! id || ! id->HasVal() || id->GetType()->Tag() != zeek::TYPE_FUNC )
            return nullptr;
        return id->GetVal()->AsFuncVal()->AsFuncPtr();
    };

    flow_record = type_of("IoTClass::FlowRecord");
    is_device_endpoint = func_of("IoTClass::is_device_endpoint");
    capture_node_func = func_of("IoTClass::capture_node");
    publishing_func = func_of("IoTClass::publishing"); // none: always publishing
    window_length = zeek::id::find("IoTClass::window_length");
    packets = zeek::id::find("IoTClass::packets");
    payload_bytes = zeek::id::find("IoTClass::payload_bytes");
    dhcp_payload_bytes = zeek::id::find("IoTClass::dhcp_payload_bytes");
    device_macs = zeek::id::find("IoTClass::device_macs");
    device_nets = zeek::id::find("IoTClass::device_nets");
    local_nets = zeek::id::find("Site::local_nets");
    early_records = zeek::id::find("IoTClass::early_records"); // none: no early records
    early_idle = zeek::id::find("IoTClass::early_idle");

    if ( ! flow_record || ! is_device_endpoint || ! window_length || ! packets || ! payload_bytes ||
         ! dhcp_payload_bytes || ! device_macs || ! device_nets || ! local_nets )
        return;

    if ( auto* h = zeek::event_registry->Lookup("IoTClass::native_flow") )
        native_flow = h;
    if ( auto* h = zeek::event_registry->Lookup("IoTClass::native_early_flow") )
        native_early_flow = h;
    if ( auto* h = zeek::event_registry->Lookup("IoTClass::native_flows") )
        native_flows = h;
    native_batch = zeek::id::find("IoTClass::native_batch");
    native_batch_delay = zeek::id::find("IoTClass::native_batch_delay");
    unacked_max = zeek::id::find("IoTClass::unacked_max");
    // A flow_policy handler is given each record as a FlowRecord: then records are raised one
    // by one, as the script capture does.
    auto policy = func_of("IoTClass::flow_policy");
    packable = native_flows && native_batch && native_batch_delay && ! (policy && policy->HasBodies());

    auto field = [this](const char* name) {
        int i = flow_record->FieldOffset(name);
        if ( i < 0 )
            zeek::reporter->FatalError("iotcls: IoTClass::FlowRecord has no field %s", name);
        return i;
    };
    f_device_mac = field("device_mac");
    f_device_ip = field("device_ip");
    f_device_port = field("device_port");
    f_remote_ip = field("remote_ip");
    f_remote_port = field("remote_port");
    f_proto = field("proto");
    f_start = field("start");
    f_last = field("last");
    f_total_bytes = field("total_bytes");
    f_total_packets = field("total_packets");
    f_offsets = field("offsets");
    f_sizes = field("sizes");
    f_directions = field("directions");
    f_payloads = field("payloads");
    f_uid = field("uid");
    f_device_is_orig = field("device_is_orig");
    interval_vec = flow_record->GetFieldType<zeek::VectorType>(f_offsets);
    count_vec = flow_record->GetFieldType<zeek::VectorType>(f_sizes);
    string_vec = flow_record->GetFieldType<zeek::VectorType>(f_payloads);

    const auto& conn_type = zeek::id::find_type<zeek::RecordType>("connection");
    const auto& endp_type = zeek::id::find_type<zeek::RecordType>("endpoint");
    f_conn_orig = conn_type->FieldOffset("orig");
    f_conn_resp = conn_type->FieldOffset("resp");
    f_endp_l2 = endp_type->FieldOffset("l2_addr");

    ready = true;
}

bool Recorder::CaptureNode() {
    // The workers of a cluster, or a standalone Zeek (capture_node() in devices.zeek); a
    // node's role does not change, so ask once.
    if ( capture_node < 0 ) {
        zeek::Args none;
        auto v = capture_node_func ? capture_node_func->Invoke(&none) : zeek::val_mgr->True();
        capture_node = v && v->AsBool() ? 1 : 0;
    }
    return capture_node == 1;
}

bool Recorder::Publishing() {
    // A bridge's hello or disconnection changes the answer; asking once per batch delay of
    // network time, not per record, keeps the call into script land off the record's cost.
    double now = zeek::run_state::network_time;
    if ( publishing_func && (publishing_asked < 0.0 || now - publishing_asked >= BatchDelay()) ) {
        zeek::Args none;
        auto v = publishing_func->Invoke(&none);
        publishing = ! v || v->AsBool();
        publishing_asked = now;
    }
    return publishing;
}

bool Recorder::IsDevice(const zeek::IPAddr& a, const std::string& l2) {
    // Calling into script land costs some 8,000 instructions, twice for each connection,
    // whether it has a device endpoint or not. is_device_endpoint() (devices.zeek) answers
    // from the endpoint and three options (and what its change handlers derive from them),
    // so its answers hold until one of them gets a new value.
    const auto& macs = device_macs->GetVal();
    const auto& nets = device_nets->GetVal();
    const auto& local = local_nets->GetVal();
    if ( macs != devices_macs || nets != devices_nets || local != devices_local || devices.size() >= 65536 ) {
        devices.clear();
        devices_macs = macs;
        devices_nets = nets;
        devices_local = local;
    }

    uint32_t bytes[4];
    a.CopyIPv6(bytes);
    std::string key(reinterpret_cast<const char*>(bytes), sizeof(bytes));
    key += l2;

    if ( auto it = devices.find(key); it != devices.end() )
        return it->second;

    auto v =
        is_device_endpoint->Invoke(zeek::make_intrusive<zeek::AddrVal>(a), zeek::make_intrusive<zeek::StringVal>(l2));
    bool is_device = v && v->AsBool();
    devices.emplace(std::move(key), is_device);
    return is_device;
}

bool Recorder::MacsListed() const { return device_macs->GetVal()->AsTableVal()->Size() > 0; }

bool Recorder::MacListed(const std::string& mac) const {
    auto* macs = device_macs->GetVal()->AsTableVal();
    return macs->Size() > 0 && macs->Find(zeek::make_intrusive<zeek::StringVal>(mac)) != nullptr;
}

void Recorder::Attach(zeek::Connection* conn) {
    if ( ! ready || ! CaptureNode() )
        return;

    static const zeek::Tag tag = zeek::analyzer_mgr->GetComponentTag(ANALYZER_NAME);
    if ( ! zeek::analyzer_mgr->IsEnabled(tag) )
        return;

    // The script-level connection record: its endpoints' l2_addr, and the uid, which Zeek
    // assigns when it builds the record (new_connection would build it next anyway).
    const auto& cv = conn->GetVal();

    auto transport = conn->ConnTransport();
    uint32_t orig_p = ntohs(conn->OrigPort());
    uint32_t resp_p = ntohs(conn->RespPort());
    WindowPtr w;

    // A window parked by an earlier connection with the same endpoints goes on in this one
    // (as the pcap sensor's windows do), device sides and all, unless it has ended.
    if ( ! parked.empty() ) {
        auto it = parked.find(park_key(conn->OrigAddr(), orig_p, conn->RespAddr(), resp_p, transport));
        if ( it != parked.end() ) {
            WindowPtr p = std::move(it->second.w);
            parked.erase(it);
            if ( zeek::run_state::network_time < p->start + WindowLength() ) {
                if ( p->orig_p != orig_p || p->orig_h != conn->OrigAddr() )
                    p->Flip();
                p->SetUID(conn->GetUID().Base62("C"));
                w = std::move(p);
            }
            else
                Emit(*p);
        }
    }

    std::string orig_l2;

    if ( ! w ) {
        auto l2_of = [&cv, this](int ep) -> std::string {
            auto* e = cv->GetFieldAs<zeek::RecordVal>(ep);
            const auto& v = e->GetField(f_endp_l2);
            return v ? v->AsStringVal()->ToStdString() : std::string();
        };
        orig_l2 = l2_of(f_conn_orig);
        std::string resp_l2 = l2_of(f_conn_resp);

        bool om = IsDevice(conn->OrigAddr(), orig_l2);
        bool rm = IsDevice(conn->RespAddr(), resp_l2);
        if ( ! om && ! rm )
            return;

        w = std::make_shared<Window>();
        w->orig_h = conn->OrigAddr();
        w->resp_h = conn->RespAddr();
        w->orig_p = orig_p;
        w->resp_p = resp_p;
        w->orig_dev = om;
        w->resp_dev = rm;
        w->orig_mac = device_mac(orig_l2);
        w->resp_mac = device_mac(resp_l2);
        w->uid = conn->GetUID().Base62("C");
        w->proto = conn->KeyProto();
        w->start = conn->StartTime();
        w->last = w->start;
        AwaitEarly(*w);

        const auto& oh = conn->OrigAddr();
        const auto& rh = conn->RespAddr();
        w->mac_split = ! orig_l2.empty() && MacsListed() &&
                       (oh == unspecified_v4 || oh == unspecified_v6 || rh == unspecified_v4 || rh == unspecified_v6);
    }

    auto* root = conn->GetSessionAdapter();

#if ZEEK_VERSION_NUMBER >= 80100
    if ( transport == TRANSPORT_TCP || transport == TRANSPORT_UDP || transport == TRANSPORT_ICMP ) {
        root->AddTapAnalyzer(std::make_unique<CaptureTap>(conn, std::move(w), orig_l2));
        return;
    }
#endif

    auto* a = new CaptureAnalyzer(conn, std::move(w), orig_l2);

    if ( transport == TRANSPORT_TCP ) {
        // TCP's payload analyzers see the reassembled stream; packets go to the adapter's
        // packet children, which it initializes only when they are there before it is.
        static_cast<zeek::packet_analysis::TCP::TCPSessionAdapter*>(root)->AddChildPacketAnalyzer(a);
        a->Init();
    }
    else
        root->AddChildAnalyzer(a);
}

void Recorder::Link(ConnCapture* c) {
    c->prev = nullptr;
    c->next = live;
    if ( live )
        live->prev = c;
    live = c;
    c->linked = true;
}

void Recorder::Unlink(ConnCapture* c) {
    if ( ! c->linked )
        return;
    if ( c->prev )
        c->prev->next = c->next;
    else
        live = c->next;
    if ( c->next )
        c->next->prev = c->prev;
    c->prev = c->next = nullptr;
    c->linked = false;
}

std::string Recorder::ParkKey(const Window& w, TransportProto transport) const {
    return park_key(w.orig_h, w.orig_p, w.resp_h, w.resp_p, transport);
}

void Recorder::Park(const WindowPtr& w, TransportProto transport) {
    auto key = ParkKey(*w, transport);
    auto [it, inserted] = parked.try_emplace(key, Parked{w});
    if ( ! inserted ) {
        Emit(*it->second.w);
        it->second.w = w;
    }

    // capture.zeek schedules window_end for start + window_length.
    expiries.push(Expiry{w->start + WindowLength(), w->start, std::move(key)});
}

void Recorder::Advance(double t) {
    if ( batch_records > 0 && t - batch_since >= BatchDelay() )
        SendBatch();

    while ( ! idle.empty() && idle.top().at <= t ) {
        auto e = idle.top();
        idle.pop();
        auto w = e.w.lock();
        if ( ! w || w->last != e.last || ! EarlyExists(*w) )
            continue;
        if ( EarlyDue(*w, t) )
            EmitEarly(*w);
        else // at rounds differently from t - last
            idle.push(IdleEntry{std::nextafter(t, HUGE_VAL), e.last, std::move(e.w)});
    }

    while ( ! expiries.empty() && expiries.top().at <= t ) {
        auto it = parked.find(expiries.top().key);
        // Skip a window that a later connection took over, or that was replaced since.
        if ( it != parked.end() && it->second.w->start == expiries.top().start ) {
            Emit(*it->second.w);
            parked.erase(it);
        }
        expiries.pop();
    }
}

uint64_t Recorder::Flush() {
    uint64_t before = raised;
    trace_done = true;
    flushing = true;

    for ( auto* c = live; c; c = c->next )
        c->Flush();

    for ( auto& [key, p] : parked )
        Emit(*p.w);
    parked.clear();
    expiries = {};
    idle = {};

    for ( auto* c = live; c; c = c->next ) {
        for ( auto& [mac, w] : c->split )
            Emit(*w);
        c->split.clear();
    }

    SendBatch();
    flushing = false;
    return raised - before;
}

bool Recorder::EarlyExists(const Window& w) const {
    if ( w.early_sent || w.done || w.pkts == 0 )
        return false;
    return w.recorded.size() >= Packets() || w.last + EarlyIdle() < w.start + WindowLength();
}

bool Recorder::EarlyDue(const Window& w, double t) const {
    return EarlyExists(w) && (w.recorded.size() >= Packets() || t - w.last >= EarlyIdle());
}

void Recorder::EmitEarly(Window& w) {
    w.early_sent = true;
    if ( w.orig_dev )
        Out(w, true, true);
    if ( w.resp_dev )
        Out(w, false, true);
}

void Recorder::Recorded(const WindowPtr& w) {
    if ( w->early_sent )
        return;

    // Its first packets are in: nothing the early record holds can change any more, so it
    // goes out now (capture.zeek sends it with the next packet or sweep, the same record).
    if ( w->recorded.size() >= Packets() ) {
        EmitEarly(*w);
        return;
    }

    if ( w->last + EarlyIdle() < w->start + WindowLength() )
        idle.push(IdleEntry{w->last + EarlyIdle(), w->last, w});
}

void Recorder::Emit(Window& w) {
    if ( w.done || w.pkts == 0 )
        return;

    if ( EarlyExists(w) )
        EmitEarly(w);
    w.early_sent = true;

    if ( w.orig_dev )
        Out(w, true, false);
    if ( w.resp_dev )
        Out(w, false, false);
    w.done = true;

    // Nothing reads them again before the window restarts.
    w.payload_data = std::string();
}

void Recorder::Raise(const zeek::EventHandlerPtr& ev, Window& w, bool dev_is_orig) {
    if ( ! ev )
        return;

    // The vectors are filled in place (they hold ZVals), so that an offset or a size needs
    // no Val of its own.
    auto n = w.recorded.size();
    auto offsets = zeek::make_intrusive<zeek::VectorVal>(interval_vec);
    auto sizes = zeek::make_intrusive<zeek::VectorVal>(count_vec);
    auto directions = zeek::make_intrusive<zeek::VectorVal>(count_vec);
    auto payloads = zeek::make_intrusive<zeek::VectorVal>(string_vec);
    auto& ov = offsets->RawVec();
    auto& sv = sizes->RawVec();
    auto& dv = directions->RawVec();
    auto& pv = payloads->RawVec();
    ov.reserve(n);
    sv.reserve(n);
    dv.reserve(n);
    pv.reserve(n);
    for ( size_t i = 0; i < n; ++i ) {
        const auto& r = w.recorded[i];
        auto payload = w.Payload(i);
        ov.emplace_back(zeek::ZVal(r.offset));
        sv.emplace_back(zeek::ZVal(static_cast<zeek_uint_t>(r.size)));
        dv.emplace_back(zeek::ZVal(static_cast<zeek_uint_t>(r.from_orig == dev_is_orig)));
        pv.emplace_back(zeek::ZVal(payload.empty() ? zeek::val_mgr->EmptyString() : hex_val(payload)));
    }

    auto& dev_h = dev_is_orig ? w.orig_h_val : w.resp_h_val;
    auto& rem_h = dev_is_orig ? w.resp_h_val : w.orig_h_val;
    auto& dev_mac = dev_is_orig ? w.orig_mac_val : w.resp_mac_val;
    if ( ! dev_h )
        dev_h = zeek::make_intrusive<zeek::AddrVal>(dev_is_orig ? w.orig_h : w.resp_h);
    if ( ! rem_h )
        rem_h = zeek::make_intrusive<zeek::AddrVal>(dev_is_orig ? w.resp_h : w.orig_h);
    if ( ! dev_mac )
        dev_mac = zeek::make_intrusive<zeek::StringVal>(dev_is_orig ? w.orig_mac : w.resp_mac);
    if ( ! w.uid_val )
        w.uid_val = zeek::make_intrusive<zeek::StringVal>(w.uid);

    auto r = zeek::make_intrusive<zeek::RecordVal>(flow_record);
    r->Assign(f_device_mac, dev_mac);
    r->Assign(f_device_ip, dev_h);
    r->Assign(f_device_port, zeek::val_mgr->Count(dev_is_orig ? w.orig_p : w.resp_p));
    r->Assign(f_remote_ip, rem_h);
    r->Assign(f_remote_port, zeek::val_mgr->Count(dev_is_orig ? w.resp_p : w.orig_p));
    r->Assign(f_proto, zeek::val_mgr->Count(w.proto));
    r->Assign(f_start, zeek::make_intrusive<zeek::DoubleVal>(w.start));
    r->Assign(f_last, zeek::make_intrusive<zeek::DoubleVal>(w.last));
    r->Assign(f_total_bytes, zeek::val_mgr->Count(w.bytes));
    r->Assign(f_total_packets, zeek::val_mgr->Count(w.pkts));
    r->Assign(f_offsets, std::move(offsets));
    r->Assign(f_sizes, std::move(sizes));
    r->Assign(f_directions, std::move(directions));
    r->Assign(f_payloads, std::move(payloads));
    r->Assign(f_uid, w.uid_val);
    r->Assign(f_device_is_orig, zeek::val_mgr->Bool(dev_is_orig));

    zeek::event_mgr.Enqueue(ev, zeek::Args{std::move(r)});
    ++raised;
}

void Recorder::Out(Window& w, bool dev_is_orig, bool early) {
    if ( BatchSize() == 0 ) {
        Raise(early ? native_early_flow : native_flow, w, dev_is_orig);
        return;
    }

    // An early record is kept nowhere: where nobody would receive it, it is not made (the
    // final records are, and kept for a bridge).
    bool wanted = flushing || Publishing();
    if ( early && ! wanted )
        return;

    Pack(w, dev_is_orig, early, wanted);
    ++raised;
    if ( batch_records >= BatchSize() )
        SendBatch();
}

namespace {

// The packed line is written through a cursor into a buffer sized for the longest line the
// record can make (line_bound()): no capacity checks or calls per field, which were half of
// the packing.

char* put_uint(char* p, uint64_t v) { return std::to_chars(p, p + 20, v).ptr; }

char* put_str(char* p, const std::string& v) {
    std::memcpy(p, v.data(), v.size());
    return p + v.size();
}

// Longest "%f" of a double: 309 integer digits, sign, point, six decimals.
constexpr size_t real_max = 320;

// Packet times in [2^14, 2^53) s: the fast path below, at most 16 + 1 + 6 characters.
bool usual_time(double v) { return v >= 16384.0 && v < 9007199254740992.0; }

// A real as Broker's JSON writes it (printf's "%f"; delivery.zeek's record_key() uses
// "%.6f", the same). A usual time has at most 38 fraction bits, so its fraction times 10^6
// (15,625 * 2^6) is exact in a double, and rounding that to an integer, ties to even, is
// exactly printf's rounding of the decimal expansion. Anything else goes through
// std::to_chars, specified to round as printf does; both were checked against printf on
// millions of times, ties included.
char* put_real(char* p, double v) {
    if ( usual_time(v) ) {
        auto secs = static_cast<uint64_t>(v);
        double x = (v - static_cast<double>(secs)) * 1e6; // exact
        auto frac = static_cast<uint64_t>(x);
        double rest = x - static_cast<double>(frac); // exact
        if ( rest > 0.5 || (rest == 0.5 && (frac & 1)) )
            ++frac;
        if ( frac == 1000000 ) {
            ++secs;
            frac = 0;
        }
        p = put_uint(p, secs);
        *p++ = '.';
        for ( int k = 5; k >= 0; --k ) {
            p[k] = static_cast<char>('0' + frac % 10);
            frac /= 10;
        }
        return p + 6;
    }
    auto r = std::to_chars(p, p + real_max, v, std::chars_format::fixed, 6);
    if ( r.ec == std::errc() )
        return r.ptr;
    std::memcpy(p, "nan", 3); // the bridge refuses the record
    return p + 3;
}

// An address as Zeek prints it (IPAddr::AsString(), inet_ntop): IPv4 by hand, a tenth of
// inet_ntop's cost, which is most of a record's packing otherwise.
char* put_addr(char* p, const zeek::IPAddr& a) {
    if ( a.GetFamily() != IPv4 )
        return put_str(p, a.AsString()); // at most 45 characters
    const uint32_t* w;
    a.GetBytes(&w);
    auto* b = reinterpret_cast<const unsigned char*>(w); // network order
    for ( int i = 0; i < 4; ++i ) {
        if ( i )
            *p++ = '.';
        unsigned v = b[i];
        if ( v >= 100 )
            *p++ = static_cast<char>('0' + v / 100);
        if ( v >= 10 )
            *p++ = static_cast<char>('0' + v / 10 % 10);
        *p++ = static_cast<char>('0' + v % 10);
    }
    return p;
}

size_t base64_size(size_t n) { return (n + 2) / 3 * 4; }

// RFC 4648 base64, standard alphabet, padded: 2/3 of hex's length, and a packed line's
// length is what publishing it costs (Broker copies it byte by byte).
char* put_base64(char* p, std::string_view bytes) {
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    auto n = bytes.size();
    auto* in = reinterpret_cast<const unsigned char*>(bytes.data());
    size_t i = 0;
    for ( ; i + 3 <= n; i += 3 ) {
        uint32_t v = (uint32_t(in[i]) << 16) | (uint32_t(in[i + 1]) << 8) | in[i + 2];
        *p++ = b64[v >> 18];
        *p++ = b64[(v >> 12) & 0x3f];
        *p++ = b64[(v >> 6) & 0x3f];
        *p++ = b64[v & 0x3f];
    }
    if ( i < n ) {
        uint32_t v = uint32_t(in[i]) << 16;
        if ( i + 1 < n )
            v |= uint32_t(in[i + 1]) << 8;
        *p++ = b64[v >> 18];
        *p++ = b64[(v >> 12) & 0x3f];
        *p++ = i + 1 < n ? b64[(v >> 6) & 0x3f] : '=';
        *p++ = '=';
    }
    return p;
}

// The longest packed line *w* can make: every count 20 digits (an offset 21, with a sign),
// every address 45 characters, every real as long as put_real() may write it.
size_t line_bound(const Window& w, const std::string& mac) {
    size_t n = w.recorded.size();
    size_t b = 2 + mac.size() + 2 * 45 + 5 * 20 + w.uid.size() + 1 + 16;
    for ( double t : {w.start, w.last} )
        b += usual_time(t) ? 23 : real_max;
    b += n * (21 + 1) + n * (20 + 1) + n * 2 + n;
    for ( size_t i = 0; i < n; ++i )
        b += base64_size(w.Payload(i).size());
    return b;
}

} // namespace

void Recorder::Pack(const Window& w, bool dev_is_orig, bool early, bool wanted) {
    // bridge/records.py's packed format (v2): 17 tab-separated fields in FlowRecord order
    // after the kind; vectors comma-separated; offsets in nanoseconds truncated as Broker
    // converts an interval (std::chrono::duration_cast, Zeek's broker/Data.cc).
    const auto& dev_h = dev_is_orig ? w.orig_h : w.resp_h;
    const auto& rem_h = dev_is_orig ? w.resp_h : w.orig_h;
    const auto& dev_mac = dev_is_orig ? w.orig_mac : w.resp_mac;
    auto n = w.recorded.size();

    if ( auto bound = line_bound(w, dev_mac); scratch.size() < bound )
        scratch.resize(bound);
    char* const begin = scratch.data();
    char* p = begin;
    *p++ = early ? 'E' : 'F';
    *p++ = '2';
    *p++ = '\t';
    p = put_str(p, dev_mac);
    *p++ = '\t';
    auto ip_at = p - begin;
    p = put_addr(p, dev_h);
    auto ip_len = (p - begin) - ip_at;
    *p++ = '\t';
    p = put_uint(p, dev_is_orig ? w.orig_p : w.resp_p);
    *p++ = '\t';
    p = put_addr(p, rem_h);
    *p++ = '\t';
    p = put_uint(p, dev_is_orig ? w.resp_p : w.orig_p);
    *p++ = '\t';
    p = put_uint(p, w.proto);
    *p++ = '\t';
    auto start_at = p - begin;
    p = put_real(p, w.start);
    auto start_len = (p - begin) - start_at;
    *p++ = '\t';
    p = put_real(p, w.last);
    *p++ = '\t';
    p = put_uint(p, w.bytes);
    *p++ = '\t';
    p = put_uint(p, w.pkts);
    *p++ = '\t';
    for ( size_t i = 0; i < n; ++i ) {
        if ( i )
            *p++ = ',';
        auto ns =
            std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(w.recorded[i].offset));
        auto v = ns.count();
        if ( v < 0 ) {
            *p++ = '-';
            v = -v;
        }
        p = put_uint(p, static_cast<uint64_t>(v));
    }
    *p++ = '\t';
    for ( size_t i = 0; i < n; ++i ) {
        if ( i )
            *p++ = ',';
        p = put_uint(p, w.recorded[i].size);
    }
    *p++ = '\t';
    for ( size_t i = 0; i < n; ++i ) {
        if ( i )
            *p++ = ',';
        *p++ = w.recorded[i].from_orig == dev_is_orig ? '1' : '0';
    }
    *p++ = '\t';
    for ( size_t i = 0; i < n; ++i ) {
        if ( i )
            *p++ = ',';
        p = put_base64(p, w.Payload(i));
    }
    *p++ = '\t';
    p = put_str(p, w.uid);
    *p++ = '\t';
    *p++ = dev_is_orig ? 'T' : 'F';
    std::string s(begin, p - begin);

    if ( batch_records++ == 0 )
        batch_since = zeek::run_state::network_time;
    if ( early ) {
        batch_keys.emplace_back();
        batch.emplace_back(std::move(s));
    }
    else {
        // delivery.zeek's record_key(): uid|device_mac|device_ip|start ("%.6f")
        std::string key;
        key.reserve(w.uid.size() + dev_mac.size() + ip_len + start_len + 3);
        key += w.uid;
        key += '|';
        key += dev_mac;
        key += '|';
        key.append(s, ip_at, ip_len);
        key += '|';
        key.append(s, start_at, start_len);
        ++batch_finals;
        if ( wanted ) {
            Keep(key, s);
            batch_keys.emplace_back(std::move(key));
            batch.emplace_back(std::move(s));
        }
        else
            Keep(std::move(key), std::move(s));
    }
}

void Recorder::SendBatch() {
    if ( batch_records == 0 )
        return;

    auto recs = zeek::make_intrusive<zeek::VectorVal>(string_vec);
    auto keys = zeek::make_intrusive<zeek::VectorVal>(string_vec);
    auto& rv = recs->RawVec();
    auto& kv = keys->RawVec();
    rv.reserve(batch.size());
    kv.reserve(batch.size());
    for ( size_t i = 0; i < batch.size(); ++i ) {
        rv.emplace_back(zeek::ZVal(zeek::make_intrusive<zeek::StringVal>(batch[i])));
        kv.emplace_back(zeek::ZVal(batch_keys[i].empty() ? zeek::val_mgr->EmptyString() :
                                                           zeek::make_intrusive<zeek::StringVal>(batch_keys[i])));
    }
    zeek::event_mgr.Enqueue(native_flows, zeek::Args{std::move(recs), std::move(keys),
                                                     zeek::val_mgr->Count(batch_finals)});
    batch.clear();
    batch_keys.clear();
    batch_records = 0;
    batch_finals = 0;
}

namespace {

// delivery.zeek's worth_telling(): 1, 10, 100, ...
bool worth_telling(uint64_t n) {
    while ( n >= 10 && n % 10 == 0 )
        n /= 10;
    return n == 1;
}

} // namespace

bool Recorder::Keep(std::string key, std::string line) {
    uint64_t cap = unacked_max ? unacked_max->GetVal()->AsCount() : 0;
    if ( cap == 0 || ! unacked.try_emplace(key, Kept{kept_total, std::move(line)}).second )
        return false;

    unacked_order.emplace_back(kept_total++, std::move(key));
    while ( unacked.size() > cap ) {
        auto [old_seq, old_key] = std::move(unacked_order.front());
        unacked_order.pop_front();
        auto it = unacked.find(old_key);
        if ( it == unacked.end() || it->second.seq != old_seq )
            continue; // forgotten since
        unacked.erase(it);
        if ( worth_telling(++dropped) )
            zeek::reporter->Warning("iotcls: %" PRIu64
                                    " flow records unacknowledged by the bridge were dropped "
                                    "(IoTClass::unacked_max=%" PRIu64 " kept): is the bridge running?",
                                    dropped, cap);
    }

    // Forgotten entries stay in the order until they reach its front: drop them now and
    // then, so that it stays within twice the records kept.
    if ( unacked_order.size() > 2 * unacked.size() + 1024 ) {
        std::deque<std::pair<uint64_t, std::string>> live;
        for ( auto& e : unacked_order ) {
            auto it = unacked.find(e.second);
            if ( it != unacked.end() && it->second.seq == e.first )
                live.emplace_back(std::move(e));
        }
        unacked_order.swap(live);
    }
    return true;
}

bool Recorder::Forget(const std::string& key) { return unacked.erase(key) > 0; }

std::vector<std::string> Recorder::Unacked() const {
    std::vector<std::string> out;
    out.reserve(unacked.size());
    for ( const auto& [seq, key] : unacked_order ) {
        auto it = unacked.find(key);
        if ( it != unacked.end() && it->second.seq == seq )
            out.push_back(it->second.line);
    }
    return out;
}

} // namespace plugin::IoTClass_Capture
