//! What the CLI shows on a terminal while it waits: a spinner on stderr
//! with the elapsed time and what it waits for (a call's state, or a
//! request the server may take long to answer, like `func create` while the
//! image is pulled). Off a terminal (a pipe, a file, CI) it shows nothing,
//! so scripts read stderr as before.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// The spinner of one wait; inert when stderr is not a terminal.
pub struct Waiting {
    bar: Option<ProgressBar>,
    call_id: String,
}

/// A ticking spinner on stderr with `template` and `msg`, drawn at once,
/// if stderr is a terminal.
fn spinner(template: &str, msg: String) -> Option<ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        // The templates are constants that parse; the fallback keeps the default.
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_message(msg);
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    })
}

impl Waiting {
    /// Starts the spinner if stderr is a terminal.
    pub fn start(call_id: &str) -> Waiting {
        Waiting {
            bar: spinner(
                "{spinner} {elapsed:>4} {msg}",
                format!("call {call_id} waiting"),
            ),
            call_id: call_id.to_string(),
        }
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

/// The spinner of one request whose answer may take long: `func create` and
/// `func update` are answered once the server has the image, which it pulls
/// first if the Engine lacks it (minutes for a large one). It says what the
/// request waits for and for how long; inert when stderr is not a terminal.
pub struct Pending {
    bar: Option<ProgressBar>,
}

impl Pending {
    /// Starts the spinner with `what` (e.g. "creating resize: pulling/checking
    /// image busybox:latest") if stderr is a terminal.
    pub fn start(what: String) -> Pending {
        Pending {
            bar: spinner("{spinner} {msg}… {elapsed}", what),
        }
    }
}

impl Drop for Pending {
    /// Clears the line, so the result (or the error) starts on a clean one.
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
