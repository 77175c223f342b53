//! GUE end to end (issue 11, item 2): the step-1 namespaces with `encap = "gue"` on a
//! port other than the default (`gue_port = 7080`), the backends running
//! `lb-agent decap attach --gue-port 7080`. At least 300 real TCP connections (HTTP
//! GETs) through the LB all succeed, every backend serves its share, replies go
//! straight to the client, and every backend's decapsulator counted GUE packets and no
//! IPIP ones: the tunnel really was UDP.
//!
//! Needs root (see `netns::require_privileges`) and the agent binary
//! (`XDPLB_AGENT_BIN`, else `target/release/lb-agent`).

use std::path::PathBuf;

use anyhow::{Context as _, ensure};
use aya::maps::{Map, MapData, PerCpuArray};
use lb_agent::dataplane::loader::{self, Role};
use lb_common::{maps as names, stats::Counter};
use xdplb_tests::{
    netns, require_privileges,
    scenario::{self, BedOptions, L4Bed, LoadOptions},
    topology::{Topology, agent_binary},
};

const GUE_PORT: u16 = 7080;

/// `counter` of the decapsulator pinned in `ns` (summed over CPUs).
fn decap_counter(ns: &str, bpffs: PathBuf, counter: Counter) -> anyhow::Result<u64> {
    netns::in_netns(ns, move || {
        let dir = loader::pin_dir(&bpffs, "eth0", Role::Decap)?;
        let data = MapData::from_pin(dir.join(names::COUNTERS))
            .with_context(|| format!("opening the decap counters under {}", dir.display()))?;
        let counters: PerCpuArray<_, u64> = Map::PerCpuArray(data).try_into()?;
        Ok(counters.get(&counter.index(), 0)?.iter().sum())
    })
}

#[test]
fn gue_end_to_end_300_connections() -> anyhow::Result<()> {
    require_privileges!();
    let opts = BedOptions {
        config: Topology::default_config()
            .dataplane("encap", "gue")
            .dataplane("gue_port", GUE_PORT),
        ..BedOptions::default()
    };
    let expected = scenario::expected_shares(&opts.config, "web");
    let bed = L4Bed::start(&opts)?;
    let t = &bed.topo;
    // The bed attached the decapsulators with the default port; attach them again the
    // way an operator of a GUE balancer on port 7080 would (this replaces them).
    let bin = agent_binary()?;
    for b in &t.backends {
        let out = netns::exec(
            &b.ns,
            &[
                bin.to_string_lossy().as_ref(),
                "decap",
                "attach",
                "--iface",
                "eth0",
                "--bpffs",
                t.bpffs().to_string_lossy().as_ref(),
                "--gue-port",
                &GUE_PORT.to_string(),
            ],
        )
        .with_context(|| format!("decap attach --gue-port in {}", b.role))?;
        ensure!(
            out.contains(&format!("GUE on UDP port {GUE_PORT}")),
            "decap attach did not say it takes GUE on {GUE_PORT}: {out}"
        );
    }
    let outcome = bed.measure(&LoadOptions::default())?;
    eprintln!("outcome: {outcome:#?}");
    let problems = outcome.problems(&expected);
    ensure!(
        problems.is_empty(),
        "GUE end to end failed:\n  - {}\nagent log (tail):\n{}",
        problems.join("\n  - "),
        t.agent_log_tail(40)
    );
    ensure!(outcome.load.requested >= 300);
    for b in &t.backends {
        let gue = decap_counter(&b.ns, t.bpffs().to_path_buf(), Counter::DecapGue)?;
        let ipip = decap_counter(&b.ns, t.bpffs().to_path_buf(), Counter::Decap)?;
        eprintln!("{}: decap_gue {gue}, decap (IPIP) {ipip}", b.role);
        ensure!(
            gue > 0 && ipip == 0,
            "{}: {gue} GUE and {ipip} IPIP packets decapsulated; want GUE only",
            b.role
        );
    }
    Ok(())
}
