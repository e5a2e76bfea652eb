//! The application's say on an upgrade: the request `handle_open` is shown,
//! and its answer.
//!
//! Apart from the worker queues that carry the request and the hub that
//! carries the answer back, so that neither owns what the other also speaks.

/// The upgrade request `handle_open` is asked about.
#[derive(Debug, PartialEq, Eq)]
pub struct OpenRequest {
    pub ip: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// `handle_open`'s answer: accept, or the HTTP status to refuse with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Refuse(u16),
}
