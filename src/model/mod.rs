//! The platform's vocabulary: validated ids, the records we persist, and the
//! call lifecycle. Knows nothing of HTTP, sled or Docker.

mod call;
mod function;
mod idem;
mod ids;
mod image;
mod schedule;
mod stats;
mod user;
mod webhook;

/// Reads a field appended to a stored record after records were written
/// without it (`#[serde(default, deserialize_with = "trailing")]`): bincode
/// is positional, so an older record simply ends where the field would
/// begin, and reading it fails at the end of the input; that reads as
/// `None`. Only for an `Option` that is a record's last field: sled's
/// codec still refuses bytes left over after it, though a damaged tag
/// byte there also reads as `None` (for a function: not pinned, which
/// the next start pins again).
pub(crate) fn trailing<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    use serde::Deserialize;
    Ok(Option::<T>::deserialize(d).unwrap_or(None))
}

pub use call::{
    Call, CallState, Event, EventKind, Outcome, OutputState, TransitionError, SHORT_LEN,
};
pub use function::{
    digest_of, validate_runtime_name, EnvVar, Function, FunctionSpec, MIN_CPUS, MIN_MEMORY,
};
pub use idem::{
    BadIdempotencyKey, Idempotency, IdempotencyKey, IdempotencyRecord, IDEMPOTENCY_KEY_MAX,
};
pub use ids::{CallId, FnKey, IdError, Name, Secret};
pub use image::{
    normalize_registry, parse_registry_host, ImageRef, PulledImage, RegistryLogin, DOCKER_HUB,
};
pub use schedule::{
    catch_up_window, Schedule, Timetable, DEFAULT_TIMEZONE, EVERY_MIN, SCHEDULE_PAYLOAD_MAX,
};
pub use stats::FunctionStats;
pub use user::{
    hash_key, ApiKey, Budget, QueueBudget, User, UserLimits, UserLimitsV1, UserV1, UserV2,
    API_KEY_PREFIX,
};
pub use webhook::{
    backoff, envelope, sign, Attempt, CallWebhook, Delivery, DeliveryState, Envelope,
    FunctionWebhook, Lease, RetryRule, WebhookOn, WebhookSecret, WEBHOOK_OUTPUT_MAX,
    WEBHOOK_URL_MAX,
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

/// A byte count as messages show it: whole MiB or KiB when exact, else bytes.
pub fn human_bytes(n: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    const KIB: u64 = 1024;
    if n >= MIB && n % MIB == 0 {
        format!("{} MiB", n / MIB)
    } else if n >= KIB && n % KIB == 0 {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn byte_sizes() {
        assert_eq!(human_bytes(5 * 1024 * 1024), "5 MiB");
        assert_eq!(human_bytes(2048), "2 KiB");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }
}
