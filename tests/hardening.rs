//! A node against a buggy or hostile peer, on real `sollol node` processes:
//! each input that once panicked, aborted or bloated a node gets a clear,
//! typed error, and the node goes on serving everyone else.

mod common;

use std::time::Duration;

use common::NodeProc;
use sollol::head::pipeline::Pipeline;
use sollol::net::auth::{client_handshake, ClusterKey};
use sollol::net::connection::split;
use sollol::net::frame::{PREFIX_LEN, PROTOCOL_VERSION};
use sollol::net::message::{ErrorCode, KvStateHeader, Message, PeerRole};
use sollol::net::tensor::WireDType;
use sollol::net::{tls, NetError};

const KEY: &str = "test-cluster-key";
const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];

/// The whole default model on one node.
async fn solo(node: &NodeProc) -> Pipeline {
    let mut p = Pipeline::connect(std::slice::from_ref(&node.addr), &ClusterKey::new(Some(KEY))).await.unwrap();
    let model = common::smollm2().display().to_string();
    p.load(&model, None, std::slice::from_ref(&(0..30)), WireDType::F32).await.unwrap();
    p
}

/// The node still answers pings and runs a session end to end.
async fn still_serves(p: &Pipeline, session: u64) {
    p.ping(0).await.expect("the node answers pings");
    let r = p.step(session, &PROMPT, Some(64), Some(common::greedy()), false).await.expect("a session runs");
    assert_eq!(r.token, Some(7042), "' Paris'");
    p.close(session).await;
}

fn code(e: &NetError) -> Option<ErrorCode> {
    e.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_kv_imports_are_refused_and_the_node_keeps_serving() {
    let node = NodeProc::spawn(Some(KEY), &[]);
    let p = solo(&node).await;
    let h = |n_layers, n_kv_heads, len, head_dim, capacity| KvStateHeader {
        session: 77,
        len,
        capacity,
        n_layers,
        n_kv_heads,
        head_dim,
        dtype: WireDType::F32,
    };
    // Once: a division by zero (0 heads, 0 layers), a size product that
    // wrapped, and an allocation of 64 GiB that aborted the process.
    for (header, payload) in [
        (h(30, 0, 4, 64, 64), vec![]),
        (h(0, 3, 4, 64, 64), vec![0u8; 64]),
        (h(30, 65536, u32::MAX, 65536, u32::MAX), vec![]),
        (h(u32::MAX, 3, 0, 64, 64), vec![]),
        (h(30, 3, 2, 64, 64), vec![0u8; 17]),
        // Well formed, but not this slice's shape.
        (h(29, 3, 1, 64, 64), vec![0u8; 29 * 2 * 3 * 64 * 4]),
    ] {
        let e = p.import_kv(0, header.clone(), payload).await.expect_err("refused");
        assert!(matches!(code(&e), Some(ErrorCode::Malformed | ErrorCode::Invalid)), "{header:?}: {e}");
    }
    still_serves(&p, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_panics_fails_alone_and_the_node_stays_healthy() {
    let node = NodeProc::spawn(Some(KEY), &["--panic-on-session", "666"]);
    let p = solo(&node).await;
    let t = std::time::Instant::now();
    let e = p.step(666, &PROMPT, Some(64), Some(common::greedy()), false).await.expect_err("the injected panic");
    assert_eq!(code(&e), Some(ErrorCode::Internal), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "the error came at once, not at the step timeout");
    still_serves(&p, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_the_cap_are_refused_until_one_closes() {
    let node = NodeProc::spawn(Some(KEY), &["--max-sessions", "2"]);
    let p = solo(&node).await;
    for s in [10, 11] {
        p.step(s, &PROMPT, Some(64), Some(common::greedy()), false).await.unwrap();
    }
    let e = p.step(12, &PROMPT, Some(64), Some(common::greedy()), false).await.expect_err("a third session");
    assert_eq!(code(&e), Some(ErrorCode::Capacity), "{e}");
    assert!(e.to_string().contains("limit of 2 sessions"), "{e}");
    // The sessions held go on; a closed one makes room.
    p.step(10, &[7042], None, Some(common::greedy()), false).await.unwrap();
    p.close(10).await;
    // The node frees the slot once the close lands, a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match p.step(12, &PROMPT, Some(64), Some(common::greedy()), false).await {
            Ok(_) => break,
            Err(e) => assert!(code(&e) == Some(ErrorCode::Capacity) && std::time::Instant::now() < deadline, "{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_memory_is_held_as_used_and_capped() {
    // SmolLM2: 30 blocks × K and V × 3 heads × 64 × f16 = 23 KiB a position;
    // a session's first chunk of 64 positions holds 1.4 MiB.
    let node = NodeProc::spawn(Some(KEY), &["--kv-memory", "3MiB"]);
    let p = solo(&node).await;
    // A session that may grow to 8,192 positions costs its first chunk only.
    p.step(20, &PROMPT, Some(8192), Some(common::greedy()), false).await.unwrap();
    p.step(21, &PROMPT, Some(8192), Some(common::greedy()), false).await.unwrap();
    let e = p.step(22, &PROMPT, Some(8192), Some(common::greedy()), false).await.expect_err("past the KV memory");
    assert_eq!(code(&e), Some(ErrorCode::Capacity), "{e}");
    assert!(e.to_string().contains("KV memory"), "{e}");
    // Growing past the first chunk needs more: refused as well.
    let long: Vec<u32> = PROMPT.iter().copied().cycle().take(100).collect();
    let e = p.step(21, &long, None, Some(common::greedy()), false).await.expect_err("a second chunk");
    assert_eq!(code(&e), Some(ErrorCode::Capacity), "{e}");
    p.step(20, &[7042], None, Some(common::greedy()), false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_cannot_make_the_node_hold_more_than_a_few_kib() {
    let node = NodeProc::spawn(Some(KEY), &[]);
    let sock = node.addr.parse().unwrap();
    let ep = tls::client_endpoint(sock).unwrap();
    let conn = ep.connect(sock, tls::SERVER_NAME).unwrap().await.unwrap();
    let (mut reader, mut writer) = split(conn.open_bi().await.unwrap());
    // A "Hello" whose header claims 1 MiB: refused from its 10-byte prefix.
    let mut prefix = [0u8; PREFIX_LEN];
    prefix[0] = PROTOCOL_VERSION;
    prefix[2..6].copy_from_slice(&(1u32 << 20).to_le_bytes());
    writer.write_raw(&prefix).await.unwrap();
    match reader.expect().await.unwrap().message {
        Message::Error(e) => {
            assert_eq!(e.code, ErrorCode::Refused);
            assert!(e.message.contains("limit of 4096 bytes"), "{}", e.message);
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_control_frame_is_answered_with_an_error_frame() {
    let node = NodeProc::spawn(Some(KEY), &[]);
    let sock = node.addr.parse().unwrap();
    let ep = tls::client_endpoint(sock).unwrap();
    let conn = ep.connect(sock, tls::SERVER_NAME).unwrap().await.unwrap();
    let (mut reader, mut writer, _) = client_handshake(&conn, &ClusterKey::new(Some(KEY)), PeerRole::Head).await.unwrap();
    writer.write_raw(&[PROTOCOL_VERSION, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff]).await.unwrap();
    match reader.expect().await.unwrap().message {
        Message::Error(e) => {
            assert_eq!(e.code, ErrorCode::Malformed);
            assert!(e.message.contains("malformed header"), "{}", e.message);
        }
        other => panic!("expected an error, got {other:?}"),
    }
    // The node serves others.
    let p = solo(&node).await;
    still_serves(&p, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_refused() {
    let node = NodeProc::spawn(Some(KEY), &["--max-connections", "2"]);
    let key = ClusterKey::new(Some(KEY));
    let a = Pipeline::connect(std::slice::from_ref(&node.addr), &key).await.unwrap();
    let b = Pipeline::connect(std::slice::from_ref(&node.addr), &key).await.unwrap();
    let e = Pipeline::connect(std::slice::from_ref(&node.addr), &key).await.err().expect("a third connection");
    assert!(e.to_string().contains("refused"), "{e}");
    drop(a);
    // The node frees the slot once it sees the close, a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match Pipeline::connect(std::slice::from_ref(&node.addr), &key).await {
            Ok(_) => break,
            Err(e) => assert!(std::time::Instant::now() < deadline, "no room again after a connection closed: {e}"),
        }
    }
    drop(b);
}

#[test]
fn sigterm_stops_a_node_cleanly() {
    let mut node = NodeProc::spawn(Some(KEY), &[]);
    let pid = node.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t = std::time::Instant::now();
    loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the node did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}
