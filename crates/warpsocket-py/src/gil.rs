//! When the binding releases the GIL: the one policy every call applies.
//!
//! Releasing and re-taking the GIL costs more than short, local engine work,
//! so such calls keep it. A call releases it when it may wait (for Redis or
//! another node in a cluster, for a server's threads) or walk many sockets,
//! so that other Python threads run meanwhile. Calls that do not go through
//! [`run`] are short: local work, or a hand-off to the cluster's sender.

use pyo3::Python;
use warpsocket_core::Target;

use crate::ENGINE;

/// Sends to more targets than this walk enough sockets to release the GIL.
const FAN_OUT: usize = 16;

/// What a call into the engine does, as far as the GIL is concerned.
pub(crate) enum Work<'a> {
    /// A send: long when it reaches a channel or more than [`FAN_OUT`] targets.
    Send(&'a [Target]),
    /// A key/value call: waits for Redis in a cluster, else short.
    Kv,
    /// Whatever its arguments, may wait or walk many sockets.
    Long,
}

impl Work<'_> {
    fn releases_gil(&self) -> bool {
        match self {
            Work::Send(targets) => {
                targets.len() > FAN_OUT || targets.iter().any(|t| matches!(t, Target::Channel(_)))
            }
            Work::Kv => ENGINE.node_id() != 0,
            Work::Long => true,
        }
    }
}

/// Runs `call`, without the GIL when `work` calls for it.
pub(crate) fn run<T: Send>(py: Python<'_>, work: Work<'_>, call: impl FnOnce() -> T + Send) -> T {
    if work.releases_gil() {
        py.detach(call)
    } else {
        call()
    }
}
