//! How requests reach a model's sessions. With dynamic batching ([`Batcher`]): a bounded
//! queue and one thread per session instance; each thread takes the oldest request and every
//! queued request that fits beside it (same shapes past the first dimension, rows within
//! `max_batch_size`), waiting up to the queue delay for more unless a preferred size is
//! reached; it runs the batch, splits the outputs by rows, and answers each request on its
//! own channel. The request's tracing span follows into the batch's span. Without batching
//! ([`Pool`]): a request runs on a free session, on its own task when nobody waits, else
//! queued for the instance threads.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshserve_proto::{InputTensor, OutputTensor, Parameters, TensorData};
use ort::session::{Session, SessionInputValue};
use tokio::sync::oneshot;

use crate::error::{PredictorError, Result};
use crate::metrics::ModelMetrics;
use crate::tensors::{from_ort, to_ort};

/// How requests are grouped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Most rows in one batch.
    pub(crate) max_batch: usize,
    pub(crate) delay: Duration,
    pub(crate) preferred: Vec<usize>,
    /// Most requests waiting; 0: no limit here.
    pub(crate) max_queue: usize,
}

/// One queued request: validated inputs in the model's order, and where to answer.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) inputs: Vec<InputTensor>,
    /// Rows along the first dimension (1 for a model that is not batched).
    pub(crate) rows: usize,
    /// The outputs to return, in order.
    pub(crate) outputs: Vec<String>,
    pub(crate) span: tracing::Span,
}

#[derive(Debug)]
struct Queued {
    id: u64,
    job: Job,
    enqueued: Instant,
    /// Open while the request waits; closed when a batch takes it.
    waiting: tracing::Span,
    reply: oneshot::Sender<Result<Vec<OutputTensor>>>,
}

impl Queued {
    /// Whether two requests can share a batch: same shapes past the first dimension.
    fn fits_with(&self, other: &Queued) -> bool {
        self.job
            .inputs
            .iter()
            .zip(&other.job.inputs)
            .all(|(a, b)| a.shape.get(1..) == b.shape.get(1..))
    }
}

#[derive(Debug, Default)]
struct Queue {
    waiting: VecDeque<Queued>,
    next_id: u64,
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    model: String,
    policy: Policy,
    queue: Mutex<Queue>,
    wake: Condvar,
    metrics: ModelMetrics,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A ticket for a submitted request: its id (to cancel) and the answer's channel.
#[derive(Debug)]
pub(crate) struct Ticket {
    pub(crate) id: u64,
    pub(crate) answer: oneshot::Receiver<Result<Vec<OutputTensor>>>,
}

/// The queue and instance threads of one model version. Dropping it stops the threads once
/// they finish what they run.
#[derive(Debug)]
pub(crate) struct Batcher {
    shared: Arc<Shared>,
}

impl Batcher {
    pub(crate) fn start(
        model: &str,
        sessions: Vec<Session>,
        policy: Policy,
        metrics: ModelMetrics,
    ) -> Result<Batcher> {
        let shared = Arc::new(Shared {
            model: model.to_owned(),
            policy,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            metrics,
        });
        for (i, session) in sessions.into_iter().enumerate() {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("ms-{model}-{i}"))
                .spawn(move || run_instance(&shared, session))
                .map_err(|e| {
                    PredictorError::load(model, format!("cannot start an instance thread: {e}"))
                })?;
        }
        Ok(Batcher { shared })
    }

    /// Queues a request, or refuses it at once when the queue is full.
    pub(crate) fn submit(&self, job: Job) -> Result<Ticket> {
        let (reply, answer) = oneshot::channel();
        let waiting = queue_span(&job.span);
        let mut queue = self.shared.lock();
        let max = self.shared.policy.max_queue;
        if max > 0 && queue.waiting.len() >= max {
            return Err(PredictorError::Overloaded(format!(
                "model '{}' has {max} requests queued (max_queue_size); retry later",
                self.shared.model
            )));
        }
        let id = queue.next_id;
        queue.next_id += 1;
        queue.waiting.push_back(Queued {
            id,
            job,
            enqueued: Instant::now(),
            waiting,
            reply,
        });
        self.shared.metrics.pending.set(queue.waiting.len() as i64);
        drop(queue);
        self.shared.wake.notify_one();
        Ok(Ticket { id, answer })
    }

    /// Takes a request out of the queue if it is still waiting (its caller gave up).
    pub(crate) fn cancel(&self, id: u64) {
        let mut queue = self.shared.lock();
        queue.waiting.retain(|q| q.id != id);
        self.shared.metrics.pending.set(queue.waiting.len() as i64);
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

fn run_instance(shared: &Shared, mut session: Session) {
    while let Some(batch) = next_batch(shared) {
        run_batch(shared, &mut session, batch);
    }
}

/// The next batch to run, or `None` once the batcher is dropped.
fn next_batch(shared: &Shared) -> Option<Vec<Queued>> {
    let policy = &shared.policy;
    let mut queue = shared.lock();
    let first = loop {
        if queue.closed {
            return None;
        }
        // Requests whose caller has gone (timed out, disconnected) are not worth running.
        queue.waiting.retain(|q| !q.reply.is_closed());
        if let Some(first) = queue.waiting.pop_front() {
            break first;
        }
        queue = shared
            .wake
            .wait(queue)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    };
    let mut rows = first.job.rows;
    let deadline = first.enqueued + policy.delay;
    let mut batch = vec![first];
    while rows < policy.max_batch {
        let mut i = 0;
        while i < queue.waiting.len() && rows < policy.max_batch {
            let candidate = &queue.waiting[i];
            if candidate.reply.is_closed() {
                queue.waiting.remove(i);
            } else if rows + candidate.job.rows <= policy.max_batch && batch[0].fits_with(candidate)
            {
                rows += candidate.job.rows;
                batch.extend(queue.waiting.remove(i));
            } else {
                i += 1;
            }
        }
        let now = Instant::now();
        if rows >= policy.max_batch
            || policy.preferred.contains(&rows)
            || now >= deadline
            || queue.closed
        {
            break;
        }
        queue = shared
            .wake
            .wait_timeout(queue, deadline - now)
            .map(|(guard, _)| guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner().0);
    }
    shared.metrics.pending.set(queue.waiting.len() as i64);
    drop(queue);
    // Another instance may be idle and more requests waiting.
    shared.wake.notify_one();
    Some(batch)
}

fn run_batch(shared: &Shared, session: &mut Session, batch: Vec<Queued>) {
    let started = Instant::now();
    let rows: usize = batch.iter().map(|q| q.job.rows).sum();
    // The batch belongs to the trace of its oldest traced request; the others link to it.
    let none = tracing::Span::none();
    let first = batch
        .iter()
        .map(|q| &q.job.span)
        .find(|s| !s.is_none())
        .unwrap_or(&none);
    let parent = first.id();
    let span = crate::trace_span!(
        first,
        "batch",
        model.name = %shared.model,
        batch.rows = rows,
        batch.requests = batch.len(),
    );
    let mut inputs = Vec::with_capacity(batch.len());
    let mut plans = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for mut queued in batch {
        // Closes the request's `queue` span.
        queued.waiting = tracing::Span::none();
        if !span.is_none() && !queued.job.span.is_none() && queued.job.span.id() != parent {
            span.follows_from(&queued.job.span);
        }
        let queue_time = started.saturating_duration_since(queued.enqueued);
        shared.metrics.queued_for(queue_time.as_secs_f64());
        tracing::debug!(parent: &queued.job.span, queue_us = queue_time.as_micros() as u64, batch_rows = rows, "scheduled");
        inputs.push(queued.job.inputs);
        plans.push((queued.job.rows, queued.job.outputs));
        replies.push(queued.reply);
    }
    let result = span.in_scope(|| execute(session, inputs, &plans));
    shared
        .metrics
        .executed(rows, started.elapsed().as_secs_f64());
    match result {
        Ok(per_request) => {
            for (reply, outputs) in replies.into_iter().zip(per_request) {
                let _ = reply.send(Ok(outputs));
            }
        }
        Err(error) => {
            tracing::error!(parent: &span, model = %shared.model, %error, "batch failed");
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// How long a run may take and still run on the caller's task: past this, runs move to the
/// instance threads so a slow model never holds an async worker.
const INLINE_LIMIT: Duration = Duration::from_micros(500);

/// The executor of a model version without dynamic batching: `instance_count` sessions, each
/// request running alone on one. A request that finds a session free and nobody waiting runs
/// on the caller's task, saving two thread hand-offs (tens of microseconds): the common case
/// at low concurrency. Otherwise it joins a queue that one thread per instance runs in order,
/// back to back: under load a session is never idle while requests wait, where handing it from
/// task to task left it idle for a cross-thread wake-up between runs (measured on gRPC, one
/// session, 16 clients: 6,500 req/s handed over, about 11,000 queued). Slow models always
/// queue.
#[derive(Debug)]
pub(crate) struct Pool {
    shared: Arc<PoolShared>,
}

#[derive(Debug)]
struct PoolShared {
    model: String,
    state: Mutex<PoolState>,
    /// A request queued, a session returned, or the pool closed.
    changed: Condvar,
    inline: AtomicBool,
    metrics: ModelMetrics,
}

#[derive(Debug, Default)]
struct PoolState {
    free: Vec<Session>,
    queue: VecDeque<Queued>,
    next_id: u64,
    closed: bool,
}

impl PoolShared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        lock(&self.state)
    }

    /// Runs one request on `session` and gives the session back.
    fn run_on(&self, mut session: Session, job: Job) -> Result<Vec<OutputTensor>> {
        let Job {
            inputs,
            rows,
            outputs,
            span,
        } = job;
        let plans = vec![(rows, outputs)];
        let started = Instant::now();
        let result = span.in_scope(|| execute(&mut session, vec![inputs], &plans));
        let elapsed = started.elapsed();
        let mut state = self.lock();
        state.free.push(session);
        // Only a queued request needs an instance thread woken (one that queues later wakes
        // them itself): at low concurrency no thread is woken for nothing.
        let queued = !state.queue.is_empty();
        drop(state);
        if queued {
            self.changed.notify_all();
        }
        self.inline.store(elapsed < INLINE_LIMIT, Ordering::Relaxed);
        self.metrics.executed(rows, elapsed.as_secs_f64());
        result?
            .into_iter()
            .next()
            .ok_or_else(|| PredictorError::Runtime("no outputs".into()))
    }
}

impl Pool {
    pub(crate) fn new(model: &str, sessions: Vec<Session>, metrics: ModelMetrics) -> Result<Pool> {
        let instances = sessions.len();
        let shared = Arc::new(PoolShared {
            model: model.to_owned(),
            state: Mutex::new(PoolState {
                free: sessions,
                ..PoolState::default()
            }),
            changed: Condvar::new(),
            inline: AtomicBool::new(true),
            metrics,
        });
        for i in 0..instances {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("ms-{model}-{i}"))
                .spawn(move || run_queued(&shared))
                .map_err(|e| {
                    PredictorError::load(model, format!("cannot start an instance thread: {e}"))
                })?;
        }
        Ok(Pool { shared })
    }

    /// Runs one request. The wait for a session is bounded by the server's in-flight limit.
    pub(crate) async fn run(&self, job: Job) -> Result<Vec<OutputTensor>> {
        match self.start(job) {
            Started::Ran(result) => result,
            // A caller that gives up drops `answer`; its request is then skipped, not run.
            Started::Queued(answer) => answer.await.map_err(|_| {
                PredictorError::Runtime(format!("model '{}' was unloaded", self.shared.model))
            })?,
        }
    }

    /// Runs the request here if a session is free and nobody waits, else queues it.
    fn start(&self, job: Job) -> Started {
        let shared = &self.shared;
        let enqueued = Instant::now();
        // The request's wait for a session, as a `queue` span (nearly empty when it runs here).
        let waiting = queue_span(&job.span);
        let mut state = shared.lock();
        if state.queue.is_empty()
            && shared.inline.load(Ordering::Relaxed)
            && let Some(session) = state.free.pop()
        {
            drop(state);
            drop(waiting);
            shared.metrics.queued_for(enqueued.elapsed().as_secs_f64());
            return Started::Ran(shared.run_on(session, job));
        }
        let (reply, answer) = oneshot::channel();
        let id = state.next_id;
        state.next_id += 1;
        state.queue.push_back(Queued {
            id,
            job,
            enqueued,
            waiting,
            reply,
        });
        shared.metrics.pending.set(state.queue.len() as i64);
        drop(state);
        shared.changed.notify_all();
        Started::Queued(answer)
    }
}

/// What became of a request given to a [`Pool`].
enum Started {
    Ran(Result<Vec<OutputTensor>>),
    Queued(oneshot::Receiver<Result<Vec<OutputTensor>>>),
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

/// One instance thread of a [`Pool`]: runs queued requests while a session is free.
fn run_queued(shared: &PoolShared) {
    loop {
        let mut state = shared.lock();
        let (queued, session) = loop {
            if state.closed {
                // Queued callers get "unloaded" when their reply channel drops.
                state.queue.clear();
                return;
            }
            // Requests whose caller has gone (timed out, disconnected) are not worth running.
            state.queue.retain(|q| !q.reply.is_closed());
            if !state.queue.is_empty()
                && let Some(session) = state.free.pop()
                && let Some(queued) = state.queue.pop_front()
            {
                break (queued, session);
            }
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        };
        shared.metrics.pending.set(state.queue.len() as i64);
        drop(state);
        let Queued {
            job,
            enqueued,
            waiting,
            reply,
            ..
        } = queued;
        drop(waiting);
        shared.metrics.queued_for(enqueued.elapsed().as_secs_f64());
        let _ = reply.send(shared.run_on(session, job));
    }
}

/// The span of a request's wait for a batch or a session.
fn queue_span(request: &tracing::Span) -> tracing::Span {
    crate::trace_span!(request, "queue")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A tensor's shape and data.
type Shaped = (Vec<i64>, TensorData);

/// One request's part of a batch: its rows and the outputs it wants.
type Plan = (usize, Vec<String>);

/// Runs the requests' inputs as one batch and gives each request its rows of its outputs.
fn execute(
    session: &mut Session,
    per_request: Vec<Vec<InputTensor>>,
    waiting: &[Plan],
) -> Result<Vec<Vec<OutputTensor>>> {
    let runtime = |message: String| PredictorError::Runtime(message);
    let batched = per_request.len() > 1;
    let total_rows: usize = waiting.iter().map(|(rows, _)| rows).sum();
    // Transpose: one column of tensors per model input.
    let width = per_request.first().map_or(0, Vec::len);
    let mut columns: Vec<Vec<InputTensor>> = (0..width)
        .map(|_| Vec::with_capacity(per_request.len()))
        .collect();
    for inputs in per_request {
        for (column, input) in columns.iter_mut().zip(inputs) {
            column.push(input);
        }
    }
    let mut values: Vec<(String, SessionInputValue<'_>)> = Vec::with_capacity(width);
    for column in columns {
        let mut column = column.into_iter();
        let Some(first) = column.next() else { continue };
        let (name, mut shape) = (first.name, first.shape);
        let data = if batched {
            if let Some(dim) = shape.first_mut() {
                *dim = i64::try_from(total_rows).unwrap_or(i64::MAX);
            }
            let parts = std::iter::once(first.data)
                .chain(column.map(|t| t.data))
                .collect();
            TensorData::concat(parts).ok_or_else(|| {
                runtime(format!("input '{name}': requests disagree on its datatype"))
            })?
        } else {
            first.data
        };
        let value = to_ort(shape, data)
            .map_err(|e| PredictorError::invalid(format!("input '{name}': {e}")))?;
        values.push((name, SessionInputValue::from(value)));
    }
    let results = crate::trace_span!(
        &tracing::Span::current(),
        "onnxruntime.run",
        batch.rows = total_rows
    )
    .in_scope(|| session.run(values))
    .map_err(|e| runtime(e.to_string()))?;

    // Every output any request asked for, converted once.
    let mut converted: HashMap<&str, Shaped> = HashMap::new();
    for name in waiting.iter().flat_map(|(_, outputs)| outputs) {
        if converted.contains_key(name.as_str()) {
            continue;
        }
        let value = results
            .get(name)
            .ok_or_else(|| runtime(format!("the model did not produce output '{name}'")))?;
        let tensor = from_ort(value).map_err(|e| runtime(format!("output '{name}': {e}")))?;
        converted.insert(name, tensor);
    }
    if !batched {
        let outputs = waiting
            .first()
            .map(|(_, o)| o.as_slice())
            .unwrap_or_default();
        return Ok(vec![
            outputs
                .iter()
                .filter_map(|name| {
                    converted
                        .remove(name.as_str())
                        .map(|(shape, data)| output(name, shape, data))
                })
                .collect(),
        ]);
    }
    // Split each output along its first dimension by the requests' rows.
    let mut split: HashMap<&str, Vec<Option<Shaped>>> = HashMap::new();
    for (name, (shape, data)) in converted {
        let Some((&batch_dim, rest)) = shape.split_first() else {
            return Err(runtime(format!(
                "output '{name}' has no batch dimension to split"
            )));
        };
        if usize::try_from(batch_dim).ok() != Some(total_rows) {
            return Err(runtime(format!(
                "output '{name}' has {batch_dim} rows for a batch of {total_rows}"
            )));
        }
        let per_row: usize = rest
            .iter()
            .map(|&d| usize::try_from(d).unwrap_or(0))
            .product();
        let lengths: Vec<usize> = waiting.iter().map(|(rows, _)| rows * per_row).collect();
        let pieces = data.split(&lengths).ok_or_else(|| {
            runtime(format!(
                "output '{name}' does not split into the batch's rows"
            ))
        })?;
        let shaped = waiting
            .iter()
            .zip(pieces)
            .map(|((rows, _), piece)| {
                let mut shape = vec![i64::try_from(*rows).unwrap_or(i64::MAX)];
                shape.extend_from_slice(rest);
                Some((shape, piece))
            })
            .collect();
        split.insert(name, shaped);
    }
    Ok(waiting
        .iter()
        .enumerate()
        .map(|(i, (_, outputs))| {
            outputs
                .iter()
                .filter_map(|name| {
                    let (shape, data) = split.get_mut(name.as_str())?.get_mut(i)?.take()?;
                    Some(output(name, shape, data))
                })
                .collect()
        })
        .collect())
}

fn output(name: &str, shape: Vec<i64>, data: TensorData) -> OutputTensor {
    OutputTensor {
        name: name.to_owned(),
        shape,
        data,
        parameters: Parameters::new(),
    }
}
