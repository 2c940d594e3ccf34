//! The `hyperfuncd` binary: parse the command line, set up logging, run.
//!
//! Exit codes: 0 success; 1 any error (one `error:` line on stderr); 2 bad
//! command line (clap's usage message).

use clap::Parser;
use hyperfuncd::cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    let (default_level, log_format) = match &cli.command {
        // A config that does not load is reported by `run`; log as text till then.
        Command::Serve(a) => (
            "info",
            hyperfuncd::config::Config::load(a.config.as_deref())
                .map(|c| c.log.format)
                .unwrap_or_default(),
        ),
        _ => ("warn", Default::default()),
    };
    if let Err(e) = hyperfuncd::logging::init(default_level, log_format) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let mut config = hyperfuncd::config::Config::load(args.config.as_deref())?;
            if let Some(d) = args.data_dir {
                config.data_dir = Some(d);
            }
            if let Some(l) = args.listen {
                config.listen = l;
            }
            config.validate()?;
            hyperfuncd::metrics::install();
            #[cfg(feature = "failpoints")]
            let _failpoints = hyperfuncd::failpoint::setup();
            let shutdown = tokio_util::sync::CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("shutting down");
                signal.cancel();
            });
            hyperfuncd::serve::run(config, shutdown).await
        }
        Command::Bench(args) => hyperfuncd::cli::bench::run(args).await,
        Command::Completions(args) => hyperfuncd::cli::docs::completions(args),
        Command::Man(args) => hyperfuncd::cli::docs::man(args),
        other => hyperfuncd::cli::run_remote(cli.remote, other).await,
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// sled allocates and frees a 512 KiB I/O buffer per commit round: above
/// glibc's mmap threshold, each one was a fresh mapping whose pages the
/// kernel zeroed again. Serve them from the heap, and keep freed memory
/// up to a bound instead of trimming it back after every round.
fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}
