//! What the CLI shows on a terminal while it waits: a spinner on stderr
//! with the elapsed time and what it waits for (a call's state, or a
//! request the server may take long to answer, like `func create` while the
//! image is checked), and an image pull's progress as the server streams it
//! (`Pulling`). Off a terminal (a pipe, a file, CI) it shows nothing,
//! so scripts read stderr as before.

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
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

/// An image pull's progress, drawn from the server's pull lines (`func
/// create` / `func update` on a terminal): one line with the layers done,
/// bytes downloaded of those known and the elapsed time; when the pull
/// has been answered, one line that stays, with the layers and bytes pulled.
pub struct Pulling {
    bar: ProgressBar,
    what: String,
    image: String,
    /// Layer ID → (state, bytes downloaded, size), in the order first seen.
    layers: Vec<(String, Layer)>,
}

#[derive(Default)]
struct Layer {
    status: String,
    done: u64,
    total: Option<u64>,
}

impl Layer {
    /// Downloaded (or found present) in full.
    fn downloaded(&self) -> bool {
        matches!(
            self.status.as_str(),
            "Verifying Checksum"
                | "Download complete"
                | "Extracting"
                | "Pull complete"
                | "Already exists"
        )
    }
}

impl Pulling {
    /// A pull line for `image`; `what` says what the
    /// request does ("creating resize"). Only called on a terminal.
    pub fn start(what: String, image: String) -> Pulling {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        let p = Pulling {
            bar,
            what,
            image,
            layers: Vec::new(),
        };
        p.draw();
        p
    }

    /// A layer's state, from a `Progress` line.
    pub fn layer(&mut self, p: &crate::api::types::PullProgressView) {
        let i = match self.layers.iter().position(|(id, _)| *id == p.id) {
            Some(i) => i,
            None => {
                self.layers.push((p.id.clone(), Layer::default()));
                self.layers.len() - 1
            }
        };
        let l = &mut self.layers[i].1;
        l.status = p.status.clone();
        if p.total.is_some() && p.status == "Downloading" {
            l.total = p.total;
        }
        if p.status == "Downloading" {
            l.done = p.current.unwrap_or(l.done);
        } else if l.downloaded() {
            l.done = l.total.unwrap_or(l.done);
        }
        self.draw();
    }

    /// (layers downloaded, bytes downloaded, bytes known to download).
    fn totals(&self) -> (usize, u64, u64) {
        let ls = self.layers.iter().map(|(_, l)| l);
        let done = ls.clone().filter(|l| l.downloaded()).count();
        let bytes = ls.clone().map(|l| l.done).sum();
        let total = ls.map(|l| l.total.unwrap_or(l.done)).sum();
        (done, bytes, total)
    }

    fn draw(&self) {
        let (done, bytes, total) = self.totals();
        self.bar.set_message(format!(
            "{}: pulling {}: {done}/{} layers, {}/{}",
            self.what,
            self.image,
            self.layers.len(),
            HumanBytes(bytes),
            HumanBytes(total),
        ));
    }
}

impl Pulling {
    /// The pull is over and the request answered: one line that stays.
    pub fn done(self) {
        let (done, bytes, _) = self.totals();
        let elapsed = self.bar.elapsed();
        self.bar.finish_and_clear();
        eprintln!(
            "pulled {}: {done} layer(s), {} in {:.1}s",
            self.image,
            HumanBytes(bytes),
            elapsed.as_secs_f64()
        );
    }
}

impl Drop for Pulling {
    /// Clears the bar, so an error starts on a clean line.
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
