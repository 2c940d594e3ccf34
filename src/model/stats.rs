//! A function's counters, as the store keeps them and the API shows them.

use serde::{Deserialize, Serialize};

/// Per-function counters, kept in the same transactions as the records they count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionStats {
    pub total: u64,
    pub pending: u64,
    pub running: u64,
    pub finished: u64,
    pub failed: u64,
    /// Bytes of STDOUT held in the function's output cache.
    pub output_bytes: u64,
    /// Bytes of events held in the function's log cache.
    pub log_bytes: u64,
}
