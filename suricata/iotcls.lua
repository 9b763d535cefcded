-- iotcls Suricata output script: the iotcls flow record (iotcls/schema.py) from Suricata.
--
-- Per device-side key (device ip/port, remote ip/port, protocol) and 60 s window: the first N
-- packets' time offset, IP length, direction and first payload bytes (of a DHCP message more:
-- its options, which name the client's type, start at byte 240), and the window's totals.
-- Each finished window goes to `iotcls serve` as one JSON datagram on a Unix socket; the
-- record's fields and the transport are described in docs/suricata.md.
--
-- Suricata 7 (LuaJIT) packet scripts: log() runs once per IP packet with the packet and its
-- flow. The API has no packet length, so the IP length is the growth of the flow's byte
-- counters (frame length) less the link header, corrected for Ethernet's minimum-frame padding;
-- the direction is which of the flow's two counters grew; a packet that grows neither is a
-- pseudo-packet Suricata injects (flow timeout, shutdown) and is ignored.
--
-- Configuration: `iotcls-suricata.conf` beside this script (key = value lines, written by
-- `iotcls suricata-config`), overridden by environment variables IOTCLS_<KEY> (upper case):
--   socket            the bridge's Unix datagram socket
--   local_nets        comma-separated CIDRs: an endpoint inside them is a device
--   devices           comma-separated device IP addresses (same as /32 and /128 networks)
--   window_s, packets, payload_bytes, link_header_bytes (14: Ethernet)
--   dhcp_payload_bytes
--                     payload bytes kept of a DHCP packet (UDP, port 67 or 68) instead of
--                     payload_bytes (548, the schema's DHCP_PAYLOAD_BYTES: a DHCP message's
--                     options start at byte 240); none when payload_bytes is 0
--   early_records     yes/no: also send each window's early record (iotcls/schema.py
--                     early_record: at its N-th packet or after early_idle_s idle), flagged
--                     "early": true; the final record follows as before
--   early_idle_s      idle time before a window's early record (0.5, the schema's EARLY_IDLE_S)
--   reorder_s         how far (seconds of traffic time) Suricata's worker threads may hand
--                     packets over out of time order (2); see docs/suricata.md
--
-- Every Suricata call is in the adapter `api` below, so that a port to another Lua API
-- (Suricata 8's suricata.packet / suricata.flow modules) touches only that table.

local ffi = require("ffi")
local bit = require("bit")

-- --------------------------------------------------------------------------------------------
-- the Suricata API, in one place (Suricata 7.0, LuaJIT)

local api = {
    -- seconds, microseconds
    packet_time = function() return SCPacketTimestamp() end,
    -- ip version, src, dst, proto, sport (ICMP: type), dport (ICMP: code)
    packet_tuple = function() return SCPacketTuple() end,
    -- the transport payload (TCP/UDP data) as a string
    packet_payload = function() return SCPacketPayload() end,
    -- the flow's id as in EVE (nil when the packet has no flow)
    flow_id = function() return SCFlowId() end,
    -- packets and bytes (frame lengths) to server, to client
    flow_stats = function() return SCFlowStats() end,
    -- the flow's tuple in its own direction (src = originator)
    flow_tuple = function() return SCFlowTuple() end,
    log_info = function(msg) SCLogInfo(msg) end,
    log_warning = function(msg) SCLogWarning(msg) end,
}

-- --------------------------------------------------------------------------------------------
-- configuration

local cfg = {
    socket = "/run/iotcls/suricata.sock",
    local_nets = "",
    devices = "",
    window_s = "60",
    packets = "10",
    payload_bytes = "64",
    dhcp_payload_bytes = "548",
    link_header_bytes = "14",
    reorder_s = "2",
    early_records = "yes",
    early_idle_s = "0.5",
}

local function script_dir()
    local src = debug.getinfo(1, "S").source
    if src:sub(1, 1) == "@" then
        return src:sub(2):match("^(.*)/[^/]*$") or "."
    end
    return "."
end

local function trim(s) return (s:gsub("^%s+", ""):gsub("%s+$", "")) end

local function load_config()
    local path = os.getenv("IOTCLS_CONFIG") or (script_dir() .. "/iotcls-suricata.conf")
    local f = io.open(path, "r")
    if f then
        local n = 0
        for line in f:lines() do
            n = n + 1
            line = trim(line:gsub("#.*$", ""))
            if line ~= "" then
                local k, v = line:match("^([%w_]+)%s*=%s*(.-)$")
                if k == nil or cfg[k] == nil then
                    error(string.format("iotcls: %s line %d: not a known 'key = value': %s", path,
                        n, line))
                end
                cfg[k] = v
            end
        end
        f:close()
    end
    for k, _ in pairs(cfg) do
        local v = os.getenv("IOTCLS_" .. k:upper())
        if v ~= nil then cfg[k] = v end
    end
    return path, f ~= nil
end

local function number(key, lo)
    local v = tonumber(cfg[key])
    if v == nil or v < lo then
        error(string.format("iotcls: %s must be a number >= %s, not %q", key, lo, cfg[key]))
    end
    return v
end

-- --------------------------------------------------------------------------------------------
-- addresses and device selection (as iotcls.flows.DeviceSelector, by networks only: the Lua
-- API has no MAC addresses)

-- an address as 16 bytes (IPv4-mapped for IPv4), or nil
local function addr_bytes(ip)
    if ip:find(":", 1, true) == nil then
        local a, b, c, d = ip:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
        if a == nil then return nil end
        return { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, tonumber(a), tonumber(b), tonumber(c),
            tonumber(d) }, 4
    end
    local head, tail = ip, nil
    local dc = ip:find("::", 1, true)
    if dc then head, tail = ip:sub(1, dc - 1), ip:sub(dc + 2) end
    local function groups(s)
        local out = {}
        if s == "" then return out end
        for g in (s .. ":"):gmatch("([^:]*):") do
            if g:find(".", 1, true) then -- embedded IPv4
                local v4 = addr_bytes(g)
                if v4 == nil then return nil end
                out[#out + 1] = v4[13] * 256 + v4[14]
                out[#out + 1] = v4[15] * 256 + v4[16]
            else
                local n = tonumber(g, 16)
                if n == nil or #g > 4 then return nil end
                out[#out + 1] = n
            end
        end
        return out
    end
    local h, t = groups(head), groups(tail or "")
    if h == nil or t == nil then return nil end
    local g = {}
    for _, x in ipairs(h) do g[#g + 1] = x end
    if tail ~= nil then
        for _ = 1, 8 - #h - #t do g[#g + 1] = 0 end
    end
    for _, x in ipairs(t) do g[#g + 1] = x end
    if #g ~= 8 then return nil end
    local b = {}
    for i = 1, 8 do
        b[2 * i - 1] = math.floor(g[i] / 256)
        b[2 * i] = g[i] % 256
    end
    return b, 6
end

local function parse_net(cidr)
    cidr = trim(cidr)
    local ip, len = cidr:match("^([^/]+)/(%d+)$")
    if ip == nil then ip = cidr end
    local b, ver = addr_bytes(ip)
    if b == nil then error("iotcls: not a network (CIDR): " .. cidr) end
    local max = ver == 4 and 32 or 128
    len = tonumber(len) or max
    if len > max then error("iotcls: not a network (CIDR): " .. cidr) end
    local bits = ver == 4 and len + 96 or len
    local net = { ver = ver, bits = bits, bytes = b, len = len }
    return net
end

local function in_net(b, net)
    local bits = net.bits
    for i = 1, 16 do
        if bits <= 0 then return true end
        local take = bits >= 8 and 8 or bits
        local mask = 256 - 2 ^ (8 - take)
        if bit.band(b[i], mask) ~= bit.band(net.bytes[i], mask) then return false end
        bits = bits - 8
    end
    return true
end

local function is_broadcast(b, net)
    -- the directed broadcast address of an IPv4 network of /30 or larger
    if net.ver ~= 4 or net.len > 30 or not in_net(b, net) then return false end
    local host = net.bits
    for i = 1, 16 do
        local lo = (i - 1) * 8
        if lo + 8 > host then
            local keep = host > lo and host - lo or 0
            local ones = 2 ^ (8 - keep) - 1
            if bit.band(b[i], ones) ~= ones then return false end
        end
    end
    return true
end

local Selector = {}
Selector.__index = Selector

local function new_selector(nets_text, devices_text)
    local s = setmetatable({ nets = {}, cache = {}, cached = 0 }, Selector)
    for item in (nets_text .. "," .. devices_text):gmatch("[^,]+") do
        if trim(item) ~= "" then s.nets[#s.nets + 1] = parse_net(item) end
    end
    return s
end

-- is this endpoint address a device?
function Selector:device(ip)
    local hit = self.cache[ip]
    if hit ~= nil then return hit end
    local b, ver = addr_bytes(ip)
    local yes = false
    if b ~= nil then
        local excluded
        if ver == 4 then
            excluded = b[13] >= 224 and b[13] < 240 or
                (b[13] == 255 and b[14] == 255 and b[15] == 255 and b[16] == 255)
        else
            excluded = b[1] == 255
        end
        if not excluded then
            for _, net in ipairs(self.nets) do
                if is_broadcast(b, net) then
                    excluded = true
                    break
                end
            end
        end
        if not excluded then
            for _, net in ipairs(self.nets) do
                if (net.ver == 4) == (ver == 4) and in_net(b, net) then
                    yes = true
                    break
                end
            end
        end
    end
    if self.cached >= 100000 then -- bounded: forget and start again
        self.cache, self.cached = {}, 0
    end
    self.cache[ip] = yes
    self.cached = self.cached + 1
    return yes
end

-- --------------------------------------------------------------------------------------------
-- transport: a Unix datagram socket, never blocking (a record the bridge cannot take now is
-- dropped and counted)

-- Suricata may load the script twice into one (pooled) Lua state: declare the C types once
if not pcall(ffi.typeof, "struct iotcls_sockaddr_un") then
    ffi.cdef [[
    struct iotcls_sockaddr_un { unsigned short sun_family; char sun_path[108]; };
    int socket(int domain, int type, int protocol);
    long sendto(int fd, const void *buf, size_t len, int flags, const void *addr,
                unsigned int alen);
    int close(int fd);
    int setsockopt(int fd, int level, int optname, const void *optval, unsigned int optlen);
    int usleep(unsigned int usec);
    char *strerror(int errnum);
    ]]
end

local AF_UNIX, SOCK_DGRAM, SOCK_CLOEXEC, MSG_DONTWAIT, MSG_NOSIGNAL = 1, 2, 0x80000, 0x40, 0x4000
local SOL_SOCKET, SO_SNDBUF, SO_SNDBUFFORCE, EAGAIN = 1, 7, 32, 11
local SNDBUF = 4 * 1024 * 1024 -- records sent and not yet read by the bridge: about 1,000

local Sender = {}
Sender.__index = Sender

local MAX_DATAGRAM = 60000 -- bytes: records are packed, one JSON object a line
local MAX_PENDING = 20000 -- records held while the bridge's queue is full; beyond: dropped

local function new_sender(path)
    if ffi.os ~= "Linux" then error("iotcls: the Unix socket transport needs Linux") end
    if #path >= 108 then error("iotcls: socket path too long: " .. path) end
    local fd = ffi.C.socket(AF_UNIX, bit.bor(SOCK_DGRAM, SOCK_CLOEXEC), 0)
    if fd < 0 then error("iotcls: socket(): " .. ffi.string(ffi.C.strerror(ffi.errno()))) end
    -- datagrams not yet read count against the sender's buffer: make room for bursts (the
    -- forced size needs CAP_NET_ADMIN; otherwise the kernel caps it at wmem_max)
    local size = ffi.new("int[1]", SNDBUF)
    if ffi.C.setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, size, 4) ~= 0 then
        ffi.C.setsockopt(fd, SOL_SOCKET, SO_SNDBUF, size, 4)
    end
    local addr = ffi.new("struct iotcls_sockaddr_un")
    addr.sun_family = AF_UNIX
    ffi.copy(addr.sun_path, path)
    return setmetatable({ fd = fd, addr = addr, alen = ffi.sizeof(addr), path = path,
        queue = {}, qhead = 1, qtail = 0, sent = 0, dropped = 0, datagrams = 0,
        failing = false, skip = 0 }, Sender)
end

-- queue one record; `flush` sends it (records of one packet go out together)
function Sender:add(line)
    local t = self.qtail + 1
    self.qtail = t
    self.queue[t] = line
    if t - self.qhead + 1 > MAX_PENDING then -- the bridge is not reading: drop the oldest
        self.queue[self.qhead] = nil
        self.qhead = self.qhead + 1
        self:drop(1, "its queue is full")
    end
end

function Sender:drop(n, why)
    self.dropped = self.dropped + n
    if not self.failing then
        self.failing = true
        api.log_warning(string.format("iotcls: dropping records: cannot send to the bridge at " ..
            "%s (%s); is `iotcls serve` running with its suricata section enabled?",
            self.path, why))
    end
end

-- send what is queued, packed into datagrams, without ever waiting (`patience_us`: except at
-- shutdown, up to that long in all). The bridge's socket queue full (EAGAIN): the records
-- stay queued for the next call; no bridge (no socket, nobody reading): they are dropped.
function Sender:flush(patience_us)
    patience_us = patience_us or 0
    while self.qhead <= self.qtail do
        local parts, size, last = {}, 0, self.qhead - 1
        while last < self.qtail and (size == 0 or size + #self.queue[last + 1] < MAX_DATAGRAM) do
            last = last + 1
            parts[#parts + 1] = self.queue[last]
            size = size + #self.queue[last] + 1
        end
        local msg = table.concat(parts, "\n")
        local n = ffi.C.sendto(self.fd, msg, #msg, bit.bor(MSG_DONTWAIT, MSG_NOSIGNAL),
            self.addr, self.alen)
        if n ~= #msg then
            local err = ffi.errno()
            if n < 0 and err == EAGAIN then
                if patience_us <= 0 then return false end
                ffi.C.usleep(1000)
                patience_us = patience_us - 1000
            else
                for i = self.qhead, last do self.queue[i] = nil end
                self.qhead = last + 1
                self:drop(#parts, n < 0 and ffi.string(ffi.C.strerror(err)) or "short write")
            end
        else
            for i = self.qhead, last do self.queue[i] = nil end
            self.qhead = last + 1
            self.sent = self.sent + #parts
            self.datagrams = self.datagrams + 1
            if self.failing then
                self.failing = false
                api.log_info(string.format("iotcls: the bridge at %s takes records again " ..
                    "(%d dropped so far)", self.path, self.dropped))
            end
        end
    end
    return true
end

function Sender:close()
    if self.fd >= 0 then ffi.C.close(self.fd) end
    self.fd = -1
end

-- --------------------------------------------------------------------------------------------
-- windows and records

local HEXDIGITS = ffi.new("const char[17]", "0123456789abcdef")
local hexbuf = ffi.new("uint8_t[?]", 2 * 65536)

-- the first n bytes of s as hex (a traced loop: a tenth of the cost of gsub)
local function tohex(s, n)
    if n > #s then n = #s end
    local p = ffi.cast("const uint8_t *", s)
    for i = 0, n - 1 do
        local b = p[i]
        hexbuf[2 * i] = HEXDIGITS[bit.rshift(b, 4)]
        hexbuf[2 * i + 1] = HEXDIGITS[bit.band(b, 15)]
    end
    return ffi.string(hexbuf, 2 * n)
end

-- ICMP "counterpart" types, as Zeek (and iotcls.pcap) use for the responder-side port
local ICMP4_PEER = { [8] = 0, [0] = 8, [13] = 14, [14] = 13, [15] = 16, [16] = 15, [10] = 9,
    [9] = 10, [17] = 18, [18] = 17 }
local ICMP6_PEER = { [128] = 129, [129] = 128, [133] = 134, [134] = 133, [135] = 136,
    [136] = 135, [130] = 131, [131] = 130, [139] = 140, [140] = 139, [144] = 145, [145] = 144 }

local W_US, NPKT, NPAY, NPAY_DHCP, LINK, MIN_FRAME, SLACK_US
local selector, sender
local windows = {} -- key -> open window
local fifo, head, tail = {}, 1, 0 -- open windows in start order
local flows = {} -- Suricata flow id -> { ts packets, ts bytes, tc packets, tc bytes, sides, last }
local nflows = 0
local last_purge = 0
local stats = { packets = 0, pseudo = 0, no_flow = 0, records = 0, early = 0, unsized = 0 }

local function json_str(s) return '"' .. s .. '"' end -- addresses and hex only: nothing to escape

local early_pending = {} -- open windows whose early record is not out yet
local last_early_sweep = 0

-- whether the window's early record is due before a packet at `now` is counted (now: nil at
-- the window's end): its first packets are in, or it has been idle for early_idle_s, which
-- must have ended before the window did (iotcls.schema.early_cut)
local function early_due(w, now)
    if w.early_sent or w.done or w.pkts == 0 then return false end
    if #w.offs >= NPKT then return true end
    if w.last + IDLE_US >= w.start + W_US then return false end
    return now == nil or now - w.last >= IDLE_US
end

local function send(w, early)
    local n = #w.offs
    local pays = {}
    for i = 1, n do pays[i] = json_str(w.pays[i]) end
    local msg = table.concat({
        '{"v":1,"flow_id":', string.format("%.0f", w.flow_id),
        ',"device_ip":', json_str(w.dev_ip), ',"device_port":', w.dev_port,
        ',"remote_ip":', json_str(w.rem_ip), ',"remote_port":', w.rem_port,
        ',"proto":', w.proto,
        ',"start":', string.format("%.0f.%06d", math.floor(w.start / 1e6), w.start % 1e6),
        ',"last":', string.format("%.0f.%06d", math.floor(w.last / 1e6), w.last % 1e6),
        ',"total_bytes":', w.bytes, ',"total_packets":', w.pkts,
        ',"offsets_us":[', table.concat(w.offs, ","), ']',
        ',"sizes":[', table.concat(w.sizes, ","), ']',
        ',"directions":[', table.concat(w.dirs, ","), ']',
        ',"payloads":[', table.concat(pays, ","), ']',
        ',"device_is_orig":', w.dev_orig and "true" or "false",
        early and ',"early":true}' or '}' })
    if early then
        stats.early = stats.early + 1
    else
        stats.records = stats.records + 1
    end
    sender:add(msg)
end

-- the window's early record: the window as it stands
local function emit_early(w)
    w.early_sent = true
    early_pending[w] = nil
    send(w, true)
end

local function emit(w)
    if early_due(w, nil) then emit_early(w) end
    w.early_sent = true
    early_pending[w] = nil
    w.done = true
    if windows[w.key] == w then windows[w.key] = nil end
    send(w, false)
end

-- every early_idle_s of traffic time: the early records of windows idle that long
local function early_sweep(now)
    if not EARLY or now - last_early_sweep < IDLE_US then return end
    last_early_sweep = now
    local due = {}
    for w in pairs(early_pending) do
        if early_due(w, now) then due[#due + 1] = w end
    end
    for _, w in ipairs(due) do emit_early(w) end
end

-- emit every window whose time is over (start order: the oldest are at the head)
local function sweep(now)
    while head <= tail do
        local w = fifo[head]
        if not w.done then
            if now < w.start + W_US then break end
            emit(w)
        end
        fifo[head] = nil
        head = head + 1
    end
end

local function payload(f)
    if f.payload == nil then f.payload = api.packet_payload() or "" end
    return f.payload
end

-- the IP length computed from the headers (IPv4 without options, IPv6 without extension
-- headers, a TCP header without options but for a direction's first packet, SYN or SYN-ACK,
-- which carries at least the MSS option); other protocols: nil
local function header_length(f, first_of_dir)
    local ip = f.ver == 4 and 20 or 40
    if f.proto == 17 then return ip + 8 + #payload(f) end
    if f.proto == 6 then return ip + (first_of_dir and 24 or 20) + #payload(f) end
    return nil
end

-- the IP length of a packet whose frame length is `frame` (nil: unknown)
local function ip_length(frame, f, first_of_dir)
    if frame == nil then -- the flow's counters were lost (see purge_flows): estimate
        return header_length(f, first_of_dir) or 0
    end
    local len = frame - LINK
    if frame ~= MIN_FRAME or f.ver ~= 4 then return len end
    -- a minimum-size Ethernet frame may carry padding: take the smaller header length
    local h = header_length(f, first_of_dir)
    return h ~= nil and math.min(len, h) or len
end

-- the device sides of a packet: one per endpoint that is a device. `pkt_is_orig`: whether the
-- packet goes in its flow's own direction (originator to responder)
local function sides_of(src, dst, proto, sp, dp, pkt_is_orig)
    local sides = {}
    local src_dev, dst_dev = selector:device(src), selector:device(dst)
    if proto == 1 or proto == 58 then -- ICMP: type, and the counterpart type or the code
        local peer = (proto == 1 and ICMP4_PEER or ICMP6_PEER)[sp]
        sp, dp = sp, peer or dp
    elseif proto ~= 6 and proto ~= 17 then
        sp, dp = 0, 0
    end
    if src_dev then
        sides[#sides + 1] = { dev_ip = src, dev_port = sp, rem_ip = dst, rem_port = dp,
            dev_orig = pkt_is_orig, dev_sends = true }
    end
    if dst_dev then
        sides[#sides + 1] = { dev_ip = dst, dev_port = dp, rem_ip = src, rem_port = sp,
            dev_orig = not pkt_is_orig, dev_sends = false }
    end
    for _, s in ipairs(sides) do
        s.key = table.concat({ s.dev_ip, s.dev_port, s.rem_ip, s.rem_port, proto }, "|")
    end
    return sides
end

local function new_flow(id, now, ver, src, dst, proto, sp, dp)
    local _, fsrc, _, _, fsp, _ = api.flow_tuple()
    local pkt_is_orig = src == fsrc and (proto ~= 6 and proto ~= 17 or sp == fsp)
    local sides = sides_of(src, dst, proto, sp, dp, pkt_is_orig)
    local f = { 0, 0, 0, 0, sides = sides, ver = ver, proto = proto, last = now,
        pkt_is_orig = pkt_is_orig }
    flows[id] = f
    nflows = nflows + 1
    return f
end

local function purge_flows(now)
    -- forget flows idle for two hours of traffic time (longer than Suricata's timeouts)
    local keep, n = {}, 0
    for id, f in pairs(flows) do
        if now - f.last < 7200e6 then
            keep[id] = f
            n = n + 1
        end
    end
    flows, nflows = keep, n
end

-- `to_remote`: the packet goes from the device to the remote side
local function add_packet(f, side, proto, now, size, to_remote)
    local w = windows[side.key]
    if w ~= nil and early_due(w, now) then emit_early(w) end
    if w ~= nil and now >= w.start + W_US then
        emit(w)
        w = nil
    end
    if w == nil then
        w = { key = side.key, dev_ip = side.dev_ip, dev_port = side.dev_port,
            rem_ip = side.rem_ip, rem_port = side.rem_port, proto = proto,
            dev_orig = side.dev_orig, flow_id = f.id, start = now, last = now, bytes = 0,
            pkts = 0, offs = {}, sizes = {}, dirs = {}, pays = {}, early_sent = not EARLY }
        if EARLY then early_pending[w] = true end
        windows[side.key] = w
        tail = tail + 1
        fifo[tail] = w
    end
    w.last = now
    w.bytes = w.bytes + size
    w.pkts = w.pkts + 1
    local n = #w.offs
    if n >= NPKT then return end -- the window has its packets: only its totals grow
    n = n + 1
    w.offs[n] = now - w.start -- whole microseconds: concatenated as integers
    w.sizes[n] = size
    w.dirs[n] = to_remote and 1 or 0
    if proto == 1 or proto == 58 or NPAY == 0 then
        w.pays[n] = ""
    elseif proto == 17 and (w.dev_port == 67 or w.dev_port == 68 or w.rem_port == 67 or
            w.rem_port == 68) then
        w.pays[n] = tohex(payload(f), NPAY_DHCP) -- DHCP: the options too
    else
        w.pays[n] = tohex(payload(f), NPAY)
    end
end

-- --------------------------------------------------------------------------------------------
-- the output script's hooks

function init(args)
    return { type = "packet" }
end

function setup(args)
    local path, found = load_config()
    W_US = number("window_s", 1) * 1e6
    NPKT = number("packets", 1)
    NPAY = math.min(number("payload_bytes", 0), 65536)
    NPAY_DHCP = math.min(number("dhcp_payload_bytes", 0), 65536)
    LINK = number("link_header_bytes", 0)
    MIN_FRAME = LINK + 46
    SLACK_US = number("reorder_s", 0) * 1e6
    IDLE_US = number("early_idle_s", 0) * 1e6
    EARLY = cfg.early_records == "yes" or cfg.early_records == "true" or cfg.early_records == "1"
    selector = new_selector(cfg.local_nets, cfg.devices)
    if #selector.nets == 0 then
        api.log_warning("iotcls: no local_nets or devices configured: no endpoint is a device, " ..
            "no records will be sent (" .. path .. ")")
    end
    sender = new_sender(cfg.socket)
    api.log_info(string.format("iotcls: flow records to %s (window %g s, %d packets, %d payload " ..
        "bytes, %d of DHCP, local nets %s%s)", cfg.socket, W_US / 1e6, NPKT, NPAY, NPAY_DHCP,
        cfg.local_nets, found and "" or "; no " .. path))
end

local function handle_packet()
    local id = api.flow_id()
    if id == nil then
        stats.no_flow = stats.no_flow + 1
        return
    end
    local tsp, tsb, tcp, tcb = api.flow_stats()
    local f = flows[id]
    local sec, usec = api.packet_time()
    local now = sec * 1e6 + usec
    local ver, src, dst, proto, sp, dp = api.packet_tuple()
    if ver == nil then return end
    if f == nil then
        f = new_flow(id, now, ver, src, dst, proto, sp, dp)
        f.id = id
        if tsp + tcp > 1 then f.unsized = true end -- first seen after a purge: sizes unknown
        if nflows % 4096 == 0 and now - last_purge > 600e6 then
            last_purge = now
            purge_flows(now)
            flows[id] = f
        end
    end
    local to_server = tsp > f[1]
    local frame
    if f.unsized then
        to_server = f.pkt_is_orig
    elseif to_server then
        frame = tsb - f[2]
    elseif tcp > f[3] then
        frame = tcb - f[4]
    else
        stats.pseudo = stats.pseudo + 1 -- counted nowhere: a pseudo-packet
        return
    end
    local first_of_dir = (to_server and tsp or tcp) == 1
    f[1], f[2], f[3], f[4] = tsp, tsb, tcp, tcb
    f.last = now
    f.payload = nil
    stats.packets = stats.packets + 1
    -- windows end by time; worker threads hand packets over slightly out of time order, so
    -- a window is sent only reorder_s after its end (its own key's next packet ends it at once)
    sweep(now - SLACK_US)
    early_sweep(now - SLACK_US)
    if f.unsized then -- first seen after its counters were forgotten
        f.unsized = false
        stats.unsized = stats.unsized + 1
        frame = nil
    end
    if proto ~= f.proto then
        -- an ICMP error Suricata files under the flow of the packet it quotes: a packet of
        -- its own key, as in the pcap sensor and Zeek
        local size = frame and frame - LINK or 0
        local sides = sides_of(src, dst, proto, sp, dp, true)
        for _, side in ipairs(sides) do
            side.dev_orig = side.dev_sends
            add_packet(f, side, proto, now, size, side.dev_sends)
        end
        return
    end
    if #f.sides == 0 then return end
    local size = ip_length(frame, f, first_of_dir)
    for _, side in ipairs(f.sides) do
        add_packet(f, side, proto, now, size, to_server == side.dev_orig)
    end
end

local blocked = 0 -- packets since the bridge's queue was last found full

function log(args)
    handle_packet()
    if sender.qhead <= sender.qtail then
        -- records are waiting: send them, but while the bridge's queue is full try only
        -- every 64th packet (a failed send is a system call per packet)
        if blocked == 0 or blocked >= 64 then
            blocked = sender:flush() and 0 or 1
        else
            blocked = blocked + 1
        end
    end
end

function deinit(args)
    -- the capture (or Suricata) ended: every open window ends too; the bridge gets up to
    -- 5 s in all to take them
    while head <= tail do
        local w = fifo[head]
        if not w.done then emit(w) end
        fifo[head] = nil
        head = head + 1
    end
    if not sender:flush(5e6) then
        sender:drop(sender.qtail - sender.qhead + 1, "the bridge took nothing for 5 s")
    end
    api.log_info(string.format("iotcls: %d packets, %d records sent, %d dropped (bridge not " ..
        "taking them), %d datagrams, %d pseudo-packets ignored, %d packets without a flow, " ..
        "%d of the records made were early ones", stats.packets, sender.sent, sender.dropped,
        sender.datagrams, stats.pseudo, stats.no_flow, stats.early))
    sender:close()
end
