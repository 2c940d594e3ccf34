//! A started container's exchange: STDIN written while STDOUT/STDERR are
//! read under the cap (never stopping the read while the attach is held),
//! the wait, the exit message, the removal.

use super::*;

/// How long the output stream may stay open after the process has exited.
pub(super) const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);

/// What the output reader collected.
pub(super) struct Captured {
    stdout: BytesMut,
    stderr: BytesMut,
    exceeded: bool,
    error: Option<String>,
}

impl Captured {
    pub(super) fn broken(error: String) -> Captured {
        Captured {
            stdout: BytesMut::new(),
            stderr: BytesMut::new(),
            exceeded: false,
            error: Some(error),
        }
    }
}

/// Reads the attach stream to its end. Past the STDOUT cap it keeps draining
/// (discarding) and signals `exceeded` so the container gets killed.
pub(super) async fn read_output(
    mut output: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<LogOutput, DockerError>> + Send>,
    >,
    max_stdout: u64,
    max_stderr: u64,
    exceeded: CancellationToken,
) -> Captured {
    let mut c = Captured {
        stdout: BytesMut::new(),
        stderr: BytesMut::new(),
        exceeded: false,
        error: None,
    };
    while let Some(item) = output.next().await {
        match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                if c.exceeded {
                    continue;
                }
                if (c.stdout.len() + message.len()) as u64 > max_stdout {
                    c.exceeded = true;
                    c.stdout.clear();
                    exceeded.cancel();
                } else {
                    c.stdout.extend_from_slice(&message);
                }
            }
            Ok(LogOutput::StdErr { message }) => {
                let room = (max_stderr as usize).saturating_sub(c.stderr.len());
                c.stderr
                    .extend_from_slice(&message[..message.len().min(room)]);
            }
            Ok(LogOutput::StdIn { .. }) => {}
            Err(e) => {
                c.error = Some(format!("output stream broke: {}", engine_message(&e)));
                break;
            }
        }
    }
    c
}

/// A container body whose STDIN, STDOUT and STDERR we attach to, with STDIN
/// closed after the one attach (the DESIGN's Engine facts), no TTY.
pub(super) fn attachable() -> ContainerCreateBody {
    ContainerCreateBody {
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(true),
        stdin_once: Some(true),
        tty: Some(false),
        ..Default::default()
    }
}

/// Attaches to all three streams of `id`; a failure, or a cancellation
/// while the call waited its turn (then it never starts), is the outcome.
pub(super) async fn attach(
    docker: &Docker,
    id: &str,
    cancel: &CancellationToken,
) -> Result<AttachContainerResults, Outcome> {
    let options = AttachContainerOptions {
        stdin: true,
        stdout: true,
        stderr: true,
        stream: true,
        logs: false,
        detach_keys: None,
    };
    let attached = docker
        .attach_container(id, Some(options))
        .await
        .map_err(|e| Outcome::failed(stage_failure("attach to", &e)))?;
    if cancel.is_cancelled() {
        return Err(Outcome::failed("cancelled"));
    }
    Ok(attached)
}

pub(super) async fn remove(docker: &Docker, id: &str) {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    match docker.remove_container(id, Some(options)).await {
        Ok(())
        | Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => tracing::warn!(container = id, error = %e, "cannot remove container"),
    }
}

impl Runtime {
    pub(super) async fn drive(
        &self,
        docker: &Docker,
        id: &str,
        spec: RunSpec,
        cancel: CancellationToken,
    ) -> Outcome {
        let mut attached = match attach(docker, id, &cancel).await {
            Ok(a) => a,
            Err(failed) => return failed,
        };
        let mut started = docker.start_container(id, None).await;
        // Engine 20.10 looks the network up at start, not at create. The
        // failed start ended the attach, so a second start needs a new one.
        if matches!(&started, Err(e) if network_missing(e)) && self.ensure_network().await.is_ok() {
            drop(attached);
            attached = match attach(docker, id, &cancel).await {
                Ok(a) => a,
                Err(failed) => return failed,
            };
            started = docker.start_container(id, None).await;
        }
        tracing::debug!(call = %spec.call_id, ok = started.is_ok(), "started");
        if let Err(e) = started {
            return Outcome::failed(stage_failure("start", &e));
        }

        self.exchange(docker, id, attached, spec, cancel, Bytes::new())
            .await
    }

    /// Feeds an attached, running container its STDIN (after `frame`, which
    /// only a warm container's init reads), collects its output and waits for
    /// its end, killing it on timeout, cancellation or too much output.
    pub(super) async fn exchange(
        &self,
        docker: &Docker,
        id: &str,
        attach: AttachContainerResults,
        mut spec: RunSpec,
        cancel: CancellationToken,
        frame: Bytes,
    ) -> Outcome {
        let mut input = attach.input;
        let stdin = spec.stdin.clone();
        // A warm call starts when its frame is written; a cold one fired this at start.
        let started = spec.started.take();
        // A process may exit without reading STDIN; the writer then blocks
        // forever, so it is aborted once the container has stopped.
        let writer = tokio::spawn(async move {
            let framed = input.write_all(&frame).await.is_ok();
            if let Some(tx) = started {
                let _ = tx.send(());
            }
            if framed && input.write_all(&stdin).await.is_ok() {
                let _ = input.shutdown().await;
            }
            // Held until aborted: dropping a half could close the stream.
            std::future::pending::<()>().await;
        });

        let exceeded = CancellationToken::new();
        let reader = tokio::spawn(read_output(
            attach.output,
            spec.max_stdout,
            spec.max_stderr,
            exceeded.clone(),
        ));

        let mut wait = docker.wait_container(
            id,
            Some(WaitContainerOptions {
                condition: "not-running".into(),
            }),
        );
        let deadline = async {
            match spec.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        enum Stop {
            Exited(Option<Result<bollard::models::ContainerWaitResponse, DockerError>>),
            Timeout,
            Cancelled,
            TooMuchOutput,
        }
        let mut stop = tokio::select! {
            w = wait.next() => Stop::Exited(w),
            _ = deadline => Stop::Timeout,
            _ = cancel.cancelled() => Stop::Cancelled,
            _ = exceeded.cancelled() => Stop::TooMuchOutput,
        };
        let exit = match stop {
            Stop::Exited(ref mut w) => w.take(),
            _ => {
                // Keep reading while the kill lands: an unread attach hangs the Engine.
                let _ = docker
                    .kill_container(
                        id,
                        Some(KillContainerOptions {
                            signal: "KILL".into(),
                        }),
                    )
                    .await;
                tokio::time::timeout(Duration::from_secs(30), wait.next())
                    .await
                    .ok()
                    .flatten()
            }
        };
        writer.abort();
        let output = match tokio::time::timeout(DRAIN_AFTER_EXIT, reader).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => Captured::broken(format!("output reader failed: {e}")),
            Err(_) => {
                Captured::broken("the output stream did not end after the process exited".into())
            }
        };

        let code = match exit {
            Some(Ok(r)) => Some(r.status_code),
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Some(code),
            Some(Err(e)) => {
                return Outcome {
                    stdout: output.stdout.freeze(),
                    stderr: output.stderr.freeze(),
                    ..Outcome::failed(format!(
                        "lost the Docker Engine while the call ran: {}",
                        engine_message(&e)
                    ))
                }
            }
            None => None,
        };
        let message = match stop {
            Stop::Timeout => Some(format!(
                "timeout after {}",
                humantime::format_duration(spec.timeout.unwrap_or_default())
            )),
            Stop::Cancelled => Some("cancelled".to_string()),
            Stop::TooMuchOutput => {
                Some(format!("stdout exceeded {}", human_bytes(spec.max_stdout)))
            }
            Stop::Exited(_) if output.exceeded => {
                Some(format!("stdout exceeded {}", human_bytes(spec.max_stdout)))
            }
            Stop::Exited(_) => match (&output.error, code) {
                (Some(e), _) => Some(e.clone()),
                (None, Some(0)) => None,
                (None, Some(c)) => Some(self.exit_message(docker, id, c).await),
                (None, None) => {
                    Some("lost the Docker Engine while the call ran: no exit code".into())
                }
            },
        };
        Outcome {
            state: if message.is_none() {
                CallState::Finished
            } else {
                CallState::Failed
            },
            exit_code: code,
            message,
            stdout: output.stdout.freeze(),
            stderr: output.stderr.freeze(),
            // The scheduler knows which image the container was made from.
            image_digest: None,
        }
    }

    pub(super) async fn exit_message(&self, docker: &Docker, id: &str, code: i64) -> String {
        let oom = docker
            .inspect_container(id, None)
            .await
            .ok()
            .and_then(|i| i.state)
            .and_then(|s| s.oom_killed)
            .unwrap_or(false);
        if oom {
            format!("exit code {code}: killed for exceeding its memory limit")
        } else {
            format!("exit code {code}")
        }
    }
}
