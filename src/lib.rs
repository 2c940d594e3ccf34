//! hyperfuncd: a Docker-centric serverless platform in one binary.
//!
//! Module map (dependencies point one way, top to bottom):
//! - [`cli`]: the command line; a remote client that speaks the same types as [`api`];
//!   `cli::bench`: `hyperfuncd bench`, private daemons against raw `docker run`.
//! - [`api`]: HTTP only — parse, authenticate, hand to [`service`], map errors.
//! - [`service`]: the operations of the platform (create a function, accept a call, ...).
//! - [`scheduler`]: per-user FIFO drain, quotas, recovery, timeouts.
//! - [`store`]: the only module that names sled.
//! - [`runtime`]: the only module that names bollard.
//! - [`model`]: ids, records, the call lifecycle.
//! - [`registry`]: registry credentials: the host's Docker `config.json`, whose login a pull uses.
//! - [`config`]: the one configuration schema.
//! - [`serve`]: first start, TLS, and the server's main loop.
//! - [`logging`]: log set-up (text or JSON) and the audit trail.
//! - [`metrics`]: the Prometheus metrics; counted where things happen, levels read at scrape.

pub mod activity;
pub mod api;
pub mod cli;
pub mod config;
pub mod failpoint;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod runtime;
pub mod scheduler;
pub mod serve;
pub mod service;
pub mod store;
