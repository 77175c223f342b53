//! The integration suites of xdplb, in one test binary (`--test integration`): each suite is
//! a module, so its tests are named `<suite>::<test>` and a suite runs alone with
//! `cargo test -p xdplb-tests --test integration <suite>::`.
//!
//! One binary instead of one per suite: every suite links lb-agent, tokio, hyper and aya,
//! and each separate binary compiled its own copy of the generic code it used and linked
//! it again, which cost more CI time than any single suite (issue 8). Tests of different
//! suites may now run at the same time (as tests of one suite always could): each test
//! bed has its own namespace prefix (`xdplb_tests::netns`).
//!
//! A new suite is a file here plus a `mod` line below; `every_file_here_is_a_module`
//! fails if the `mod` line is missing (the file would otherwise never compile or run).

mod bgp;
mod cluster;
mod e2e_control;
mod e2e_gue;
mod e2e_ipv6;
mod e2e_l4;
mod e2e_l7;
mod e2e_l7_hitless;
mod e2e_nexthop;
mod e2e_pmtu;
mod ebpf_object;
mod ecmp;
mod netlink;
mod reconciler;
mod testbed;
mod xdp_fixtures;
mod xdp_fixtures_v6;
mod xdp_fuzz;

#[test]
fn every_file_here_is_a_module() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration");
    let main = include_str!("main.rs");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("reading tests/integration") {
        let path = entry.expect("reading tests/integration").path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|ext| ext == "rs")
            && stem != "main"
            && !main.lines().any(|line| line == format!("mod {stem};"))
        {
            missing.push(stem.to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "tests/integration/main.rs does not declare `mod` for {missing:?}: those suites would never run"
    );
}
