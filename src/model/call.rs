//! A call and its lifecycle: CALL (accepted) → PENDING → RUNNING → FINISHED | FAILED.
//! `Call::transition` is the one place a state changes; an illegal move is an error.

use super::ids::{CallId, FnKey, Name};
use serde::{Deserialize, Serialize};

/// Bytes of STDIN/STDOUT/STDERR shown in log events.
pub const SHORT_LEN: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CallState {
    /// Accepted and durable, waiting in its owner's queue.
    Pending,
    /// Handed to the Engine: a container may exist for it.
    Running,
    Finished,
    Failed,
}

impl CallState {
    pub fn is_done(self) -> bool {
        matches!(self, CallState::Finished | CallState::Failed)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            CallState::Pending => "PENDING",
            CallState::Running => "RUNNING",
            CallState::Finished => "FINISHED",
            CallState::Failed => "FAILED",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("call {id} cannot go from {from:?} to {to:?}")]
pub struct TransitionError {
    pub id: CallId,
    pub from: CallState,
    pub to: CallState,
}

/// What became of a finished call's STDOUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputState {
    /// The call has not ended yet.
    NotYet,
    /// In the function's output cache, waiting for a `get`.
    Stored,
    /// Handed out by a `get` and deleted.
    Fetched,
    /// Rotated out of the function's output cache before anyone fetched it.
    Evicted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    pub id: CallId,
    pub function: Name,
    pub owner: Name,
    /// Global acceptance order: the FIFO key in the owner's queue.
    pub seq: u64,
    pub state: CallState,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub exit_code: Option<i64>,
    /// Why a call failed, in words a user can act on.
    pub message: Option<String>,
    pub stdin_len: u64,
    pub stdout_len: u64,
    /// CGI-style variables from the request (HTTP_*, REQUEST_METHOD,
    /// QUERY_STRING), for the container only: emptied when the call ends
    /// (`transition`), since they may carry the caller's credentials and
    /// nothing reads them after the run.
    pub request_env: Vec<(String, String)>,
    pub short_stdin: Vec<u8>,
    pub short_stdout: Vec<u8>,
    pub short_stderr: Vec<u8>,
    pub output: OutputState,
    /// The image its container was made from (the function's pinned
    /// digest, `Function::image_digest`, or its tag if not pinned), set
    /// when it ends; `None` for a call that never reached the Engine and
    /// for calls stored before digests were recorded. Last, and read with
    /// `trailing`, so those records read as they are.
    #[serde(default, deserialize_with = "super::trailing")]
    pub image_digest: Option<String>,
    /// Where its end is delivered (`X-Callback-Url`, else its function's
    /// webhook when it was accepted); `None`: nowhere. After
    /// `image_digest`, read with `trailing` like it.
    #[serde(default, deserialize_with = "super::trailing")]
    pub webhook: Option<super::CallWebhook>,
}

impl Call {
    /// The key of the function it calls.
    pub fn fn_key(&self) -> FnKey {
        FnKey::new(self.owner.clone(), self.function.clone())
    }

    pub fn new(
        function: Name,
        owner: Name,
        seq: u64,
        stdin: &[u8],
        request_env: Vec<(String, String)>,
    ) -> Call {
        Call {
            id: CallId::new(),
            function,
            owner,
            seq,
            state: CallState::Pending,
            created_ms: super::now_ms(),
            started_ms: None,
            finished_ms: None,
            exit_code: None,
            message: None,
            stdin_len: stdin.len() as u64,
            stdout_len: 0,
            request_env,
            short_stdin: short(stdin),
            short_stdout: Vec::new(),
            short_stderr: Vec::new(),
            output: OutputState::NotYet,
            image_digest: None,
            webhook: None,
        }
    }

    /// Moves the call to `to`. Legal moves: PENDING→RUNNING, RUNNING→PENDING (the
    /// Engine refused before any container existed), and any live state → FINISHED|FAILED.
    /// An ended call drops its request variables here, where every store
    /// backend's end of a call passes, so no backend keeps them.
    pub fn transition(&mut self, to: CallState) -> Result<(), TransitionError> {
        use CallState::*;
        let legal = matches!(
            (self.state, to),
            (Pending, Running)
                | (Running, Pending)
                | (Running, Finished)
                | (Running, Failed)
                | (Pending, Failed)
        );
        if !legal {
            return Err(TransitionError {
                id: self.id,
                from: self.state,
                to,
            });
        }
        let now = super::now_ms();
        match to {
            Running => self.started_ms = Some(now),
            Pending => self.started_ms = None,
            Finished | Failed => {
                self.finished_ms = Some(now);
                self.request_env = Vec::new();
            }
        }
        self.state = to;
        Ok(())
    }

    /// Ends the call with `outcome`.
    pub fn finish(&mut self, outcome: &Outcome) -> Result<(), TransitionError> {
        self.transition(outcome.state)?;
        self.exit_code = outcome.exit_code;
        self.message = outcome.message.clone();
        self.stdout_len = outcome.stdout.len() as u64;
        self.short_stdout = short(&outcome.stdout);
        self.short_stderr = short(&outcome.stderr);
        if outcome.image_digest.is_some() {
            self.image_digest = outcome.image_digest.clone();
        }
        // Only a FINISHED call has an output to fetch; a FAILED one has a reason.
        self.output = if outcome.state == CallState::Finished {
            OutputState::Stored
        } else {
            OutputState::NotYet
        };
        Ok(())
    }

    /// The log event for the call's current state.
    pub fn event(&self, kind: EventKind) -> Event {
        let (short_stdout, short_stderr) = match kind {
            EventKind::Finished | EventKind::Failed => {
                (lossy(&self.short_stdout), lossy(&self.short_stderr))
            }
            _ => (String::new(), String::new()),
        };
        Event {
            time_ms: super::now_ms(),
            kind,
            call_id: self.id,
            short_stdin: if kind == EventKind::Call {
                lossy(&self.short_stdin)
            } else {
                String::new()
            },
            short_stdout,
            short_stderr,
            // A CALL event's message says which schedule's tick made the
            // call (`Schedule::tick_message`); other accepts have none.
            message: if matches!(kind, EventKind::Failed | EventKind::Call) {
                self.message.clone().unwrap_or_default()
            } else {
                String::new()
            },
            image_digest: if kind.is_end() {
                self.image_digest.clone()
            } else {
                None
            },
        }
    }
}

/// How a call ended, as the runtime saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub state: CallState,
    pub exit_code: Option<i64>,
    pub message: Option<String>,
    pub stdout: bytes::Bytes,
    pub stderr: bytes::Bytes,
    /// The image it ran (`Call::image_digest`); `None` leaves the call's as it is.
    pub image_digest: Option<String>,
}

impl Outcome {
    pub fn failed(message: impl Into<String>) -> Outcome {
        Outcome {
            state: CallState::Failed,
            exit_code: None,
            message: Some(message.into()),
            stdout: bytes::Bytes::new(),
            stderr: bytes::Bytes::new(),
            image_digest: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Call,
    Pending,
    Running,
    Finished,
    Failed,
    /// A completion webhook was delivered or given up (`Delivery::event`).
    Webhook,
}

impl EventKind {
    /// FINISHED or FAILED.
    pub fn is_end(self) -> bool {
        matches!(self, EventKind::Finished | EventKind::Failed)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Call => "CALL",
            EventKind::Pending => "PENDING",
            EventKind::Running => "RUNNING",
            EventKind::Finished => "FINISHED",
            EventKind::Failed => "FAILED",
            EventKind::Webhook => "WEBHOOK",
        }
    }
}

/// One line of a function's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub time_ms: u64,
    pub kind: EventKind,
    pub call_id: CallId,
    pub short_stdin: String,
    pub short_stdout: String,
    pub short_stderr: String,
    pub message: String,
    /// On a FINISHED or FAILED event: the image the call ran
    /// (`Call::image_digest`). Last, and read with `trailing`, so events
    /// stored before it read as they are.
    #[serde(default, deserialize_with = "super::trailing")]
    pub image_digest: Option<String>,
}

fn short(b: &[u8]) -> Vec<u8> {
    b[..b.len().min(SHORT_LEN)].to_vec()
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> Call {
        let n = Name::parse("f").unwrap();
        Call::new(n.clone(), n, 1, &[b'x'; 300], vec![])
    }

    #[test]
    fn records_written_before_the_digest_read_without_it() {
        use bincode::Options;
        let strict = || {
            bincode::DefaultOptions::new()
                .with_fixint_encoding()
                .with_big_endian()
        };
        let mut c = call();
        c.image_digest = Some("reg/app@sha256:ab".into());
        let new = strict().serialize(&c).unwrap();
        // An older record is this one minus its trailing field.
        let mut old_call = c.clone();
        old_call.image_digest = None;
        let none = strict().serialize(&old_call).unwrap();
        let old = &none[..none.len() - 1];
        let read: Call = strict().deserialize(old).unwrap();
        assert_eq!(read, old_call);
        assert_eq!(strict().deserialize::<Call>(&new).unwrap(), c);
        // Bytes after the field are still refused by sled's codec.
        let mut longer = new.clone();
        longer.push(0);
        assert!(strict().deserialize::<Call>(&longer).is_err());
        // The NATS store's plain bincode reads both too.
        let plain: Call =
            bincode::deserialize(&bincode::serialize(&old_call).unwrap()[..]).unwrap();
        assert_eq!(plain, old_call);
        let legacy = bincode::serialize(&old_call).unwrap();
        let read: Call = bincode::deserialize(&legacy[..legacy.len() - 1]).unwrap();
        assert_eq!(read, old_call);
    }

    #[test]
    fn lifecycle() {
        let mut c = call();
        assert_eq!(c.short_stdin.len(), SHORT_LEN);
        assert!(c.transition(CallState::Finished).is_err());
        c.transition(CallState::Running).unwrap();
        assert!(c.started_ms.is_some());
        c.finish(&Outcome::failed("boom")).unwrap();
        assert_eq!(c.state, CallState::Failed);
        assert_eq!(c.output, OutputState::NotYet);
        assert!(c.transition(CallState::Running).is_err());
        assert_eq!(c.event(EventKind::Failed).message, "boom");
    }

    #[test]
    fn request_variables_are_dropped_when_the_call_ends_and_not_before() {
        let n = Name::parse("f").unwrap();
        let env = vec![(
            "HTTP_AUTHORIZATION".to_string(),
            "Basic c2VjcmV0".to_string(),
        )];
        let ends: [fn(&mut Call); 3] = [
            |c| c.finish(&Outcome::failed("boom")).unwrap(),
            |c| {
                let mut done = Outcome::failed("");
                done.state = CallState::Finished;
                done.message = None;
                c.finish(&done).unwrap()
            },
            |c| c.transition(CallState::Failed).unwrap(),
        ];
        for (i, end) in ends.iter().enumerate() {
            let mut c = Call::new(n.clone(), n.clone(), 1, b"", env.clone());
            if i < 2 {
                // Kept while the call may still run, requeues included.
                c.transition(CallState::Running).unwrap();
                c.transition(CallState::Pending).unwrap();
                assert_eq!(c.request_env, env);
                c.transition(CallState::Running).unwrap();
                assert_eq!(c.request_env, env);
            }
            end(&mut c);
            assert!(c.state.is_done());
            assert!(c.request_env.is_empty(), "case {i}: {:?}", c.request_env);
        }
        // A refused transition changes nothing.
        let mut c = Call::new(n.clone(), n, 1, b"", env.clone());
        assert!(c.transition(CallState::Finished).is_err());
        assert_eq!(c.request_env, env);
    }
}
