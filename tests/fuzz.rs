//! CI's share of the fuzz harness (`examples/fuzz.rs`): every target, a
//! bounded number of inputs from a fixed seed, no panic and no allocation
//! past the bound. `cargo run --release --example fuzz -- --iterations
//! 1000000` runs the full million per target.

#[path = "../examples/fuzz.rs"]
#[allow(dead_code)]
mod harness;

fn check(target: &'static str, iterations: u64) {
    let o = harness::run(target, iterations, 0x5011_0111);
    eprintln!("{o:?}");
    assert_eq!(o.panics, 0, "{target}: {o:?}");
    assert!(o.largest_allocation <= harness::ALLOCATION_BOUND, "{target}: {o:?}");
    assert!(o.accepted > 0, "{target}: no input got through the decoders, so they were barely exercised: {o:?}");
    assert!(o.accepted < o.inputs, "{target}: nothing was refused, so the mutations did not bite: {o:?}");
}

#[test]
fn frames() {
    check("frame", 100_000);
}

#[test]
fn kv_payloads() {
    check("kv", 50_000);
}

#[test]
fn tensor_payloads() {
    check("tensor", 100_000);
}

#[test]
fn gguf_headers() {
    check("gguf", 3_000);
}

#[test]
fn http_bodies() {
    check("http", 100_000);
}

#[test]
fn json_schemas_compiled_for_structured_outputs() {
    check("schema", 300);
}
