//! Payload logging's native half: the log intake (events from the `logger` filter, on the
//! sidecar's REST port at `POST /meshserve/events`), the durable spool behind it, delivery to
//! the sink, and `meshserve log-sink`, a CloudEvents receiver to try it with. In the order
//! events flow:
//!
//! - [`cloudevents`]: events read from binary-mode HTTP headers, and written as JSON lines.
//! - [`metrics`]: the counters every stage below updates.
//! - [`spool`]: the on-disk queue (group-committed fsync before acknowledging; bounded).
//! - [`http_sink`]: sends to an HTTP sink within a window adapted to how it keeps up.
//! - [`delivery`]: in order, at least once, with retries and backoff, to an HTTP CloudEvents
//!   sink or a JSON-lines file.
//! - [`recent`]: the last events taken, in memory, for `meshserve up`'s console.
//! - [`intake`]: what the REST server hands events to: checks them, spools them, starts
//!   delivery.
//! - [`receiver`]: writes what it gets as JSON lines (like KServe's message-dumper).

pub mod cloudevents;
pub mod delivery;
pub mod http_sink;
pub mod intake;
pub mod metrics;
pub mod receiver;
pub mod recent;
pub mod spool;

pub use intake::{Intake, IntakeError, PayloadSettings, events_from_request};
