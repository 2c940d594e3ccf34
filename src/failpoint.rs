//! Crash points for the kill -9 tests. With the `failpoints` feature (tests
//! only, never a release build), `crash_point!("name")` consults the fail
//! crate (configured by the `FAILPOINTS` env of `serve`); if the point is
//! set to `return`, the process kills itself with SIGKILL right there, as a
//! kill -9 landing at exactly that step would. Without the feature it
//! compiles to nothing. `io_fault!("name")` makes a file operation fail
//! with a chosen errno instead (the disk-fault tests).

/// Kills the process with SIGKILL if the named failpoint is set to `return`.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            if fail::eval($name, |_| ()).is_some() {
                $crate::failpoint::die($name);
            }
        }
    };
}

/// Returns an I/O error from the enclosing function if the named failpoint
/// is set to `return(ERRNO)` (`ENOSPC`, `EIO`, `EMFILE`, `EINTR`, ...; `EIO`
/// when none is given): the fault tests' way to make one file operation of
/// the daemon fail as a sick disk would. The enclosing function returns a
/// `Result` whose error converts from `std::io::Error`. Without the feature
/// it compiles to nothing.
#[macro_export]
macro_rules! io_fault {
    ($name:literal) => {{
        #[cfg(feature = "failpoints")]
        {
            if let Some(e) = $crate::failpoint::io_error($name) {
                return Err(::std::convert::From::from(e));
            }
        }
    }};
}

/// The error `io_fault!` returns at `name`, if it is armed.
#[cfg(feature = "failpoints")]
pub fn io_error(name: &str) -> Option<std::io::Error> {
    fail::eval(name, |arg| {
        let errno = match arg.as_deref().map(str::trim) {
            Some("ENOSPC") => libc::ENOSPC,
            Some("EDQUOT") => libc::EDQUOT,
            Some("EMFILE") => libc::EMFILE,
            Some("ENFILE") => libc::ENFILE,
            Some("EINTR") => libc::EINTR,
            Some("EAGAIN") => libc::EAGAIN,
            Some("ENOENT") => libc::ENOENT,
            _ => libc::EIO,
        };
        eprintln!("failpoint {name} reached: errno {errno}");
        std::io::Error::from_raw_os_error(errno)
    })
}

/// Fails the enclosing store step with `StoreError::Unavailable` (as a
/// NATS outage would) each time it runs while the named failpoint is set
/// to `return`: the fault tests' way to reach the give-up of a retried write.
#[macro_export]
macro_rules! fault_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            if fail::eval($name, |_| ()).is_some() {
                return Err($crate::store::StoreError::Unavailable(format!(
                    "failpoint {} injected a store error",
                    $name
                ))
                .into());
            }
        }
    };
}

/// Holds the enclosing async step while the named failpoint's action runs
/// (`sleep(MS)`, `1*sleep(MS)`): the race tests' way to keep one step
/// waiting while others go on. It waits on a blocking thread, so no runtime
/// worker is held. Without the feature it compiles to nothing.
#[macro_export]
macro_rules! hold_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            let _ = tokio::task::spawn_blocking(|| {
                if fail::eval($name, |_| ()).is_some() {
                    eprintln!("failpoint {} reached", $name);
                }
            })
            .await;
        }
    };
}

/// Reads `FAILPOINTS`; keep the value alive while the daemon runs.
#[cfg(feature = "failpoints")]
pub fn setup() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

#[cfg(feature = "failpoints")]
pub fn die(name: &str) -> ! {
    eprintln!("failpoint {name} reached: kill -9");
    // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}
