//! The daemon's log: set-up (level, text or JSON, colours only on a
//! terminal) and the audit trail, the events an operator must find in the
//! journal months later at the default level (`info`): function and user
//! changes, key rotations, failed calls with their reason. Per-call detail
//! (accepted, finished) is `debug`.
//!
//! Audit events have the target `hyperfuncd::audit`, so they can be kept at
//! a quieter level (`HYPERFUNCD_LOG=warn,hyperfuncd::audit=info`). They never
//! carry a key, a capability secret or a payload.

use crate::config::LogFormat;
use crate::model::{Call, CallState, FnKey, Function, Name, User};
use std::io::IsTerminal;

/// The target of every audit event.
pub const AUDIT: &str = "hyperfuncd::audit";

/// Sets up the global subscriber on stderr. `default_level` applies unless
/// `HYPERFUNCD_LOG` is set (and not empty); `HYPERFUNCD_LOG_FORMAT`
/// (`text`/`json`) overrides `format`.
pub fn init(default_level: &str, format: LogFormat) -> Result<(), String> {
    let format = match std::env::var("HYPERFUNCD_LOG_FORMAT") {
        Ok(v) if v.eq_ignore_ascii_case("json") => LogFormat::Json,
        Ok(v) if v.eq_ignore_ascii_case("text") => LogFormat::Text,
        Ok(v) if v.is_empty() => format,
        Ok(v) => {
            return Err(format!(
                "HYPERFUNCD_LOG_FORMAT={v:?}: expected text or json"
            ))
        }
        Err(_) => format,
    };
    let filter = match std::env::var("HYPERFUNCD_LOG") {
        Ok(v) if !v.trim().is_empty() => tracing_subscriber::EnvFilter::try_new(&v)
            .map_err(|e| format!("HYPERFUNCD_LOG={v:?}: {e}"))?,
        _ => tracing_subscriber::EnvFilter::new(default_level),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => tracing::subscriber::set_global_default(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_ansi(false)
                .finish(),
        ),
        // Colour codes in a file or the journal are noise.
        LogFormat::Text => tracing::subscriber::set_global_default(
            builder
                .with_ansi(
                    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
                )
                .finish(),
        ),
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))?;
    // `log` records (rustls writes through `log`) go to the same subscriber,
    // after it is set, so that its level hint is known.
    use tracing_log::AsLog;
    log::set_boxed_logger(Box::new(LogBridge(tracing_log::LogTracer::new())))
        .map_err(|e| format!("cannot set up logging: {e}"))?;
    log::set_max_level(tracing::level_filters::LevelFilter::current().as_log());
    Ok(())
}

/// Hands `log` records to tracing, as `tracing_log::LogTracer` does, except
/// that what a TLS peer alone causes is logged at debug (`peer_caused`).
struct LogBridge(tracing_log::LogTracer);

impl log::Log for LogBridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(
            &log::Metadata::builder()
                .level(demoted(metadata))
                .target(metadata.target())
                .build(),
        )
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = demoted(record.metadata());
        if level == record.level() {
            return self.0.log(record);
        }
        self.0.log(
            &log::Record::builder()
                .args(*record.args())
                .level(level)
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {}
}

/// The level a `log` record is logged at. rustls warns of what a peer sent
/// (an IP address as SNI, a duplicate SNI, a warning alert, a message out of
/// order): any client can make as many as it likes, one line per handshake,
/// which would flood the journal and push the audit trail out of its rate
/// limit. The daemon logs a failed handshake at debug itself (`serve.rs`),
/// so these are debug too; anything else keeps its level.
fn demoted(metadata: &log::Metadata<'_>) -> log::Level {
    let rustls = metadata.target() == "rustls" || metadata.target().starts_with("rustls::");
    match metadata.level() {
        log::Level::Warn if rustls => log::Level::Debug,
        level => level,
    }
}

// ---- the audit trail ----

pub fn function_created(actor: &User, f: &Function) {
    tracing::info!(target: AUDIT, actor = %actor.name, function = %f.name, owner = %f.owner,
        image = %f.spec.image, image_digest = f.image_digest.as_deref().unwrap_or(""),
        "function created");
}

pub fn function_updated(actor: &User, f: &Function, url_refreshed: bool) {
    tracing::info!(target: AUDIT, actor = %actor.name, function = %f.name, owner = %f.owner,
        image = %f.spec.image, image_digest = f.image_digest.as_deref().unwrap_or(""),
        url_refreshed, "function updated");
}

/// An image hyperfuncd pulled was removed from the Engine: no function had
/// used it for `[images] gc_after` (`kept`: only its references of
/// `repository` went, since another reference names it).
pub fn image_removed(id: &str, repository: &str, unused_secs: u64, kept: bool) {
    tracing::info!(target: AUDIT, image = id, repository, unused_secs, kept,
        "unused image removed");
}

/// A function's pinned image was gone from the Engine and was pulled again.
pub fn image_pulled_again(function: &FnKey, image: &str) {
    tracing::info!(target: AUDIT, function = %function.name, owner = %function.owner, image,
        "pinned image pulled again");
}

pub fn function_removed(actor: &User, key: &FnKey, force: bool) {
    tracing::info!(target: AUDIT, actor = %actor.name, function = %key.name, owner = %key.owner, force, "function removed");
}

pub fn user_added(actor: &User, user: &User) {
    tracing::info!(target: AUDIT, actor = %actor.name, user = %user.name,
        max_concurrency = user.max_concurrency, admin = user.admin, "user added");
}

pub fn user_updated(actor: &User, user: &User, key_rotated: bool) {
    tracing::info!(target: AUDIT, actor = %actor.name, user = %user.name,
        max_concurrency = user.max_concurrency, key_rotated, "user updated");
    if key_rotated {
        tracing::info!(target: AUDIT, actor = %actor.name, user = %user.name, "user key rotated");
    }
}

pub fn user_removed(actor: &User, name: &Name) {
    tracing::info!(target: AUDIT, actor = %actor.name, user = %name, "user removed");
}

/// A registry login was stored (checked with the registry first). The
/// password is never a field.
pub fn registry_login(actor: &User, host: &str, username: &str) {
    tracing::info!(target: AUDIT, actor = %actor.name, host, username, "registry login");
}

pub fn registry_logout(actor: &User, host: &str) {
    tracing::info!(target: AUDIT, actor = %actor.name, host, "registry logout");
}

/// A call was accepted (durable).
pub fn call_accepted(call: &Call) {
    tracing::debug!(call = %call.id, function = %call.function, owner = %call.owner,
        stdin_bytes = call.stdin_len, "call accepted");
}

/// A call ended: a failure is audited with its reason, a success is detail.
pub fn call_ended(call: &Call) {
    match call.state {
        CallState::Failed => tracing::info!(target: AUDIT, call = %call.id,
            function = %call.function, owner = %call.owner, exit_code = call.exit_code,
            reason = call.message.as_deref().unwrap_or(""), "call failed"),
        _ => tracing::debug!(call = %call.id, function = %call.function,
            state = call.state.as_str(), stdout_bytes = call.stdout_len, "call ended"),
    }
}

/// `count` queued calls of a removed function were failed at once.
pub fn calls_cancelled(function: &FnKey, count: usize) {
    tracing::info!(target: AUDIT, function = %function.name, owner = %function.owner, count,
        reason = "cancelled: the function was removed", "queued calls failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level_of(target: &str, level: log::Level) -> log::Level {
        demoted(&log::Metadata::builder().target(target).level(level).build())
    }

    #[test]
    fn what_a_tls_peer_causes_is_debug() {
        use log::Level::*;
        assert_eq!(level_of("rustls::msgs::handshake", Warn), Debug);
        assert_eq!(level_of("rustls::common_state", Warn), Debug);
        assert_eq!(level_of("rustls", Warn), Debug);
        // Not a warning, or not rustls: unchanged.
        assert_eq!(level_of("rustls::common_state", Error), Error);
        assert_eq!(level_of("rustls::server::hs", Trace), Trace);
        assert_eq!(level_of("rustlsx", Warn), Warn);
        assert_eq!(level_of("sled::pagecache", Warn), Warn);
    }
}
