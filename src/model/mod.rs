//! The platform's vocabulary: validated ids, the records we persist, and the
//! call lifecycle. Knows nothing of HTTP, sled or Docker.

mod call;
mod function;
mod idem;
mod ids;
mod image;
mod user;

pub use call::{
    Call, CallState, Event, EventKind, Outcome, OutputState, TransitionError, SHORT_LEN,
};
pub use function::{validate_runtime_name, EnvVar, Function, FunctionSpec, MIN_CPUS, MIN_MEMORY};
pub use idem::{
    BadIdempotencyKey, Idempotency, IdempotencyKey, IdempotencyRecord, IDEMPOTENCY_KEY_MAX,
};
pub use ids::{CallId, FnKey, IdError, Name, Secret};
pub use image::{normalize_registry, parse_registry_host, ImageRef, RegistryLogin, DOCKER_HUB};
pub use user::{
    hash_key, ApiKey, Budget, QueueBudget, User, UserLimits, UserLimitsV1, UserV1, UserV2,
    API_KEY_PREFIX,
};

/// Seconds since the Unix epoch, the timestamp of every record.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with second precision, as the log lines show it.
pub fn format_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}
