//! `hyperfuncd bench` lives in its own module, [`crate::bench`]; this name
//! keeps the CLI's subcommand table pointing at it, and lends the bench the
//! CLI's API client (private to `cli`), which it drives its daemons with.

pub(crate) use super::client::Client;
pub use crate::bench::{run, BenchArgs};
