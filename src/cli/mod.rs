//! The command line: `serve` and the remote commands. The remote commands
//! speak the management API with the same types the server uses
//! (`api::types`). Only this module and `main.rs` print to stdout.

pub mod bench;
mod client;
pub mod docs;
mod profile;
mod progress;

pub use profile::Profile;

use crate::api::types::*;
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use client::Client;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

/// The command line. Client flags (`RemoteFlags`) are taken before the
/// subcommand (`hyperfuncd --endpoint URL func ls`) and anywhere after
/// `func`/`user` (`hyperfuncd func ls --endpoint URL`), and only there:
/// `serve`, `bench`, `completions` and `man` neither list nor take them.
#[derive(Debug)]
pub struct Cli {
    /// Client flags given before the subcommand.
    pub remote: RemoteFlags,
    pub command: Command,
}

/// What clap derives; `Cli` adds the one rule clap cannot express, that
/// client flags before a subcommand which is not a client are refused
/// rather than ignored.
#[derive(Parser, Debug)]
#[command(
    name = "hyperfuncd",
    version,
    about = "Docker-centric serverless functions: every call runs in a fresh container"
)]
struct Parsed {
    #[command(flatten)]
    remote: RemoteFlags,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    fn checked(p: Parsed) -> Result<Cli, clap::Error> {
        let client = matches!(
            p.command,
            Command::Func(_) | Command::User(_) | Command::Registry(_) | Command::Image(_)
        );
        if !client && !p.remote.is_empty() {
            return Err(clap::Error::raw(
                clap::error::ErrorKind::ArgumentConflict,
                "--endpoint, --key, --ca and --profile are client options: they apply to `func`, `user` and `registry` only\n",
            ));
        }
        Ok(Cli {
            remote: p.remote,
            command: p.command,
        })
    }
}

impl clap::CommandFactory for Cli {
    fn command() -> clap::Command {
        Parsed::command()
    }
    fn command_for_update() -> clap::Command {
        Parsed::command_for_update()
    }
}

impl clap::FromArgMatches for Cli {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Cli::checked(Parsed::from_arg_matches(m)?)
    }
    fn from_arg_matches_mut(m: &mut clap::ArgMatches) -> Result<Self, clap::Error> {
        Cli::checked(Parsed::from_arg_matches_mut(m)?)
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Cli::from_arg_matches(m)?;
        Ok(())
    }
}

impl Parser for Cli {}

/// Where and how to reach a daemon: the client commands' options.
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Client options")]
pub struct RemoteFlags {
    /// API endpoint, e.g. https://faas.example.com:8443 [env: HYPERFUNC_ENDPOINT]
    #[arg(long)]
    pub endpoint: Option<String>,
    /// API key [env: HYPERFUNC_KEY]
    #[arg(long)]
    pub key: Option<String>,
    /// PEM certificate to trust for the endpoint [env: HYPERFUNC_CA]
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client profile file [env: HYPERFUNC_PROFILE; default: ~/.config/hyperfuncd/profile.toml]
    #[arg(long)]
    pub profile: Option<PathBuf>,
}

/// The ids of `RemoteFlags`' arguments (a unit test keeps the list whole).
const REMOTE_FLAG_IDS: [&str; 4] = ["endpoint", "key", "ca", "profile"];

impl RemoteFlags {
    fn is_empty(&self) -> bool {
        self.endpoint.is_none() && self.key.is_none() && self.ca.is_none() && self.profile.is_none()
    }

    /// `self`, with what it lacks taken from `outer` (flags given before the subcommand).
    fn or(self, outer: RemoteFlags) -> RemoteFlags {
        RemoteFlags {
            endpoint: self.endpoint.or(outer.endpoint),
            key: self.key.or(outer.key),
            ca: self.ca.or(outer.ca),
            profile: self.profile.or(outer.profile),
        }
    }
}

/// `RemoteFlags` as global arguments of `func` and `user`, so every one of
/// their subcommands takes them too, wherever they stand after `func`/`user`.
#[derive(Debug, Clone, Default)]
pub struct ClientFlags(pub RemoteFlags);

impl clap::FromArgMatches for ClientFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        RemoteFlags::from_arg_matches(m).map(ClientFlags)
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(m)
    }
}

impl Args for ClientFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        global(RemoteFlags::augment_args(cmd))
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        global(RemoteFlags::augment_args_for_update(cmd))
    }
}

fn global(mut cmd: clap::Command) -> clap::Command {
    for id in REMOTE_FLAG_IDS {
        cmd = cmd.mut_arg(id, |a| a.global(true));
    }
    cmd
}

/// `func` with the client options, then its subcommand.
#[derive(Args, Debug)]
pub struct FuncArgs {
    #[command(flatten)]
    pub client: ClientFlags,
    #[command(subcommand)]
    pub cmd: FuncCmd,
}

/// `user` with the client options, then its subcommand.
#[derive(Args, Debug)]
pub struct UserArgs {
    #[command(flatten)]
    pub client: ClientFlags,
    #[command(subcommand)]
    pub cmd: UserCmd,
}

/// `registry` with the client options, then its subcommand.
#[derive(Args, Debug)]
pub struct ImageArgs {
    #[command(flatten)]
    pub client: ClientFlags,
    #[command(subcommand)]
    pub cmd: ImageCmd,
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// List the images functions use: their digest, size, whether
    /// hyperfuncd pulled them (and so removes them once unused) and which
    /// functions run them
    #[command(after_help = "Example:\n  hyperfuncd image ls -o json")]
    Ls {
        /// Output format: a table for people, or JSON for scripts
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
}

#[derive(Args, Debug)]
pub struct RegistryArgs {
    #[command(flatten)]
    pub client: ClientFlags,
    #[command(subcommand)]
    pub cmd: RegistryCmd,
}

#[derive(Subcommand, Debug)]
pub enum RegistryCmd {
    /// Log in to a registry: checked with it, then used for your pulls from it
    #[command(
        after_help = "The password is read from STDIN (one line), never from the command line.\n\nExample:\n  echo \"$TOKEN\" | hyperfuncd registry login registry.example.com --username ci --password-stdin"
    )]
    Login {
        /// The registry host, HOST[:PORT] as image references write it
        host: String,
        /// The registry username
        #[arg(long, short)]
        username: String,
        /// Read the password from STDIN (the only way it is read; accepted as `docker login` spells it)
        #[arg(long)]
        password_stdin: bool,
    },
    /// Forget your login to a registry
    #[command(after_help = "Example:\n  hyperfuncd registry logout registry.example.com")]
    Logout {
        /// The registry host
        host: String,
    },
    /// List your registry logins (host and username)
    #[command(after_help = "Example:\n  hyperfuncd registry ls -o json")]
    Ls {
        /// Output format: a table for people, or JSON for scripts
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: HTTPS API, scheduler and container runtime
    #[command(
        after_help = "Example:\n  hyperfuncd serve --config /etc/hyperfuncd/config.toml --listen 0.0.0.0:8443"
    )]
    Serve(ServeArgs),
    /// Manage and call functions
    /// Boxed: the create and update flags make it the largest by far.
    Func(Box<FuncArgs>),
    /// Manage users (admin only)
    User(UserArgs),
    /// Your logins to private image registries, used for your pulls
    Registry(RegistryArgs),
    /// The images functions use (admin only)
    Image(ImageArgs),
    /// Measure hyperfuncd against raw `docker run` on this host (private daemons; prints one table)
    Bench(bench::BenchArgs),
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell
    #[command(
        after_help = "Example:\n  hyperfuncd completions bash > /etc/bash_completion.d/hyperfuncd"
    )]
    Completions(docs::CompletionsArgs),
    /// Write man pages for every command into a directory
    #[command(after_help = "Example:\n  hyperfuncd man /usr/local/share/man/man1")]
    Man(docs::ManArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Config file [env: HYPERFUNCD_CONFIG; default: /etc/hyperfuncd/config.toml if present]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// State directory (overrides the config file)
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Listen address ADDR:PORT (overrides the config file)
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// A schedule's flags, on create and update.
#[derive(clap::Args, Debug, Default)]
pub struct ScheduleArgs {
    /// Call the function on a schedule: 5 cron fields ('*/5 * * * *') or
    /// '@every DURATION' ('@every 5m', at least 1s); one call per tick
    #[arg(long)]
    schedule: Option<String>,
    /// File whose bytes are each tick's STDIN (at most 64 KiB; default: none)
    #[arg(long)]
    schedule_payload: Option<PathBuf>,
    /// IANA time zone the cron fields are read in, e.g. Europe/Paris (default UTC)
    #[arg(long)]
    timezone: Option<String>,
}

impl ScheduleArgs {
    /// The body's schedule, if any flag was given (the payload read and
    /// base64-encoded here).
    fn body(self) -> anyhow::Result<Option<ScheduleBody>> {
        use base64::Engine as _;
        if self.schedule.is_none() && self.schedule_payload.is_none() && self.timezone.is_none() {
            return Ok(None);
        }
        let payload = match &self.schedule_payload {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                Some(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
            None => None,
        };
        Ok(Some(ScheduleBody {
            expression: self.schedule,
            timezone: self.timezone,
            payload,
        }))
    }
}

#[derive(Subcommand, Debug)]
pub enum FuncCmd {
    /// Register a function: IMAGE [COMMAND [ARG...]]
    #[command(
        after_help = "Example:\n  hyperfuncd func create --name resize -e WIDTH=640 --timeout 30s myorg/resize:1.2 resize --png"
    )]
    Create {
        /// Name of the function: lower-case letters, digits and '-', at most 63
        #[arg(long)]
        name: String,
        /// Environment variable K=V (repeatable)
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        /// File of K=V lines (# comments and blank lines ignored)
        #[arg(long)]
        env_file: Vec<PathBuf>,
        /// Kill a call after this long, e.g. 30s, 5m (default and most: the server's
        /// limits.max_timeout, 1h unless configured)
        #[arg(long)]
        timeout: Option<String>,
        /// Memory limit, e.g. 268435456, 256m, 1g
        #[arg(long, value_parser = parse_bytes)]
        memory: Option<u64>,
        /// CPUs, e.g. 0.5
        #[arg(long)]
        cpus: Option<f64>,
        /// OCI runtime of its containers, e.g. runsc (gVisor); default: the server's.
        /// Non-admins may choose only the server's default or its allowed_runtimes
        #[arg(long)]
        runtime: Option<String>,
        /// POST each call's end to this https URL, signed (Standard Webhooks);
        /// prints the signing secret once
        #[arg(long, value_name = "URL")]
        webhook: Option<String>,
        /// Which ends the webhook is sent for: finished, failed (default both)
        #[arg(long, value_name = "EVENTS", value_delimiter = ',')]
        webhook_on: Option<Vec<String>>,
        #[command(flatten)]
        schedule: ScheduleArgs,
        /// Docker image by name (NAME[:TAG] or NAME@DIGEST; not an image ID),
        /// from an allowed registry; present locally or pulled
        image: String,
        /// Command and arguments to run (default: the image's CMD)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Change a function; running calls keep their old settings
    #[command(
        after_help = "Example:\n  hyperfuncd func update resize -e WIDTH=800 --timeout none -- resize --jpeg"
    )]
    Update {
        /// The function to change (NAME, or OWNER/NAME for an admin)
        name: String,
        /// Add or replace an environment variable K=V (repeatable)
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        /// File of K=V lines to add or replace (# comments and blank lines ignored)
        #[arg(long)]
        env_file: Vec<PathBuf>,
        /// Remove an environment variable (repeatable)
        #[arg(long)]
        unset_env: Vec<String>,
        /// New timeout, or "none" to remove it (the server's limits.max_timeout then applies)
        #[arg(long)]
        timeout: Option<String>,
        /// New memory limit, e.g. 268435456, 256m, 1g
        #[arg(long, value_parser = parse_bytes)]
        memory: Option<u64>,
        /// New CPU limit, e.g. 0.5
        #[arg(long)]
        cpus: Option<f64>,
        /// New OCI runtime, or "default" to follow the server's again
        #[arg(long)]
        runtime: Option<String>,
        #[command(flatten)]
        schedule: ScheduleArgs,
        /// Remove the schedule: its ticks stop
        #[arg(long, conflicts_with_all = ["schedule", "schedule_payload", "timezone"])]
        no_schedule: bool,
        /// New image
        #[arg(long)]
        image: Option<String>,
        /// Issue a new call URL; the old one stops working
        #[arg(long)]
        refresh: bool,
        /// Pull the image's tag again and run what it names now (prints
        /// the old and new digest); without it the pinned digest stays
        #[arg(long)]
        pull: bool,
        /// Set the webhook URL (a first webhook prints its signing secret once)
        #[arg(long, value_name = "URL", conflicts_with = "no_webhook")]
        webhook: Option<String>,
        /// Which ends the webhook is sent for: finished, failed
        #[arg(long, value_name = "EVENTS", value_delimiter = ',')]
        webhook_on: Option<Vec<String>>,
        /// Remove the webhook URL (the secret stays for X-Callback-Url calls)
        #[arg(long)]
        no_webhook: bool,
        /// Make a new webhook signing secret and print it once
        #[arg(long)]
        rotate_webhook_secret: bool,
        /// New command and arguments (after --)
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List functions
    #[command(after_help = "Example:\n  hyperfuncd func ls -o json")]
    Ls {
        /// Output format: a table for people, or JSON for scripts
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Show functions as JSON (one object, or an array for several names)
    #[command(after_help = "Example:\n  hyperfuncd func inspect resize bob/resize")]
    Inspect {
        /// Functions to show (NAME, or OWNER/NAME for an admin)
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove functions
    #[command(after_help = "Example:\n  hyperfuncd func rm --force resize")]
    Rm {
        /// Cancel queued calls and kill running ones
        #[arg(long, short)]
        force: bool,
        /// Functions to remove (NAME, or OWNER/NAME for an admin)
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Call a function; the payload is piped STDIN, if any
    #[command(after_help = "Example:\n  hyperfuncd func call resize < photo.png")]
    Call {
        /// Wait and print the call's STDOUT instead of its id
        #[arg(long)]
        sync: bool,
        /// Safe resubmission: a call already made with this key (same user,
        /// function and payload) is answered again instead of run twice
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// The function to call (NAME, or OWNER/NAME for an admin)
        name: String,
    },
    /// Send a call's completion webhook again (a new retry window)
    #[command(
        after_help = "Example:\n  hyperfuncd func redeliver 0c6f3b5e-0f0c-4d55-8a4b-2b0c3f7a9e21"
    )]
    Redeliver {
        /// The call whose webhook to send again
        call_id: String,
    },
    /// Print a call's STDOUT (once: it is deleted when fetched)
    #[command(
        after_help = "Example:\n  hyperfuncd func get --wait 0c6f3b5e-0f0c-4d55-8a4b-2b0c3f7a9e21 > small.png"
    )]
    Get {
        /// Wait until the call has ended
        #[arg(long)]
        wait: bool,
        /// The CallId that `func call` printed
        call_id: String,
    },
    /// Show a function's call events
    #[command(after_help = "Example:\n  hyperfuncd func logs --follow --tail 20 resize")]
    Logs {
        /// Only the last N events
        #[arg(long)]
        tail: Option<usize>,
        /// Keep printing new events until interrupted
        #[arg(long, short)]
        follow: bool,
        /// Only the events of this call
        #[arg(long)]
        callid: Option<String>,
        /// Output format: a table for people, or JSON for scripts
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
        /// The function whose events to show (NAME, or OWNER/NAME for an admin)
        name: String,
    },
    /// List a function's calls, newest first
    #[command(
        after_help = "Example:\n  hyperfuncd func calls --state FAILED --since 1h resize\n  hyperfuncd func calls --limit 500 -o json resize"
    )]
    Calls {
        /// Only calls in this state (PENDING, RUNNING, FINISHED, FAILED); repeat or comma-separate for several
        #[arg(long, short)]
        state: Vec<String>,
        /// Only calls accepted within this long (90s, 15m, 2h, 1d) or since this RFC 3339 time
        #[arg(long)]
        since: Option<String>,
        /// Only calls accepted before this long ago, or this RFC 3339 time
        #[arg(long)]
        until: Option<String>,
        /// Most calls to show (pages of up to 500 are fetched until then)
        #[arg(long, short = 'n', default_value_t = 50)]
        limit: usize,
        /// Output format: a table for people, or JSON for scripts
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
        /// The function whose calls to list (NAME, or OWNER/NAME for an admin)
        name: String,
    },
    /// Count a function's calls by state
    #[command(after_help = "Example:\n  hyperfuncd func status -o json resize")]
    Status {
        /// Output format: a table for people, or JSON for scripts
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
        /// The function whose calls to count (NAME, or OWNER/NAME for an admin)
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Add a user; prints the key once, alone on the last line
    #[command(
        after_help = "Example:\n  key=$(hyperfuncd user add bob --max-concurrency 4 | tail -1)"
    )]
    Add {
        /// Name of the new user
        name: String,
        /// Calls of the user that may run at once; more wait in its queue (default: scheduler.default_max_concurrency)
        #[arg(long)]
        max_concurrency: Option<u32>,
        /// Calls accepted and not yet started; past it calls get 429 (default: scheduler.default_max_queued)
        #[arg(long)]
        max_queued: Option<u64>,
        /// Payload bytes of those calls, e.g. 1g (default: scheduler.default_max_queued_bytes)
        #[arg(long, value_parser = parse_bytes)]
        max_queued_bytes: Option<u64>,
        /// Functions the user may own (default: scheduler.default_max_functions)
        #[arg(long)]
        max_functions: Option<u32>,
        /// Requests per second per API key and per call URL (default: scheduler.default_rate)
        #[arg(long)]
        rate: Option<u32>,
        /// Host slots kept for the user's calls, which no other user's call takes (default: scheduler.admin_reserved for an admin, else scheduler.default_reserved)
        #[arg(long)]
        reserved: Option<u32>,
        /// Make the user an administrator
        #[arg(long)]
        admin: bool,
    },
    /// List users
    #[command(after_help = "Example:\n  hyperfuncd user ls")]
    Ls {
        /// Output format: a table for people, or JSON for scripts
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Remove a user (who owns no functions)
    #[command(after_help = "Example:\n  hyperfuncd user rm bob")]
    Rm {
        /// The user to remove
        name: String,
    },
    /// Change a user's quota, budgets or key
    #[command(
        after_help = "Example:\n  hyperfuncd user update bob --rotate-key | tail -1\n  hyperfuncd user update bob --max-queued 500 --max-queued-bytes 100m --rate 20\n  hyperfuncd user update bob --reserved 2"
    )]
    Update {
        /// The user to change
        name: String,
        /// New quota of calls running at once
        #[arg(long)]
        max_concurrency: Option<u32>,
        /// Calls accepted and not yet started; past it calls get 429 (default: scheduler.default_max_queued)
        #[arg(long)]
        max_queued: Option<u64>,
        /// Payload bytes of those calls, e.g. 1g (default: scheduler.default_max_queued_bytes)
        #[arg(long, value_parser = parse_bytes)]
        max_queued_bytes: Option<u64>,
        /// Functions the user may own (default: scheduler.default_max_functions)
        #[arg(long)]
        max_functions: Option<u32>,
        /// Requests per second per API key and per call URL (default: scheduler.default_rate)
        #[arg(long)]
        rate: Option<u32>,
        /// Host slots kept for the user's calls, which no other user's call takes (default: scheduler.admin_reserved for an admin, else scheduler.default_reserved)
        #[arg(long)]
        reserved: Option<u32>,
        /// Issue a new key (printed alone on the last line); the old one stops working
        #[arg(long)]
        rotate_key: bool,
    },
}

/// Runs a remote command.
pub async fn run_remote(before: RemoteFlags, command: Command) -> anyhow::Result<()> {
    let flags = match &command {
        Command::Func(a) => a.client.0.clone().or(before),
        Command::User(a) => a.client.0.clone().or(before),
        Command::Registry(a) => a.client.0.clone().or(before),
        Command::Image(a) => a.client.0.clone().or(before),
        _ => before,
    };
    let given = Profile {
        endpoint: flags.endpoint,
        key: flags.key,
        ca: flags.ca,
    };
    let profile = profile::resolve(given, flags.profile)?;
    let client = Client::new(&profile)?;
    let mut out = std::io::stdout().lock();
    match command {
        Command::Serve(_) | Command::Bench(_) | Command::Completions(_) | Command::Man(_) => {
            bail!("not a remote command")
        }
        Command::Func(a) => func(&client, a.cmd, &mut out).await,
        Command::User(a) => user(&client, a.cmd, &mut out).await,
        Command::Registry(a) => registry(&client, a.cmd, &mut out).await,
        Command::Image(a) => image(&client, a.cmd, &mut out).await,
    }
}

/// A webhook signing secret the answer carries (made by this create or
/// update), on a line of its own: the only time it is shown.
fn print_secret(f: &FunctionView, out: &mut impl Write) -> anyhow::Result<()> {
    if let Some(secret) = &f.webhook_secret {
        writeln!(out, "WebhookSecret: {secret}")?;
        writeln!(
            out,
            "(shown only now: keep it where the receiver can read it)"
        )?;
    }
    Ok(())
}

async fn func(client: &Client, cmd: FuncCmd, out: &mut impl Write) -> anyhow::Result<()> {
    match cmd {
        FuncCmd::Create {
            name,
            env,
            env_file,
            timeout,
            memory,
            cpus,
            runtime,
            webhook,
            webhook_on,
            schedule,
            image,
            command,
        } => {
            let schedule = schedule.body()?;
            if schedule.as_ref().is_some_and(|s| s.expression.is_none()) {
                anyhow::bail!("--schedule-payload and --timezone need --schedule");
            }
            let body = FunctionCreate {
                name,
                image,
                command,
                env: collect_env(env, &env_file)?,
                timeout,
                memory,
                cpus,
                runtime,
                webhook,
                webhook_on,
                schedule,
            };
            // The server answers once it has the image, pulling it first
            // if the Engine lacks it: on a terminal, say so while it works.
            let f = put_function(
                client,
                reqwest::Method::POST,
                "/v1/functions",
                &body,
                format!("creating {}", body.name),
                format!("pulling/checking image {}", body.image),
            )
            .await?;
            writeln!(
                out,
                "{} is created with the address of {}",
                f.name, f.address
            )?;
            print_secret(&f, out)?;
        }
        FuncCmd::Update {
            name,
            env,
            env_file,
            unset_env,
            timeout,
            memory,
            cpus,
            runtime,
            schedule,
            no_schedule,
            image,
            refresh,
            pull,
            webhook,
            webhook_on,
            no_webhook,
            rotate_webhook_secret,
            command,
        } => {
            let body = FunctionPatch {
                webhook,
                webhook_on,
                no_webhook,
                rotate_webhook_secret,
                schedule: schedule.body()?,
                no_schedule,
                image,
                command: (!command.is_empty()).then_some(command),
                env: collect_env(env, &env_file)?,
                unset_env,
                timeout,
                memory,
                cpus,
                runtime,
                refresh,
                pull,
            };
            let path = fn_path(&fn_arg(&name)?, "", &[]);
            // The digest it ran before, to say what an image change did.
            let before = if body.image.is_some() || pull {
                let f: FunctionView = client.get_json(&path).await?;
                Some(f.image_digest)
            } else {
                None
            };
            // As at create: the server checks (and may pull) the image,
            // the new one or the function's own.
            let waits_for = match &body.image {
                Some(image) => format!("pulling/checking image {image}"),
                None => "checking its image".to_string(),
            };
            let f = put_function(
                client,
                reqwest::Method::PATCH,
                &path,
                &body,
                format!("updating {name}"),
                waits_for,
            )
            .await?;
            writeln!(
                out,
                "{} is updated with the address of {}",
                f.name, f.address
            )?;
            print_secret(&f, out)?;
            if let Some(before) = before {
                let shown = |d: &Option<String>| d.clone().unwrap_or_else(|| "(not pinned)".into());
                if before == f.image_digest {
                    writeln!(out, "image digest unchanged: {}", shown(&f.image_digest))?;
                } else {
                    writeln!(
                        out,
                        "image digest: {} -> {}",
                        shown(&before),
                        shown(&f.image_digest)
                    )?;
                }
            }
        }
        FuncCmd::Redeliver { call_id } => {
            let id = crate::model::CallId::parse(call_id.trim())?;
            let d: DeliveryView = client
                .post_json(&format!("/v1/calls/{id}/redeliver"), &serde_json::json!({}))
                .await?;
            writeln!(out, "webhook of call {id} queued again for {}", d.url)?;
        }
        FuncCmd::Ls { output } => {
            let list: Vec<FunctionView> = client.get_json("/v1/functions").await?;
            if output == Format::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                let rows = list
                    .iter()
                    .map(|f| {
                        vec![
                            f.name.clone(),
                            f.owner.clone(),
                            f.image.clone(),
                            f.command.join(" "),
                            f.timeout.clone().unwrap_or_else(|| "-".into()),
                            f.schedule
                                .as_ref()
                                .map(|s| s.expression.clone())
                                .unwrap_or_else(|| "-".into()),
                            f.created.clone(),
                        ]
                    })
                    .collect();
                table(
                    out,
                    &[
                        "NAME", "OWNER", "IMAGE", "COMMAND", "TIMEOUT", "SCHEDULE", "CREATED",
                    ],
                    rows,
                )?;
            }
        }
        FuncCmd::Inspect { names } => {
            let mut all = Vec::new();
            let targets = names
                .iter()
                .map(|n| fn_arg(n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            for t in &targets {
                let f: serde_json::Value = client.get_json(&fn_path(t, "", &[])).await?;
                all.push(f);
            }
            let value = if all.len() == 1 {
                all.remove(0)
            } else {
                serde_json::Value::Array(all)
            };
            writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        }
        FuncCmd::Rm { force, names } => {
            // All checked before the first removal.
            let targets = names
                .iter()
                .map(|n| fn_arg(n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            for (n, t) in names.iter().zip(&targets) {
                let q = if force {
                    vec!["force=true".to_string()]
                } else {
                    vec![]
                };
                client.delete(&fn_path(t, "", &q)).await?;
                writeln!(out, "{n}")?;
            }
        }
        FuncCmd::Call {
            sync,
            idempotency_key,
            name,
        } => {
            let key = idempotency_key
                .as_deref()
                .map(crate::model::IdempotencyKey::parse)
                .transpose()?;
            let payload = read_stdin_payload()?;
            // On a terminal, --sync is an accept and then `func get --wait`,
            // whose spinner shows the call's state; a single `?sync=true`
            // request would tell nothing until the call has ended.
            let one_request = sync && !std::io::stderr().is_terminal();
            let q = if one_request {
                vec!["sync=true".to_string()]
            } else {
                vec![]
            };
            let path = fn_path(&fn_arg(&name)?, "/call", &q);
            let resp = client.post_call(&path, payload, key.as_ref()).await?;
            if one_request {
                let bytes = client::output_bytes(resp).await?;
                out.write_all(&bytes)?;
            } else {
                let a: CallAccepted = client::json(resp).await?;
                if sync {
                    let bytes = client.output(&a.call_id, true).await?;
                    out.write_all(&bytes)?;
                } else {
                    writeln!(out, "CallId: {}", a.call_id)?;
                }
            }
        }
        FuncCmd::Get { wait, call_id } => {
            url_call_id(&call_id)?;
            let bytes = client.output(&call_id, wait).await?;
            out.write_all(&bytes)?;
        }
        FuncCmd::Logs {
            tail,
            follow,
            callid,
            output,
            name,
        } => {
            let mut q = vec![];
            if let Some(t) = tail {
                q.push(format!("tail={t}"));
            }
            if follow {
                q.push("follow=1".into());
            }
            if let Some(c) = &callid {
                q.push(format!("callid={}", url_call_id(c)?));
            }
            let target = fn_arg(&name)?;
            let mut path = fn_path(&target, "/logs", &q);
            // The server ends a follow after its `[http] max_wait`; go on
            // from the last event seen, so nothing is shown twice or missed.
            loop {
                let mut last_seq = None;
                let headers = client
                    .stream_lines(&path, |line| {
                        let ev: EventView =
                            serde_json::from_str(line).context("invalid log line from server")?;
                        last_seq = Some(ev.seq);
                        if output == Format::Json {
                            writeln!(out, "{line}")?;
                        } else {
                            writeln!(out, "{}", ev.line())?;
                        }
                        out.flush()?;
                        Ok(())
                    })
                    .await?;
                if !follow {
                    break;
                }
                // Ended because the function went away: so does the follow.
                let status = fn_path(&target, "/status", &[]);
                if client.get_json::<StatusView>(&status).await.is_err() {
                    break;
                }
                let Some(after) = last_seq.or_else(|| {
                    headers
                        .get(crate::api::LOG_SEQ_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                }) else {
                    // A server that does not end follows by itself ended
                    // this one for good (the function went away).
                    break;
                };
                let mut q = vec!["follow=1".to_string(), format!("after={after}")];
                if let Some(c) = &callid {
                    q.push(format!("callid={}", url_call_id(c)?));
                }
                path = fn_path(&target, "/logs", &q);
            }
        }
        FuncCmd::Calls {
            state,
            since,
            until,
            limit,
            output,
            name,
        } => {
            let target = fn_arg(&name)?;
            let calls = call_history(client, &target, &state, since, until, limit).await?;
            if output == Format::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&calls)?)?;
            } else {
                let now = std::time::SystemTime::now();
                let rows = calls
                    .iter()
                    .map(|c| {
                        vec![
                            c.call_id.clone(),
                            c.state.clone(),
                            ago(now, &c.created),
                            c.duration_ms.map(duration_text).unwrap_or_default(),
                            c.exit_code.map(|e| e.to_string()).unwrap_or_default(),
                            c.message.as_deref().map(one_line).unwrap_or_default(),
                        ]
                    })
                    .collect();
                table(
                    out,
                    &[
                        "CALL ID", "STATE", "ACCEPTED", "DURATION", "EXIT", "MESSAGE",
                    ],
                    rows,
                )?;
            }
        }
        FuncCmd::Status { output, name } => {
            let s: StatusView = client
                .get_json(&fn_path(&fn_arg(&name)?, "/status", &[]))
                .await?;
            if output == Format::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
            } else {
                let row =
                    [s.total, s.pending, s.running, s.finished, s.failed].map(|n| n.to_string());
                table(
                    out,
                    &["TOTAL", "PENDING", "RUNNING", "FINISHED", "FAILED"],
                    vec![row.to_vec()],
                )?;
            }
        }
    }
    Ok(())
}

async fn registry(client: &Client, cmd: RegistryCmd, out: &mut impl Write) -> anyhow::Result<()> {
    match cmd {
        RegistryCmd::Login { host, username, .. } => {
            let host_path = registry_host(&host)?;
            let mut password = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(std::io::stdin().take(8192)),
                &mut password,
            )
            .context("reading the password from STDIN")?;
            let password = password.trim_end_matches(['\r', '\n']).to_string();
            if password.is_empty() {
                anyhow::bail!("no password on STDIN (pipe it in: ... | hyperfuncd registry login HOST --username U --password-stdin)");
            }
            let l: RegistryLoginView = client
                .put_json(
                    &format!("/v1/registries/{host_path}"),
                    &RegistryLoginBody { username, password },
                )
                .await?;
            writeln!(out, "logged in to {} as {}", l.host, l.username)?;
        }
        RegistryCmd::Logout { host } => {
            client
                .delete(&format!("/v1/registries/{}", registry_host(&host)?))
                .await?;
            writeln!(out, "{host}")?;
        }
        RegistryCmd::Ls { output } => {
            let logins: Vec<RegistryLoginView> = client.get_json("/v1/registries").await?;
            if output == Format::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&logins)?)?;
            } else {
                let rows = logins
                    .iter()
                    .map(|l| vec![l.host.clone(), l.username.clone(), l.created.clone()])
                    .collect();
                table(out, &["HOST", "USERNAME", "CREATED"], rows)?;
            }
        }
    }
    Ok(())
}

async fn image(client: &Client, cmd: ImageCmd, out: &mut impl Write) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::Ls { output } => {
            let images: Vec<ImageView> = client.get_json("/v1/images").await?;
            if output == Format::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&images)?)?;
            } else {
                let rows = images
                    .iter()
                    .map(|i| {
                        vec![
                            i.reference.clone(),
                            i.id.clone().unwrap_or_else(|| "(missing)".into()),
                            i.size_bytes
                                .map_or_else(|| "-".into(), crate::model::human_bytes),
                            if i.pulled { "yes" } else { "no" }.into(),
                            i.functions.join(","),
                        ]
                    })
                    .collect();
                table(out, &["IMAGE", "ID", "SIZE", "PULLED", "FUNCTIONS"], rows)?;
            }
        }
    }
    Ok(())
}

/// A registry host checked (and normalised) before it goes into a URL.
fn registry_host(host: &str) -> anyhow::Result<String> {
    crate::model::parse_registry_host(host).map_err(|e| anyhow::anyhow!(e))
}

async fn user(client: &Client, cmd: UserCmd, out: &mut impl Write) -> anyhow::Result<()> {
    match cmd {
        UserCmd::Add {
            name,
            max_concurrency,
            max_queued,
            max_queued_bytes,
            max_functions,
            rate,
            reserved,
            admin,
        } => {
            let u: UserView = client
                .post_json(
                    "/v1/users",
                    &UserCreate {
                        name,
                        max_concurrency,
                        max_queued,
                        max_queued_bytes,
                        max_functions,
                        rate,
                        reserved,
                        admin,
                    },
                )
                .await?;
            writeln!(
                out,
                "user {} created (max concurrency {}); its key, shown only this once:",
                u.name, u.max_concurrency
            )?;
            writeln!(out, "{}", u.key.unwrap_or_default())?;
        }
        UserCmd::Ls { output } => {
            let users: Vec<UserView> = client.get_json("/v1/users").await?;
            if output == Format::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&users)?)?;
            } else {
                let rows = users
                    .iter()
                    .map(|u| {
                        vec![
                            u.name.clone(),
                            u.max_concurrency.to_string(),
                            u.max_queued.to_string(),
                            u.max_queued_bytes.to_string(),
                            u.max_functions.to_string(),
                            u.rate.to_string(),
                            u.reserved.to_string(),
                            u.admin.to_string(),
                            u.created.clone(),
                        ]
                    })
                    .collect();
                table(
                    out,
                    &[
                        "NAME",
                        "MAX_CONCURRENCY",
                        "MAX_QUEUED",
                        "MAX_QUEUED_BYTES",
                        "MAX_FUNCTIONS",
                        "RATE",
                        "RESERVED",
                        "ADMIN",
                        "CREATED",
                    ],
                    rows,
                )?;
            }
        }
        UserCmd::Rm { name } => {
            client
                .delete(&format!("/v1/users/{}", url_name(&name)?))
                .await?;
            writeln!(out, "{name}")?;
        }
        UserCmd::Update {
            name,
            max_concurrency,
            max_queued,
            max_queued_bytes,
            max_functions,
            rate,
            reserved,
            rotate_key,
        } => {
            let u: UserView = client
                .patch_json(
                    &format!("/v1/users/{}", url_name(&name)?),
                    &UserPatch {
                        max_concurrency,
                        max_queued,
                        max_queued_bytes,
                        max_functions,
                        rate,
                        reserved,
                        rotate_key,
                    },
                )
                .await?;
            writeln!(
                out,
                "user {} updated (max concurrency {})",
                u.name, u.max_concurrency
            )?;
            if let Some(k) = u.key {
                writeln!(out, "its new key, shown only this once:")?;
                writeln!(out, "{k}")?;
            }
        }
    }
    Ok(())
}

/// `name` checked before it goes into a URL path: URL parsing resolves dot
/// segments, so `func rm ../users/bob` would otherwise send
/// `DELETE /v1/users/bob`.
fn url_name(name: &str) -> anyhow::Result<&str> {
    crate::model::Name::parse(name)?;
    Ok(name)
}

/// A function named on the command line: `NAME` (the caller's own) or
/// `OWNER/NAME` (an admin's way to reach another user's), both parts
/// checked like `url_name` before any URL is built.
#[derive(Debug, PartialEq)]
struct FnArg {
    name: String,
    owner: Option<String>,
}

fn fn_arg(s: &str) -> anyhow::Result<FnArg> {
    let (owner, name) = match s.split_once('/') {
        Some((o, n)) => (Some(url_name(o)?.to_string()), n),
        None => (None, s),
    };
    Ok(FnArg {
        name: url_name(name)?.to_string(),
        owner,
    })
}

/// `/v1/functions/NAME{rest}?{query}`, with `owner=` when one was named.
fn fn_path(f: &FnArg, rest: &str, query: &[String]) -> String {
    let mut q: Vec<String> = query.to_vec();
    if let Some(o) = &f.owner {
        q.push(format!("owner={o}"));
    }
    let q = if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    };
    format!("/v1/functions/{}{rest}{q}", f.name)
}

/// A call id checked before it goes into a URL. The server would answer 404
/// for it, so the error says the same.
fn url_call_id(id: &str) -> anyhow::Result<&str> {
    match crate::model::CallId::parse(id) {
        Ok(_) => Ok(id),
        Err(_) => bail!(
            "call {:?} not found: not a call id",
            id.chars().take(80).collect::<String>()
        ),
    }
}

/// The call payload: STDIN when it is piped or redirected, else nothing.
fn read_stdin_payload() -> anyhow::Result<Vec<u8>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(Vec::new());
    }
    let mut buf = Vec::new();
    stdin
        .lock()
        .read_to_end(&mut buf)
        .context("cannot read STDIN")?;
    Ok(buf)
}

fn collect_env(mut env: Vec<String>, files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut from_files = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read env file {}", f.display()))?;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            from_files.push(line.to_string());
        }
    }
    // Flags come last so they win over files.
    from_files.append(&mut env);
    Ok(from_files)
}

/// `123`, `256k`, `256m`, `1g` (binary multiples).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (num, mult) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}: use bytes or a k/m/g suffix"))
}

/// Up to `limit` of a function's calls, newest first, following the
/// server's cursor page by page.
async fn call_history(
    client: &Client,
    target: &FnArg,
    states: &[String],
    since: Option<String>,
    until: Option<String>,
    limit: usize,
) -> anyhow::Result<Vec<CallView>> {
    let enc = |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
    let mut q = vec![];
    if !states.is_empty() {
        q.push(format!("state={}", enc(&states.join(","))));
    }
    if let Some(s) = &since {
        q.push(format!("since={}", enc(s)));
    }
    if let Some(u) = &until {
        q.push(format!("until={}", enc(u)));
    }
    let mut calls = Vec::new();
    let mut cursor: Option<String> = None;
    while calls.len() < limit {
        let mut page_q = q.clone();
        let want = (limit - calls.len()).min(crate::api::CALLS_LIMIT_MAX);
        page_q.push(format!("limit={want}"));
        if let Some(c) = &cursor {
            page_q.push(format!("cursor={}", enc(c)));
        }
        let page: CallPageView = client.get_json(&fn_path(target, "/calls", &page_q)).await?;
        calls.extend(page.calls);
        match page.cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    calls.truncate(limit);
    Ok(calls)
}

/// "12s ago", "5m ago", "3h ago", "2d ago", as `docker ps` shows times.
fn ago(now: std::time::SystemTime, rfc3339: &str) -> String {
    let Ok(t) = humantime::parse_rfc3339(rfc3339) else {
        return rfc3339.to_string();
    };
    let s = now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0);
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// "340ms", "2.5s", "3m12s".
fn duration_text(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => format!("{}m{}s", ms / 60_000, ms % 60_000 / 1000),
    }
}

/// A message on one table line, at most 60 characters.
fn one_line(m: &str) -> String {
    let flat: String = m
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > 60 {
        format!("{}…", flat.chars().take(59).collect::<String>())
    } else {
        flat
    }
}

fn table(out: &mut impl Write, header: &[&str], rows: Vec<Vec<String>>) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        cells
            .into_iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i + 1 == n {
                    c.to_string()
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("   ")
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for r in &rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// `func create` / `func update`: the server answers once it has the image,
/// pulling it first if the Engine lacks it. On a terminal a spinner says what
/// the request (`what`) waits for (`waits_for`) until the server reports a
/// pull; then the pull's progress is drawn (`progress::Pulling`). Off a
/// terminal the request is the plain one and nothing is shown.
async fn put_function<B: serde::Serialize>(
    client: &Client,
    method: reqwest::Method,
    path: &str,
    body: &B,
    what: String,
    waits_for: String,
) -> anyhow::Result<FunctionView> {
    if !std::io::stderr().is_terminal() {
        return client.put_function(method, path, body, None).await;
    }
    let mut pending = Some(progress::Pending::start(format!("{what}: {waits_for}")));
    let mut pulling: Option<progress::Pulling> = None;
    let mut on_pull = |l: &PullLine| {
        if let Some(start) = &l.pull {
            pending = None;
            pulling = Some(progress::Pulling::start(what.clone(), start.image.clone()));
        }
        if let (Some(p), Some(layer)) = (pulling.as_mut(), &l.progress) {
            p.layer(layer);
        }
    };
    let f = client
        .put_function(method, path, body, Some(&mut on_pull))
        .await?;
    drop(pending);
    if let Some(p) = pulling {
        p.done();
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("256m"), Ok(256 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn function_names_with_an_owner() {
        let own = fn_arg("resize").unwrap();
        assert_eq!(fn_path(&own, "/status", &[]), "/v1/functions/resize/status");
        let bobs = fn_arg("bob/resize").unwrap();
        assert_eq!(bobs.owner.as_deref(), Some("bob"));
        assert_eq!(
            fn_path(&bobs, "/call", &["sync=true".into()]),
            "/v1/functions/resize/call?sync=true&owner=bob"
        );
        assert_eq!(fn_path(&bobs, "", &[]), "/v1/functions/resize?owner=bob");
        for bad in [
            "../users/bob",
            "bob/../x",
            "bob/",
            "/x",
            "a/b/c",
            "Bob/x",
            "b%2fx",
        ] {
            assert!(fn_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_parses_the_contract() {
        Cli::command_for_test().debug_assert();
        let c = Cli::try_parse_from([
            "hyperfuncd",
            "func",
            "create",
            "--name",
            "h",
            "-e",
            "A=1",
            "img",
            "echo",
            "-n",
            "x",
        ])
        .unwrap();
        match c.command {
            Command::Func(a) => match a.cmd {
                FuncCmd::Create { command, env, .. } => {
                    assert_eq!(command, vec!["echo", "-n", "x"]);
                    assert_eq!(env, vec!["A=1"]);
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    /// Client flags are taken before the subcommand and anywhere after
    /// `func`/`user`; the later one wins.
    #[test]
    fn client_flags_where_they_apply() {
        for argv in [
            &["hyperfuncd", "--endpoint", "https://a", "func", "ls"][..],
            &["hyperfuncd", "func", "--endpoint", "https://a", "ls"],
            &["hyperfuncd", "func", "ls", "--endpoint", "https://a"],
            &[
                "hyperfuncd",
                "--endpoint",
                "https://b",
                "func",
                "ls",
                "--endpoint",
                "https://a",
            ],
        ] {
            let c = Cli::try_parse_from(argv).unwrap();
            let Command::Func(a) = &c.command else {
                panic!("{argv:?}: {c:?}")
            };
            let flags = a.client.0.clone().or(c.remote.clone());
            assert_eq!(flags.endpoint.as_deref(), Some("https://a"), "{argv:?}");
        }
        let c = Cli::try_parse_from(["hyperfuncd", "user", "ls", "--key", "k"]).unwrap();
        let Command::User(a) = &c.command else {
            panic!("{c:?}")
        };
        assert_eq!(a.client.0.key.as_deref(), Some("k"));
        // Not a client: refused, before or after the subcommand.
        for argv in [
            &["hyperfuncd", "serve", "--endpoint", "https://a"][..],
            &["hyperfuncd", "--key", "k", "serve"],
            &["hyperfuncd", "--ca", "x.pem", "completions", "bash"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
        let ids: Vec<String> = RemoteFlags::augment_args(clap::Command::new("x"))
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        assert_eq!(ids, REMOTE_FLAG_IDS);
    }

    impl Cli {
        fn command_for_test() -> clap::Command {
            <Cli as clap::CommandFactory>::command()
        }
    }
}
