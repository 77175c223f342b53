//! Step 1's end-to-end test, in namespaces (client, router, LB, three backends): at
//! least 300 real TCP connections (HTTP GETs) to the VIP all succeed, every backend
//! serves a share within binomial bounds, replies reach the client directly from the
//! backends (never through the LB), and every namespace is gone afterwards, also when
//! the test body panics.
//!
//! Needs root (see `netns::require_privileges`) and the agent binary
//! (`XDPLB_AGENT_BIN`, else `target/release/lb-agent`).

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
    sync::Mutex,
};

use xdplb_tests::require_privileges;
use xdplb_tests::{
    netns,
    scenario::{self, BedOptions, L4Bed, LoadOptions},
    topology::Topology,
};

/// Which of `names` `ip netns list` still shows.
fn leftover(names: &[String]) -> Vec<String> {
    netns::list_namespaces()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| names.contains(n))
        .collect()
}

#[test]
fn l4_end_to_end_300_connections() -> anyhow::Result<()> {
    require_privileges!();
    let opts = BedOptions::default();
    let expected = scenario::expected_shares(&opts.config, "web");
    let (names, bpffs);
    {
        let bed = L4Bed::start(&opts)?;
        names = bed.topo.namespaces();
        bpffs = bed.topo.bpffs().to_path_buf();
        let outcome = bed.measure(&LoadOptions::default())?;
        eprintln!("outcome: {outcome:#?}");
        let problems = outcome.problems(&expected);
        assert!(
            problems.is_empty(),
            "step-1 acceptance failed:\n  - {}\nagent log (tail):\n{}",
            problems.join("\n  - "),
            bed.topo.agent_log_tail(40)
        );
        assert!(outcome.load.requested >= 300);
    }
    assert_eq!(
        leftover(&names),
        Vec::<String>::new(),
        "namespaces left behind"
    );
    assert!(!bpffs.exists(), "{} left behind", bpffs.display());
    Ok(())
}

#[test]
fn namespaces_are_removed_when_the_test_panics() {
    require_privileges!();
    let made: Mutex<(Vec<String>, Option<PathBuf>)> = Mutex::default();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let topo = Topology::build().expect("building the topology");
        *made.lock().unwrap() = (topo.namespaces(), Some(topo.bpffs().to_path_buf()));
        assert_eq!(
            leftover(&topo.namespaces()).len(),
            6,
            "all six namespaces exist while the guard lives"
        );
        panic!("deliberate panic with the topology alive");
    }));
    let message = result.expect_err("the body panics");
    assert_eq!(
        message.downcast_ref::<&str>(),
        Some(&"deliberate panic with the topology alive")
    );
    let (names, bpffs) = made.into_inner().unwrap();
    assert_eq!(names.len(), 6);
    assert_eq!(
        leftover(&names),
        Vec::<String>::new(),
        "namespaces left behind after a panic"
    );
    let bpffs = bpffs.expect("bpffs path recorded");
    assert!(
        !bpffs.exists(),
        "{} left behind after a panic",
        bpffs.display()
    );
}
