//! The pipeline across real links: hosts in network namespaces of the
//! project's own (`sollol::lab`), each link capped and delayed. Skipped,
//! with the reason, where namespaces cannot be made.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use sollol::lab::{Lab, LinkSpec};

const KEY: &str = "lab-test-key";

fn lab(hosts: usize, link: LinkSpec) -> Option<Lab> {
    lab_with(vec![link; hosts])
}

/// A lab whose hosts each have their own link.
fn lab_with(links: Vec<LinkSpec>) -> Option<Lab> {
    if let Some(why) = sollol::lab::unavailable() {
        eprintln!("skipped: {why}");
        return None;
    }
    Some(Lab::up_with(links, None, &common::sollol_bin()).expect("the lab"))
}

/// `sollol ARGS` on the lab's host 0 (the head's), with a registry of its
/// own under `config`; its stdout, once it succeeded.
fn head_cli(lab: &Lab, config: &std::path::Path, args: &[&str]) -> Vec<u8> {
    let mut c = lab.exec(0, common::sollol_bin());
    c.env("SOLLOL_CONFIG", config).args(args).args(["--cluster-key", KEY]);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// A stage killed with SIGKILL inside the lab mid-generation: the head (on
/// a host of its own) re-plans over the survivors, replays, and the stream
/// goes on with the greedy tokens of an undisturbed run (f32 wire).
#[test]
fn a_stage_killed_inside_the_lab_keeps_the_stream_identical() {
    let model = common::smollm2();
    let link = LinkSpec { rate: Some("100mbit".into()), rtt: Duration::from_millis(2), ..Default::default() };
    let Some(lab) = lab(4, link) else { return };
    let mut nodes = Vec::new();
    for host in 1..4 {
        nodes.push(lab.node(host, &["--cluster-key", KEY]).unwrap());
        lab.wait_node(host, Duration::from_secs(10)).unwrap();
    }
    let addrs: Vec<&str> = nodes.iter().map(|(_, a)| a.as_str()).collect();
    let generate = || {
        let mut c = lab.exec(0, common::sollol_bin());
        c.args(["generate", "--cluster-key", KEY, "--wire", "f32", "-n", "48", "--model"]).arg(&model).args([
            "--nodes",
            &addrs.join(","),
            "Once upon a time, in a small village by the sea, there lived",
        ]);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    };
    let reference = generate().output().unwrap();
    assert!(reference.status.success(), "{}", String::from_utf8_lossy(&reference.stderr));
    let expected = String::from_utf8_lossy(&reference.stdout).to_string();
    assert!(expected.len() > 100, "{expected}");

    let mut child = generate().spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 256];
    while text.len() < 40 {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended before the kill");
        text.extend_from_slice(&buf[..n]);
    }
    // The middle stage's node dies.
    std::process::Command::new("kill").args(["-9", &nodes[1].0.to_string()]).status().unwrap();
    out.read_to_end(&mut text).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&text), expected, "the stream after the kill differs; {stderr}");
    assert!(stderr.contains(&format!("nodes down: {}", addrs[1])) && stderr.contains("replanned"), "the recovery is reported: {stderr}");
}

/// The head times a node's link (`nodes list --probe`, what `serve` does
/// every five minutes): behind 100 Mbit/s caps it measures about that,
/// where loopback gives gigabits.
#[test]
fn a_probe_measures_a_capped_links_rate() {
    let link = LinkSpec { rate: Some("100mbit".into()), rtt: Duration::from_millis(2), ..Default::default() };
    let Some(lab) = lab(2, link) else { return };
    let (_, addr) = lab.node(1, &["--cluster-key", KEY]).unwrap();
    lab.wait_node(1, Duration::from_secs(10)).unwrap();
    let config = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| head_cli(&lab, config.path(), args);
    run(&["nodes", "add", &addr, "--name", "far"]);
    let listed: serde_json::Value = serde_json::from_slice(&run(&["nodes", "list", "--json", "--probe"])).unwrap();
    let bits = listed[0]["link_bits_per_sec"].as_f64().unwrap_or_else(|| panic!("no link measured: {listed}"));
    assert!((60e6..=110e6).contains(&bits), "a 100 Mbit/s link measured at {:.1} Mbit/s", bits / 1e6);
}

/// Each link of a chain's ring timed where it is (`plan --explain` over
/// registered nodes): the head's own link is slow (10 Mbit/s), the nodes'
/// faster (100 Mbit/s) and 40 ms away. A decode token crosses a → b and
/// b → a, links the head cannot see: each timed by the node it leaves at
/// about 100 Mbit/s, not the head's 10 (a probe as short as on a near link
/// would time it in QUIC's slow start).
#[test]
fn a_chains_links_are_timed_where_they_are() {
    let head = LinkSpec { rate: Some("10mbit".into()), ..Default::default() };
    let node = LinkSpec { rate: Some("100mbit".into()), rtt: Duration::from_millis(40), ..Default::default() };
    let Some(lab) = lab_with(vec![head, node.clone(), node]) else { return };
    let (_, a) = lab.node(1, &["--cluster-key", KEY]).unwrap();
    let (_, b) = lab.node(2, &["--cluster-key", KEY]).unwrap();
    lab.wait_node(1, Duration::from_secs(10)).unwrap();
    lab.wait_node(2, Duration::from_secs(10)).unwrap();
    let config = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| head_cli(&lab, config.path(), args);
    run(&["nodes", "add", &a, "--name", "a"]);
    run(&["nodes", "add", &b, "--name", "b"]);
    let model = common::smollm2().display().to_string();
    let plan = ["plan", "--model", &model, "--nodes", "a,b", "--explain", "--decode-tok-s", "200", "--batched-tok-s", "700", "--json"];
    let v: serde_json::Value = serde_json::from_slice(&run(&plan)).unwrap();
    let links = v["explain"]["links"].as_array().unwrap_or_else(|| panic!("no links: {v}"));
    assert_eq!(links.len(), 2, "a → b and b → a: {v}");
    let mbit = |i: usize| links[i]["bits_per_sec"].as_f64().unwrap_or(0.0) / 1e6;
    let ms = |i: usize| links[i]["rtt_secs"].as_f64().unwrap_or(0.0) * 1e3;
    eprintln!("timed: {}", (0..2).map(|i| format!("{:.1} Mbit/s, {:.2} ms", mbit(i), ms(i))).collect::<Vec<_>>().join("; "));
    for hop in 0..2 {
        assert!((60.0..=110.0).contains(&mbit(hop)), "hop {hop} (100 Mbit/s) timed at {:.1} Mbit/s: {v}", mbit(hop));
        assert!((39.0..=55.0).contains(&ms(hop)), "hop {hop} (40 ms) timed at {:.2} ms: {v}", ms(hop));
    }
}
