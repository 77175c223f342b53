//! Indices of the global per-CPU counter array ([`crate::maps::COUNTERS`]).
//!
//! [`Counter`]s occupy `0 .. Counter::COUNT`, [`DropReason`]s follow them. Each has a
//! stable label, used as the Prometheus label value (`xdplb_drops_total{reason}`).

/// What happened to a packet that was not dropped.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every packet the balancer program saw. Not counted by the program (one per-CPU
    /// update less per packet, issue 12 item 2): every packet of `xdp_lb` ends under
    /// exactly one outcome ([`Counter::is_outcome`], or a [`DropReason`]), and the agent
    /// reads `rx` as their sum (`lb-agent/src/dataplane/stats.rs`); its slot stays 0.
    Rx = 0,
    /// Encapsulated and sent back out of the receiving interface (XDP_TX).
    Tx,
    /// Encapsulated and redirected to another interface (XDP_REDIRECT).
    Redirect,
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed to the kernel.
    PassNotIp,
    /// IP, but not TCP/UDP to a configured VIP: passed.
    PassNotVip,
    /// An IP fragment: passed (the kernel reassembles).
    PassFragment,
    /// An IPv4 header with options: passed.
    PassIpOptions,
    /// Shorter than its headers claim: passed (the kernel counts and drops it).
    PassTruncated,
    /// For an L7 VIP: passed to the agent's proxy.
    PassL7,
    /// The next hop towards the backend has no resolved neighbour yet: passed unchanged.
    PassNoNeighbour,
    /// No tunnel source address of the packet's family is configured: passed unchanged.
    PassNoSource,
    /// A flow-table hit whose backend is no longer active: re-hashed onto the ring.
    FlowRehash,
    /// A new flow: a backend was picked from the ring and recorded.
    FlowNew,
    /// A new flow could not be recorded in the flow table.
    FlowInsertFailed,
    /// Fib lookup gave no next hop for another reason (forwarding disabled on the
    /// interface, a local destination, ...): passed unchanged.
    PassFibFailed,
    /// Decap program: tunnelled packet decapsulated and handed to the stack.
    Decap,
    /// A flow's second packet moved it from the new-flow table into the flow table.
    FlowPromoted,
    /// An ICMP echo request to an L4 VIP address, answered from XDP (XDP_TX).
    IcmpEchoReply,
    /// A DF packet to a VIP that would exceed `dataplane.mtu` once encapsulated:
    /// answered with ICMP "fragmentation needed" from the VIP (XDP_TX).
    IcmpFragNeeded,
    /// An ICMP "destination unreachable" about a VIP flow (its quoted packet is a
    /// reply VIP -> client), tunnelled to the backend that owns the flow. Counted with
    /// `tx` / `redirect`, which say how it left.
    IcmpErrorForwarded,
    /// An IPv6 packet whose first header after the fixed one is an extension header
    /// (hop-by-hop, routing, destination options, AH, mobility, HIP, shim6): passed to
    /// the kernel, never parsed past it. (A fragment header counts as `pass_fragment`.)
    PassIpv6Ext,
    /// An IPv6 packet to a VIP that would exceed `dataplane.mtu` once encapsulated:
    /// answered with ICMPv6 "packet too big" from the VIP (XDP_TX). IPv6 has no DF
    /// bit: every such packet gets one.
    Icmp6TooBig,
    /// Decap program: a GUE packet (UDP to `gue_port` at a tunnel address)
    /// decapsulated and handed to the stack.
    DecapGue,
    /// A QUIC short-header packet sent to the backend its destination connection ID
    /// names (a live backend of the service).
    QuicCidRouted,
    /// A QUIC short-header packet to a `quic` service whose connection ID names no live
    /// backend of it (unknown format or server id, or the backend left): balanced by
    /// the flow table and ring instead.
    QuicCidUnknown,
    /// A new flow sent by the ring without being recorded in the new-flow table: this
    /// CPU saw more than `dataplane.max_new_flows_per_cpu` new flows this second
    /// (Katran's admission rule). Its next packets follow the ring until one is
    /// recorded (bookkeeping, counted with `tx` / `redirect`).
    FlowNotInserted,
}

impl Counter {
    pub const COUNT: u32 = Counter::FlowNotInserted as u32 + 1;
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::Rx,
        Counter::Tx,
        Counter::Redirect,
        Counter::PassNotIp,
        Counter::PassNotVip,
        Counter::PassFragment,
        Counter::PassIpOptions,
        Counter::PassTruncated,
        Counter::PassL7,
        Counter::PassNoNeighbour,
        Counter::PassNoSource,
        Counter::FlowRehash,
        Counter::FlowNew,
        Counter::FlowInsertFailed,
        Counter::PassFibFailed,
        Counter::Decap,
        Counter::FlowPromoted,
        Counter::IcmpEchoReply,
        Counter::IcmpFragNeeded,
        Counter::IcmpErrorForwarded,
        Counter::PassIpv6Ext,
        Counter::Icmp6TooBig,
        Counter::DecapGue,
        Counter::QuicCidRouted,
        Counter::QuicCidUnknown,
        Counter::FlowNotInserted,
    ];

    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }
    /// Whether the counter says what became of a packet of `xdp_lb` (passed, sent,
    /// answered: each packet is counted under exactly one of these or one
    /// [`DropReason`]) rather than bookkeeping along the way (the flow tables, QUIC's
    /// choice, an ICMP error forwarded, counted with `tx` / `redirect`), the decap
    /// program's counters, or `rx` itself, which is the sum of the outcomes.
    pub const fn is_outcome(self) -> bool {
        !matches!(
            self,
            Counter::Rx
                | Counter::FlowNew
                | Counter::FlowRehash
                | Counter::FlowInsertFailed
                | Counter::FlowPromoted
                | Counter::FlowNotInserted
                | Counter::Decap
                | Counter::DecapGue
                | Counter::QuicCidRouted
                | Counter::QuicCidUnknown
                | Counter::IcmpErrorForwarded
        )
    }

    pub const fn label(self) -> &'static str {
        match self {
            Counter::Rx => "rx",
            Counter::Tx => "tx",
            Counter::Redirect => "redirect",
            Counter::PassNotIp => "pass_not_ip",
            Counter::PassNotVip => "pass_not_vip",
            Counter::PassFragment => "pass_fragment",
            Counter::PassIpOptions => "pass_ip_options",
            Counter::PassTruncated => "pass_truncated",
            Counter::PassL7 => "pass_l7",
            Counter::PassNoNeighbour => "pass_no_neighbour",
            Counter::PassNoSource => "pass_no_source",
            Counter::FlowRehash => "flow_rehash",
            Counter::FlowNew => "flow_new",
            Counter::FlowInsertFailed => "flow_insert_failed",
            Counter::PassFibFailed => "pass_fib_failed",
            Counter::Decap => "decap",
            Counter::FlowPromoted => "flow_promoted",
            Counter::IcmpEchoReply => "icmp_echo_reply",
            Counter::IcmpFragNeeded => "icmp_frag_needed",
            Counter::IcmpErrorForwarded => "icmp_error_forwarded",
            Counter::PassIpv6Ext => "pass_ipv6_ext",
            Counter::Icmp6TooBig => "icmp6_packet_too_big",
            Counter::DecapGue => "decap_gue",
            Counter::QuicCidRouted => "quic_cid_routed",
            Counter::QuicCidUnknown => "quic_cid_unknown",
            Counter::FlowNotInserted => "flow_not_inserted",
        }
    }
}

/// Why a packet was dropped.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The service has no backend to send to (empty ring).
    NoBackend = 0,
    /// The packet could not be grown for the tunnel header.
    EncapFailed,
    /// The route to the backend is unreachable, blackholed or prohibited.
    NoRoute,
    /// The encapsulated packet would exceed the MTU towards the backend (`dataplane.mtu`,
    /// or the egress interface's MTU) and cannot be answered with ICMP "fragmentation
    /// needed": DF clear (the tunnel cannot fragment), or an ICMP error itself.
    TooBig,
    /// The source matched a `[security] deny` prefix.
    FilterDeny,
    /// The allow list is in use and the source, on its way to a VIP, matched none of it.
    FilterNotAllowed,
    /// A packet that would have created a flow, from a source (masked to the limit's
    /// prefix) over its `new_flows_per_source` rate.
    NewFlowLimit,
    /// ICMP to an L4 VIP address that is neither an echo request nor a destination
    /// unreachable about a flow of an L4 service on it (the address is not the
    /// kernel's: passing it up would have it routed back out).
    IcmpUnhandled,
    /// An ICMP error to a VIP whose quoted packet is cut short or malformed (not a
    /// 20-byte IPv4 header of a first fragment with 8 bytes after it, or not sent
    /// from the address the error is addressed to).
    IcmpBadQuote,
    /// A VIP packet too big for the tunnel that would have been answered with ICMP
    /// "fragmentation needed" / ICMPv6 "packet too big", while this CPU had already sent
    /// `dataplane.icmp_errors_per_cpu` of those this second: dropped unanswered (the
    /// kernel limits its own ICMP errors the same way, `net.ipv4.icmp_msgs_per_sec`).
    IcmpErrorLimited,
}

impl DropReason {
    pub const COUNT: u32 = DropReason::IcmpErrorLimited as u32 + 1;
    pub const ALL: [DropReason; DropReason::COUNT as usize] = [
        DropReason::NoBackend,
        DropReason::EncapFailed,
        DropReason::NoRoute,
        DropReason::TooBig,
        DropReason::FilterDeny,
        DropReason::FilterNotAllowed,
        DropReason::NewFlowLimit,
        DropReason::IcmpUnhandled,
        DropReason::IcmpBadQuote,
        DropReason::IcmpErrorLimited,
    ];

    #[inline(always)]
    pub const fn index(self) -> u32 {
        Counter::COUNT + self as u32
    }

    pub const fn label(self) -> &'static str {
        match self {
            DropReason::NoBackend => "no_backend",
            DropReason::EncapFailed => "encap_failed",
            DropReason::NoRoute => "no_route",
            DropReason::TooBig => "too_big",
            DropReason::FilterDeny => "filter_deny",
            DropReason::FilterNotAllowed => "filter_not_allowed",
            DropReason::NewFlowLimit => "new_flow_limit",
            DropReason::IcmpUnhandled => "icmp_unhandled",
            DropReason::IcmpBadQuote => "icmp_bad_quote",
            DropReason::IcmpErrorLimited => "icmp_error_limited",
        }
    }
}

/// Entries of [`crate::maps::COUNTERS`].
pub const COUNTERS_LEN: u32 = Counter::COUNT + DropReason::COUNT;
