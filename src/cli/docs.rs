//! Documentation generated from the command line itself, so it cannot
//! drift from it: shell completions (`hyperfuncd completions SHELL`) and
//! man pages (`hyperfuncd man DIR`), which the packages ship.

use anyhow::Context;
use clap::{Args, CommandFactory};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Directory to write the pages into (hyperfuncd.1, hyperfuncd-func.1,
    /// hyperfuncd-func-create.1, ...); created if missing
    pub dir: PathBuf,
}

/// Prints the completion script for `args.shell` on stdout.
pub fn completions(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "hyperfuncd", &mut std::io::stdout());
    Ok(())
}

/// Writes a section-1 man page for the binary and each of its subcommands.
pub fn man(args: ManArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    clap_mangen::generate_to(super::Cli::command(), &args.dir)
        .with_context(|| format!("cannot write man pages to {}", args.dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every command says what it is for, in `--help`,
    /// the man pages and the completions alike.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id != "help" && id != "version" && a.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut cmd = crate::cli::Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "hyperfuncd", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    /// Every command that does something shows an example.
    #[test]
    fn every_command_has_an_example() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let leaf = cmd.get_subcommands().next().is_none();
            let shown = cmd
                .get_after_help()
                .is_some_and(|h| h.to_string().contains("Example:"));
            // `bench` documents itself at length in the README; `help` is clap's.
            if leaf && !shown && cmd.get_name() != "bench" {
                missing.push(path.to_string());
            }
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut cmd = crate::cli::Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "hyperfuncd", &mut missing);
        assert!(
            missing.is_empty(),
            "commands without an example: {missing:?}"
        );
    }

    #[test]
    fn man_pages_for_every_command() {
        let dir = tempfile::tempdir().unwrap();
        man(ManArgs {
            dir: dir.path().to_path_buf(),
        })
        .unwrap();
        for page in [
            "hyperfuncd.1",
            "hyperfuncd-func-create.1",
            "hyperfuncd-user-add.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
            assert!(text.contains(".TH"), "{page}: {text}");
        }
    }
}
