//! InferenceGraphs run by the router filter: KServe's `Sequence`, `Switch`, `Ensemble` and
//! `Splitter` nodes (`serving.kserve.io/v1alpha1`), with the answers combined the way KServe's
//! Go router (`cmd/router`) combines them. Each step is an HTTP call the shell makes through
//! Envoy's hop listener, so a step is routed like a direct call (canary split, transformer,
//! payload logging); the run itself is a pure state machine: [`Run::start`] and
//! [`Run::answer`] return the calls to make next or the graph's answer.
//!
//! ```json
//! {"name": "model-chainer", "namespace": "default", "timeout_ms": 60000,
//!  "nodes": [{"name": "root", "router_type": "Sequence", "steps": [
//!    {"name": "sklearn-iris", "call": {"cluster": "meshserve_hop",
//!     "authority": "sklearn-iris.default", "path": "/v1/models/sklearn-iris:predict"}},
//!    {"node": "other", "data": "request", "dependency": "hard"}]}, ...]}
//! ```

use serde::Deserialize;
use serde_json::{Map, Value};

/// The most nodes a graph may have (nesting depth is bounded by it: cycles are refused).
pub const MAX_NODES: usize = 64;
/// The most steps one node may have.
pub const MAX_STEPS: usize = 64;
/// How long a graph may run when its `timeout` says nothing (KServe's route timeout).
pub const DEFAULT_TIMEOUT_MS: u64 = 60_000;
/// The longest a graph or a step may be given: an hour (Envoy takes a call's timeout in
/// 32-bit milliseconds, and a request held longer is a mistake).
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// The name of the hop listener, of its filter chain and of the cluster that reaches it (an
/// Envoy internal listener running the same filters): a step that names an InferenceService
/// is called there, and is routed like a direct call.
pub const HOP: &str = "meshserve_hop";

/// The request header naming the graph a hop request belongs to (set by the router on the
/// calls it makes, trusted only on the hop listener).
pub const GRAPH_HEADER: &str = "x-meshserve-graph";
/// The request header naming the node and step of a hop request (`<node>/<step>`).
pub const STEP_HEADER: &str = "x-meshserve-graph-step";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RouterType {
    Sequence,
    Switch,
    Ensemble,
    Splitter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Data {
    /// The graph's input (a Sequence's first step always gets it).
    #[default]
    Request,
    /// The previous step's answer (Sequence only).
    Response,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dependency {
    /// A failed step does not stop the node.
    #[default]
    Soft,
    /// A failed step ends the node with its answer.
    Hard,
}

/// An HTTP call a step makes: Envoy's cluster, the `:authority` and the `:path`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub cluster: String,
    pub authority: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The step's name (`name` in KServe); empty: its index.
    #[serde(default)]
    pub name: String,
    /// A call to an InferenceService or a URL ...
    pub call: Option<Target>,
    /// ... or another node of the graph, by name.
    pub node: Option<String>,
    #[serde(default)]
    pub data: Data,
    /// GJSON: a Switch step is taken when it matches the input; a Sequence step runs only
    /// when it matches the previous answer.
    #[serde(default)]
    pub condition: String,
    #[serde(default)]
    pub dependency: Dependency,
    /// A Splitter's share, in percent.
    pub weight: Option<u32>,
    /// A Sequence step's input gets the previous `predictions` as `instances`.
    #[serde(default)]
    pub map_predictions_to_instances: bool,
    /// The index of `node` once validated.
    #[serde(skip)]
    node_index: usize,
}

impl Step {
    /// The step's label in errors, events and stats: its name, else its index.
    pub fn label(&self, index: usize) -> String {
        if self.name.is_empty() {
            index.to_string()
        } else {
            self.name.clone()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub router_type: RouterType,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Graph {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// `root` first.
    pub nodes: Vec<Node>,
    /// The whole graph's time limit (KServe's `spec.timeout`).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// One step's time limit (KServe's `routerTimeouts.serviceClient`); the graph's by default.
    pub step_timeout_ms: Option<u64>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_MS
}

impl Graph {
    /// Checks the graph and resolves node names; the message names the field under `at`.
    pub fn validate(&mut self, at: &str) -> Result<(), String> {
        if self.name.is_empty() || self.namespace.is_empty() {
            return Err(format!("{at}: name and namespace must not be empty"));
        }
        if self.timeout_ms == 0 || self.step_timeout_ms == Some(0) {
            return Err(format!("{at}: timeouts must be above zero"));
        }
        if self.timeout_ms > MAX_TIMEOUT_MS || self.step_timeout_ms > Some(MAX_TIMEOUT_MS) {
            return Err(format!(
                "{at}: timeouts must be at most {} s",
                MAX_TIMEOUT_MS / 1000
            ));
        }
        if self.nodes.first().is_none_or(|n| n.name != "root") {
            return Err(format!(
                "{at}.nodes: the first node must be 'root' (the graph starts there)"
            ));
        }
        if self.nodes.len() > MAX_NODES {
            return Err(format!("{at}.nodes: more than {MAX_NODES} nodes"));
        }
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for (n, node) in self.nodes.iter_mut().enumerate() {
            let at = format!("{at}.nodes.{}", node.name);
            if names.iter().take(n).any(|name| *name == node.name) {
                return Err(format!("{at}: node '{}' is defined twice", node.name));
            }
            if node.steps.is_empty() || node.steps.len() > MAX_STEPS {
                return Err(format!("{at}.steps: 1 to {MAX_STEPS} steps are needed"));
            }
            let mut weights = 0u32;
            for (s, step) in node.steps.iter_mut().enumerate() {
                let at = format!("{at}.steps[{s}]");
                match (&step.call, &step.node) {
                    (Some(call), None) => {
                        if call.cluster.is_empty()
                            || call.authority.is_empty()
                            || !call.path.starts_with('/')
                        {
                            return Err(format!(
                                "{at}.call: cluster, authority and an absolute path are needed"
                            ));
                        }
                    }
                    (None, Some(target)) => {
                        step.node_index = names
                            .iter()
                            .position(|n| n == target)
                            .ok_or_else(|| format!("{at}.node: no node named '{target}'"))?;
                    }
                    _ => return Err(format!("{at}: give exactly one of call and node")),
                }
                match node.router_type {
                    RouterType::Splitter => match step.weight {
                        Some(w) if w <= 100 => weights += w,
                        _ => {
                            return Err(format!(
                                "{at}.weight: a Splitter step needs a weight from 0 to 100"
                            ));
                        }
                    },
                    _ if step.weight.is_some() => {
                        return Err(format!("{at}.weight: only a Splitter's steps have weights"));
                    }
                    _ => {}
                }
                if node.router_type == RouterType::Sequence && s == 0 && !step.condition.is_empty()
                {
                    return Err(format!(
                        "{at}.condition: a Sequence's first step has no previous answer to test"
                    ));
                }
                if node.router_type == RouterType::Switch && step.condition.is_empty() {
                    return Err(format!("{at}.condition: a Switch step needs a condition"));
                }
            }
            if node.router_type == RouterType::Splitter && weights != 100 {
                return Err(format!(
                    "{at}.steps: a Splitter's weights add up to {weights}, not 100"
                ));
            }
            let mut seen: Vec<&str> = Vec::new();
            for step in &node.steps {
                if !step.name.is_empty() {
                    if seen.contains(&step.name.as_str()) {
                        return Err(format!("{at}: step name '{}' is used twice", step.name));
                    }
                    seen.push(&step.name);
                }
            }
        }
        if let Some(cycle) = self.cycle() {
            return Err(format!("{at}.nodes: the nodes form a cycle ({cycle})"));
        }
        Ok(())
    }

    /// A cycle through `nodeName` steps, as `a -> b -> a`.
    fn cycle(&self) -> Option<String> {
        // 0: not seen, 1: on the current path, 2: done.
        let mut state = vec![0u8; self.nodes.len()];
        let mut path = Vec::new();
        fn visit(g: &Graph, n: usize, state: &mut [u8], path: &mut Vec<usize>) -> Option<String> {
            match state.get(n).copied() {
                Some(1) => {
                    let from = path.iter().position(|&p| p == n).unwrap_or_default();
                    let mut names: Vec<&str> = path
                        .get(from..)
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|&p| g.nodes.get(p).map(|x| x.name.as_str()))
                        .collect();
                    names.extend(g.nodes.get(n).map(|x| x.name.as_str()));
                    return Some(names.join(" -> "));
                }
                Some(0) => {}
                _ => return None,
            }
            if let Some(s) = state.get_mut(n) {
                *s = 1;
            }
            path.push(n);
            let steps = g
                .nodes
                .get(n)
                .map(|x| x.steps.as_slice())
                .unwrap_or_default();
            for step in steps.iter().filter(|s| s.node.is_some()) {
                if let Some(cycle) = visit(g, step.node_index, state, path) {
                    return Some(cycle);
                }
            }
            path.pop();
            if let Some(s) = state.get_mut(n) {
                *s = 2;
            }
            None
        }
        (0..self.nodes.len()).find_map(|n| visit(self, n, &mut state, &mut path))
    }
}

/// An answer: a step's or the graph's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    /// An answer in the REST error shape.
    pub fn error(status: u16, message: String) -> Answer {
        Answer {
            status,
            body: serde_json::json!({ "error": message })
                .to_string()
                .into_bytes(),
        }
    }

    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Whether the body is JSON (the reply's content type says so, as KServe's router does).
    pub fn is_json(&self) -> bool {
        serde_json::from_slice::<serde::de::IgnoredAny>(&self.body).is_ok()
    }
}

/// A call the shell makes for a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub id: u64,
    pub target: Target,
    pub body: Vec<u8>,
    /// `<node>/<step>`, for the hop's headers and for errors.
    pub step: String,
}

/// What a run needs next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Make these calls (possibly none: answers are still out) and report each answer.
    Calls(Vec<Call>),
    /// The graph's answer.
    Done(Answer),
}

#[derive(Debug)]
enum Frame {
    /// Waiting for the call with this id.
    Waiting(u64),
    Done(Answer),
    Sequence {
        node: usize,
        /// The step running now.
        index: usize,
        current: Box<Frame>,
    },
    Ensemble {
        node: usize,
        parts: Vec<Frame>,
    },
}

/// One graph request in flight.
#[derive(Debug)]
pub struct Run {
    input: Vec<u8>,
    root: Frame,
    next_id: u64,
}

/// What starting frames needs: the graph, the graph's input, the calls made so far.
struct Ctx<'a> {
    graph: &'a Graph,
    input: &'a [u8],
    calls: Vec<Call>,
    next_id: &'a mut u64,
    draw: &'a mut dyn FnMut() -> u64,
}

impl Run {
    /// Starts `graph` on `input`; `draw` gives uniformly random numbers (the Splitter's).
    pub fn start(graph: &Graph, input: Vec<u8>, draw: &mut dyn FnMut() -> u64) -> (Run, Progress) {
        let mut next_id = 0;
        let mut ctx = Ctx {
            graph,
            input: &input,
            calls: Vec::new(),
            next_id: &mut next_id,
            draw,
        };
        let root = start_node(&mut ctx, 0, &input);
        let calls = ctx.calls;
        let run = Run {
            input,
            root,
            next_id,
        };
        let progress = run.progress(calls);
        (run, progress)
    }

    /// Hands the answer to call `id` in; `draw` as for [`Run::start`].
    pub fn answer(
        &mut self,
        graph: &Graph,
        id: u64,
        answer: Answer,
        draw: &mut dyn FnMut() -> u64,
    ) -> Progress {
        let mut root = std::mem::replace(&mut self.root, Frame::Waiting(u64::MAX));
        let mut ctx = Ctx {
            graph,
            input: &self.input,
            calls: Vec::new(),
            next_id: &mut self.next_id,
            draw,
        };
        let mut answer = Some(answer);
        deliver(&mut root, id, &mut answer);
        let root = settle(&mut ctx, root);
        let calls = ctx.calls;
        self.root = root;
        self.progress(calls)
    }

    fn progress(&self, calls: Vec<Call>) -> Progress {
        match &self.root {
            Frame::Done(answer) => Progress::Done(answer.clone()),
            _ => Progress::Calls(calls),
        }
    }
}

fn node_of(graph: &Graph, node: usize) -> Option<&Node> {
    graph.nodes.get(node)
}

/// `node`'s name and `step`'s label, for errors.
fn where_(graph: &Graph, node: usize, step: Option<usize>) -> String {
    let name = node_of(graph, node).map_or("?", |n| n.name.as_str());
    match step.and_then(|s| Some((s, node_of(graph, node)?.steps.get(s)?))) {
        Some((s, st)) => format!(
            "graph '{}' node '{name}' step '{}'",
            graph.name,
            st.label(s)
        ),
        None => format!("graph '{}' node '{name}'", graph.name),
    }
}

fn start_node(ctx: &mut Ctx<'_>, node: usize, input: &[u8]) -> Frame {
    let Some(spec) = node_of(ctx.graph, node) else {
        return Frame::Done(Answer::error(500, where_(ctx.graph, node, None)));
    };
    match spec.router_type {
        RouterType::Sequence => {
            let first = start_step(ctx, node, 0, input.to_vec());
            settle(
                ctx,
                Frame::Sequence {
                    node,
                    index: 0,
                    current: Box::new(first),
                },
            )
        }
        RouterType::Ensemble => {
            let parts = (0..spec.steps.len())
                .map(|s| start_step(ctx, node, s, input.to_vec()))
                .collect();
            settle(ctx, Frame::Ensemble { node, parts })
        }
        RouterType::Switch => {
            let chosen = std::str::from_utf8(input)
                .ok()
                .filter(|text| gjson::valid(text))
                .and_then(|text| {
                    spec.steps
                        .iter()
                        .position(|s| gjson::get(text, &s.condition).exists())
                });
            match chosen {
                Some(s) => start_step(ctx, node, s, input.to_vec()),
                None => Frame::Done(Answer::error(
                    404,
                    format!(
                        "{}: the request matches none of the Switch's conditions",
                        where_(ctx.graph, node, None)
                    ),
                )),
            }
        }
        RouterType::Splitter => {
            let point = (ctx.draw)() % 100;
            let mut upper = 0u64;
            let chosen = spec.steps.iter().position(|s| {
                upper += u64::from(s.weight.unwrap_or_default());
                point < upper
            });
            match chosen {
                Some(s) => start_step(ctx, node, s, input.to_vec()),
                None => Frame::Done(Answer::error(
                    500,
                    format!("{}: no step was chosen", where_(ctx.graph, node, None)),
                )),
            }
        }
    }
}

fn start_step(ctx: &mut Ctx<'_>, node: usize, step: usize, body: Vec<u8>) -> Frame {
    let Some(spec) = node_of(ctx.graph, node).and_then(|n| n.steps.get(step)) else {
        return Frame::Done(Answer::error(500, where_(ctx.graph, node, Some(step))));
    };
    if let Some(target) = &spec.call {
        let id = *ctx.next_id;
        *ctx.next_id += 1;
        let node_name = node_of(ctx.graph, node).map_or("", |n| n.name.as_str());
        ctx.calls.push(Call {
            id,
            target: target.clone(),
            body,
            step: format!("{node_name}/{}", spec.label(step)),
        });
        return Frame::Waiting(id);
    }
    start_node(ctx, spec.node_index, &body)
}

/// Puts `answer` where call `id` waits; true if it was found.
fn deliver(frame: &mut Frame, id: u64, answer: &mut Option<Answer>) -> bool {
    match frame {
        Frame::Waiting(waiting) if *waiting == id => {
            if let Some(answer) = answer.take() {
                *frame = Frame::Done(answer);
            }
            true
        }
        Frame::Waiting(_) | Frame::Done(_) => false,
        Frame::Sequence { current, .. } => deliver(current, id, answer),
        Frame::Ensemble { parts, .. } => parts.iter_mut().any(|p| deliver(p, id, answer)),
    }
}

/// Moves `frame` on as far as the answers in it allow.
fn settle(ctx: &mut Ctx<'_>, frame: Frame) -> Frame {
    match frame {
        Frame::Waiting(_) | Frame::Done(_) => frame,
        Frame::Sequence {
            node,
            index,
            current,
        } => {
            let current = settle(ctx, *current);
            settle_sequence(ctx, node, index, current)
        }
        Frame::Ensemble { node, parts } => {
            let parts: Vec<Frame> = parts.into_iter().map(|p| settle(ctx, p)).collect();
            if parts.iter().all(|p| matches!(p, Frame::Done(_))) {
                Frame::Done(merge(ctx.graph, node, parts))
            } else {
                Frame::Ensemble { node, parts }
            }
        }
    }
}

fn settle_sequence(ctx: &mut Ctx<'_>, node: usize, mut index: usize, mut current: Frame) -> Frame {
    let Some(spec) = node_of(ctx.graph, node) else {
        return Frame::Done(Answer::error(500, where_(ctx.graph, node, None)));
    };
    loop {
        let Frame::Done(answer) = current else {
            return Frame::Sequence {
                node,
                index,
                current: Box::new(current),
            };
        };
        let hard = spec
            .steps
            .get(index)
            .is_some_and(|s| s.dependency == Dependency::Hard);
        if hard && !answer.ok() {
            return Frame::Done(failed(ctx.graph, node, index, answer));
        }
        index += 1;
        let Some(step) = spec.steps.get(index) else {
            return Frame::Done(answer);
        };
        if !step.condition.is_empty() {
            let text = std::str::from_utf8(&answer.body)
                .ok()
                .filter(|t| gjson::valid(t));
            match text {
                None => {
                    return Frame::Done(Answer::error(
                        500,
                        format!(
                            "{}: the previous answer is not JSON, so the condition cannot be tested",
                            where_(ctx.graph, node, Some(index))
                        ),
                    ));
                }
                // KServe: a condition that does not match ends the Sequence with the
                // previous answer, as a success.
                Some(text) if !gjson::get(text, &step.condition).exists() => {
                    return Frame::Done(Answer {
                        status: 200,
                        body: answer.body,
                    });
                }
                Some(_) => {}
            }
        }
        let mut body = match step.data {
            Data::Request => ctx.input.to_vec(),
            Data::Response => answer.body,
        };
        if step.map_predictions_to_instances {
            body = predictions_to_instances(body);
        }
        current = start_step(ctx, node, index, body);
    }
}

/// KServe's `mapPredictionsToInstances`: `{"predictions": [...]}` becomes
/// `{"instances": [...]}` (other fields dropped, as its router does); anything else is left.
fn predictions_to_instances(body: Vec<u8>) -> Vec<u8> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&body) else {
        return body;
    };
    match map.get("predictions") {
        Some(Value::Array(list)) if !list.is_empty() => serde_json::json!({ "instances": list })
            .to_string()
            .into_bytes(),
        _ => body,
    }
}

/// A failed Hard step's answer, its error message prefixed with where it failed.
fn failed(graph: &Graph, node: usize, step: usize, answer: Answer) -> Answer {
    let at = where_(graph, node, Some(step));
    match serde_json::from_slice::<Value>(&answer.body) {
        Ok(Value::Object(mut map)) => {
            let message = match map.get("error") {
                Some(Value::String(m)) => format!("{at}: {m}"),
                _ => format!("{at} failed with status {}", answer.status),
            };
            map.insert("error".into(), Value::String(message));
            Answer {
                status: answer.status,
                body: Value::Object(map).to_string().into_bytes(),
            }
        }
        _ => Answer::error(
            answer.status,
            format!("{at} failed with status {}", answer.status),
        ),
    }
}

/// KServe's Ensemble answer: `{"<step name or index>": <step's answer>, ...}`, keys sorted
/// (as Go writes a map); the first failed Hard step, in step order, answers instead.
fn merge(graph: &Graph, node: usize, parts: Vec<Frame>) -> Answer {
    let Some(spec) = node_of(graph, node) else {
        return Answer::error(500, where_(graph, node, None));
    };
    let mut merged = Map::new();
    for (s, (part, step)) in parts.into_iter().zip(&spec.steps).enumerate() {
        let Frame::Done(answer) = part else {
            return Answer::error(500, where_(graph, node, Some(s)));
        };
        if step.dependency == Dependency::Hard && !answer.ok() {
            return failed(graph, node, s, answer);
        }
        match serde_json::from_slice::<Value>(&answer.body) {
            Ok(value @ Value::Object(_)) => {
                merged.insert(step.label(s), value);
            }
            _ => {
                return Answer::error(
                    502,
                    format!(
                        "{}: the answer is not a JSON object, so it cannot join the Ensemble's",
                        where_(graph, node, Some(s))
                    ),
                );
            }
        }
    }
    Answer {
        status: 200,
        body: Value::Object(merged).to_string().into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn graph(nodes: Value) -> Result<Graph, String> {
        let mut g: Graph = serde_json::from_value(json!({"name": "g", "nodes": nodes}))
            .map_err(|e| e.to_string())?;
        g.validate("graphs[0]")?;
        Ok(g)
    }

    fn call(name: &str) -> Value {
        json!({"cluster": "hop", "authority": format!("{name}.default"), "path": format!("/v1/models/{name}:predict")})
    }

    /// Runs `g` on `input`, answering each call with `answer(authority, body)`.
    fn run(
        g: &Graph,
        input: &str,
        answer: &dyn Fn(&str, &[u8]) -> Answer,
        draw: u64,
    ) -> (Answer, Vec<String>) {
        let mut draw = move || draw;
        let (mut run, mut progress) = Run::start(g, input.as_bytes().to_vec(), &mut draw);
        let mut seen = Vec::new();
        let mut queue = std::collections::VecDeque::new();
        loop {
            match progress {
                Progress::Done(a) => return (a, seen),
                Progress::Calls(calls) => queue.extend(calls),
            }
            let Some(c) = queue.pop_front() else {
                panic!("the run waits for nothing")
            };
            seen.push(c.step.clone());
            let a = answer(&c.target.authority, &c.body);
            progress = run.answer(g, c.id, a, &mut draw);
        }
    }

    fn ok(body: Value) -> Answer {
        Answer {
            status: 200,
            body: body.to_string().into_bytes(),
        }
    }

    fn body(a: &Answer) -> Value {
        serde_json::from_slice(&a.body).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A model per authority: `a` answers `{"predictions": [1]}`, `b` echoes its input under
    /// `seen`, `bad` fails with 400.
    fn models(authority: &str, input: &[u8]) -> Answer {
        match authority {
            "a.default" => ok(json!({"predictions": [1, 1]})),
            "b.default" => {
                ok(json!({"seen": serde_json::from_slice::<Value>(input).unwrap_or(Value::Null)}))
            }
            _ => Answer::error(400, "bad input".into()),
        }
    }

    #[test]
    fn a_sequence_feeds_the_request_or_the_previous_answer() {
        let g = graph(json!([{"name": "root", "router_type": "Sequence", "steps": [
            {"call": call("a")}, {"call": call("b"), "data": "response"}, {"call": call("b"), "data": "request"}]}])).unwrap();
        let (a, seen) = run(&g, r#"{"instances": [[1]]}"#, &models, 0);
        assert_eq!(seen, ["root/0", "root/1", "root/2"]);
        assert_eq!(body(&a), json!({"seen": {"instances": [[1]]}}));
        let g = graph(json!([{"name": "root", "router_type": "Sequence", "steps": [
            {"call": call("a")}, {"call": call("b"), "data": "response", "map_predictions_to_instances": true}]}])).unwrap();
        let (a, _) = run(&g, "{}", &models, 0);
        assert_eq!(body(&a), json!({"seen": {"instances": [1, 1]}}));
    }

    #[test]
    fn soft_failures_go_on_and_hard_ones_stop_naming_the_step() {
        let steps = |dependency: &str| {
            json!([{"name": "root", "router_type": "Sequence", "steps": [
            {"name": "first", "call": call("bad"), "dependency": dependency}, {"call": call("a")}]}])
        };
        let (a, seen) = run(&graph(steps("soft")).unwrap(), "{}", &models, 0);
        assert_eq!((a.status, seen.len()), (200, 2));
        let (a, seen) = run(&graph(steps("hard")).unwrap(), "{}", &models, 0);
        assert_eq!((a.status, seen.len()), (400, 1));
        assert_eq!(
            body(&a)["error"],
            "graph 'g' node 'root' step 'first': bad input"
        );
    }

    #[test]
    fn a_sequence_condition_that_fails_ends_with_the_previous_answer() {
        let g = graph(
            json!([{"name": "root", "router_type": "Sequence", "steps": [
            {"call": call("a")}, {"call": call("b"), "condition": "nothing"}]}]),
        )
        .unwrap();
        let (a, seen) = run(&g, "{}", &models, 0);
        assert_eq!(
            (a.status, seen.len(), body(&a)),
            (200, 1, json!({"predictions": [1, 1]}))
        );
        let g = graph(json!([{"name": "root", "router_type": "Sequence", "steps": [
            {"call": call("a")}, {"call": call("b"), "condition": "predictions.#(==1)", "data": "response"}]}])).unwrap();
        assert_eq!(run(&g, "{}", &models, 0).1.len(), 2);
    }

    #[test]
    fn an_ensemble_merges_by_step_name_and_a_hard_failure_answers() {
        let g = graph(json!([{"name": "root", "router_type": "Ensemble", "steps": [
            {"name": "zeta", "call": call("a")}, {"call": call("b")}, {"name": "soft", "call": call("bad")}]}])).unwrap();
        let (a, seen) = run(&g, r#"{"x": 1}"#, &models, 0);
        assert_eq!(seen.len(), 3);
        assert_eq!(a.status, 200);
        assert_eq!(
            String::from_utf8_lossy(&a.body),
            r#"{"1":{"seen":{"x":1}},"soft":{"error":"bad input"},"zeta":{"predictions":[1,1]}}"#
        );
        let g = graph(
            json!([{"name": "root", "router_type": "Ensemble", "steps": [
            {"call": call("a")}, {"call": call("bad"), "dependency": "hard"}]}]),
        )
        .unwrap();
        assert_eq!(run(&g, "{}", &models, 0).0.status, 400);
    }

    #[test]
    fn a_switch_takes_the_first_match_as_kserve_samples_do() {
        let g = graph(json!([{"name": "root", "router_type": "Switch", "steps": [
            {"call": call("a"), "condition": "[@this].#(source==client)"},
            {"call": call("b"), "condition": "instances.#(intval>10)"},
            {"call": call("bad"), "condition": "instances.#(strval%*red-server*)"}]}]))
        .unwrap();
        let input = r#"{"source":"client1","instances":[{"name":"blue","intval":0,"strval":"kserve"},{"name":"green","intval":1,"strval":"1red-server1"}]}"#;
        let (_, seen) = run(&g, input, &models, 0);
        assert_eq!(seen, ["root/2"]);
        let (_, seen) = run(&g, r#"{"source":"client"}"#, &models, 0);
        assert_eq!(seen, ["root/0"]);
        let (a, seen) = run(&g, r#"{"source":"nobody"}"#, &models, 0);
        assert_eq!((a.status, seen.len()), (404, 0));
        assert!(body(&a)["error"].as_str().unwrap().contains("node 'root'"));
        assert_eq!(run(&g, "not json", &models, 0).0.status, 404);
    }

    #[test]
    fn a_splitter_follows_its_weights_and_nodes_nest() {
        let g = graph(json!([
            {"name": "root", "router_type": "Splitter", "steps": [
                {"call": call("a"), "weight": 20}, {"node": "inner", "weight": 80}]},
            {"name": "inner", "router_type": "Ensemble", "steps": [{"call": call("a")}, {"call": call("b")}]}])).unwrap();
        assert_eq!(run(&g, "{}", &models, 19).1, ["root/0"]);
        assert_eq!(run(&g, "{}", &models, 20).1, ["inner/0", "inner/1"]);
        assert_eq!(run(&g, "{}", &models, 199).1, ["inner/0", "inner/1"]);
    }

    #[test]
    fn bad_graphs_name_the_field() {
        let cases = [
            (
                json!([{"name": "other", "router_type": "Sequence", "steps": [{"call": call("a")}]}]),
                "must be 'root'",
            ),
            (
                json!([{"name": "root", "router_type": "Sequence", "steps": [{"node": "root"}]}]),
                "cycle (root -> root)",
            ),
            (
                json!([{"name": "root", "router_type": "Sequence", "steps": [{"node": "x"}]},
                    {"name": "x", "router_type": "Sequence", "steps": [{"node": "root"}]}]),
                "cycle (root -> x -> root)",
            ),
            (
                json!([{"name": "root", "router_type": "Sequence", "steps": [{"node": "nope"}]}]),
                "nodes.root.steps[0].node: no node named 'nope'",
            ),
            (
                json!([{"name": "root", "router_type": "Splitter", "steps": [{"call": call("a"), "weight": 30}]}]),
                "add up to 30",
            ),
            (
                json!([{"name": "root", "router_type": "Splitter", "steps": [{"call": call("a")}]}]),
                "needs a weight",
            ),
            (
                json!([{"name": "root", "router_type": "Switch", "steps": [{"call": call("a")}]}]),
                "needs a condition",
            ),
            (
                json!([{"name": "root", "router_type": "Sequence", "steps": [{"call": call("a"), "condition": "x"}]}]),
                "first step",
            ),
            (
                json!([{"name": "root", "router_type": "Sequence", "steps": [{"call": call("a"), "node": "root"}]}]),
                "exactly one",
            ),
            (
                json!([{"name": "root", "router_type": "Ensemble", "steps": [{"name": "s", "call": call("a")}, {"name": "s", "call": call("b")}]}]),
                "'s' is used twice",
            ),
            (
                json!([{"name": "root", "router_type": "Ensemble", "steps": []}]),
                "1 to 64 steps",
            ),
        ];
        for (nodes, needle) in cases {
            match graph(nodes) {
                Err(e) => assert!(e.contains(needle), "wanted {needle:?} in {e}"),
                Ok(_) => panic!("accepted a graph that should fail with {needle:?}"),
            }
        }
        let nodes =
            json!([{"name": "root", "router_type": "Sequence", "steps": [{"call": call("a")}]}]);
        for (field, ms) in [
            ("timeout_ms", MAX_TIMEOUT_MS + 1),
            ("step_timeout_ms", u64::MAX),
            ("timeout_ms", 0),
        ] {
            let mut g: Graph =
                serde_json::from_value(json!({"name": "g", "nodes": nodes, field: ms})).unwrap();
            let e = g.validate("graphs[0]").unwrap_err();
            assert!(e.contains("timeouts must be"), "{e}");
        }
    }
}
