//! An InferenceGraph run on a client's request and on the steps' answers, both fuzzed: the
//! request, each step's status and body, and one condition (GJSON, tidwall's Rust port) are
//! split from the input. The graph nests every router type: a Sequence whose second step has
//! the fuzzed condition and maps predictions to instances, a Switch with KServe's sample
//! conditions and the fuzzed one, an Ensemble with a Hard step, a Splitter. Answers are fed in
//! the order the calls come (or the reverse, by the input's first byte) until the run is done.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshserve_filter_core::graph::{Answer, Graph, Progress, Run};
use serde_json::json;

fn call(name: &str) -> serde_json::Value {
    json!({"cluster": "meshserve_hop", "authority": format!("{name}.default"), "path": format!("/v1/models/{name}:predict")})
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0xff);
    let flags = parts.next().and_then(|p| p.first().copied()).unwrap_or(0);
    let input = parts.next().unwrap_or_default().to_vec();
    let condition = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let answers: Vec<&[u8]> = parts.collect();
    let nodes = json!([
        {"name": "root", "router_type": "Sequence", "steps": [
            {"name": "first", "call": call("a")},
            {"call": call("b"), "data": "response", "condition": condition, "map_predictions_to_instances": true},
            {"node": "pick", "data": "request"},
            {"node": "all", "data": "response", "dependency": "hard"},
        ]},
        {"name": "pick", "router_type": "Switch", "steps": [
            {"call": call("c"), "condition": "[@this].#(source==client)"},
            {"call": call("d"), "condition": "instances.#(intval>10)"},
            {"node": "split", "condition": "instances.#(strval%*red-server*)"},
            {"call": call("e"), "condition": condition},
        ]},
        {"name": "all", "router_type": "Ensemble", "steps": [
            {"name": "x", "call": call("x")},
            {"name": "y", "call": call("y"), "dependency": "hard"},
            {"node": "split"},
        ]},
        {"name": "split", "router_type": "Splitter", "steps": [
            {"call": call("s1"), "weight": 30},
            {"call": call("s2"), "weight": 70},
        ]},
    ]);
    let Ok(mut graph) = serde_json::from_value::<Graph>(json!({"name": "g", "nodes": nodes})) else {
        return;
    };
    if graph.validate("graph").is_err() {
        return;
    }
    let mut seed = u64::from(flags);
    let mut draw = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        seed >> 33
    };
    let (mut run, mut progress) = Run::start(&graph, input, &mut draw);
    let mut pending = Vec::new();
    let mut next = 0;
    // Every call gets one answer; the graph is bounded, so this ends.
    for _ in 0..64 {
        match progress {
            Progress::Done(answer) => {
                assert!(answer.status >= 100, "{answer:?}");
                return;
            }
            Progress::Calls(calls) => pending.extend(calls.into_iter().map(|c| c.id)),
        }
        let Some(id) = (if flags & 1 == 0 { pending.pop() } else if pending.is_empty() { None } else { Some(pending.remove(0)) }) else {
            panic!("a run waits with no call out");
        };
        let raw = answers.get(next % answers.len().max(1)).copied().unwrap_or(b"\xc8{}");
        next += 1;
        let (status, body) = match raw.split_first() {
            Some((s, body)) => (u16::from(*s) + 100, body.to_vec()),
            None => (200, Vec::new()),
        };
        progress = run.answer(&graph, id, Answer { status, body }, &mut draw);
    }
    panic!("the run did not end after 64 answers");
});
