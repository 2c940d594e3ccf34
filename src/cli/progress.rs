//! What the CLI shows on a terminal while it waits for a call: a spinner
//! on stderr with the elapsed time and the call's state. Off a terminal
//! (a pipe, a file, CI) it shows nothing, so scripts read stderr as before.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// The spinner of one wait; inert when stderr is not a terminal.
pub struct Waiting {
    bar: Option<ProgressBar>,
    call_id: String,
}

impl Waiting {
    /// Starts the spinner if stderr is a terminal.
    pub fn start(call_id: &str) -> Waiting {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            // The template is a constant that parses; the fallback keeps the default.
            if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        let w = Waiting {
            bar,
            call_id: call_id.to_string(),
        };
        w.state("waiting");
        w
    }

    /// Whether anything is shown: then the caller polls often enough for
    /// the state to stay current.
    pub fn shown(&self) -> bool {
        self.bar.is_some()
    }

    /// The call's state as the server last answered it (PENDING, RUNNING).
    pub fn state(&self, state: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("call {} {state}", self.call_id));
        }
    }
}

impl Drop for Waiting {
    /// Clears the line, so the output (or the error) starts on a clean one.
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
