//! The engine's error types, one enum per kind of call that can fail, so
//! that callers match on variants rather than on messages or
//! `io::ErrorKind`s.

use std::fmt;
use std::io;

/// Why a call that needed Redis could not be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable(pub String);

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redis is unreachable: {}", self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Why a virtual socket could not be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtualError {
    /// The target is not an open connection or live virtual socket.
    NoSuchSocket,
    PrefixTooLong,
    /// The target lives on another node, which did not answer.
    Unreachable(String),
}

/// Why joining a cluster failed.
#[derive(Debug)]
pub enum JoinError {
    /// The Redis URL does not parse: the caller's mistake.
    BadUrl { url: String, why: String },
    /// Redis did not answer in time, or refused.
    Unreachable { url: String, why: String },
    /// The node's Redis runtime could not be started.
    Runtime(io::Error),
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::BadUrl { url, why } => write!(f, "bad Redis URL {url:?}: {why}"),
            JoinError::Unreachable { url, why } => write!(f, "cannot reach Redis at {url}: {why}"),
            JoinError::Runtime(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for JoinError {}

/// Why a presence call could not be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceError {
    /// `track`'s target is not an open connection or live virtual socket.
    NoSuchSocket,
    /// A cluster's Redis did not answer in time.
    Unreachable(Unreachable),
}
