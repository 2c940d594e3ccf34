//! The table the bench prints: one row per measured mode, ratios against
//! raw `docker run` of the same run.

use super::*;

#[derive(Default)]
pub(super) struct Row {
    pub(super) latency: Latency,
    /// Calls/s per `--concurrency` level.
    pub(super) throughput: Vec<f64>,
    /// Daemon CPU (user + system, clock ticks) and calls of the throughput runs.
    pub(super) cpu_ticks: u64,
    pub(super) finished: usize,
    /// Pooled daemon only: calls that started their own container, for the
    /// latency run then each throughput run.
    pub(super) misses: Vec<usize>,
}

/// The `--runtime` rows.
pub(super) struct RuntimeRows {
    pub(super) runtime: String,
    pub(super) raw: Latency,
    pub(super) cold: Latency,
    pub(super) warm: Latency,
    /// Warm calls that started their own container.
    pub(super) misses: usize,
}

#[derive(Default)]
pub(super) struct Report {
    pub(super) image: String,
    pub(super) engine: String,
    pub(super) raw: Row,
    pub(super) cold: Row,
    pub(super) warm: Row,
    /// The finished-calls/s rows of `--users` users sharing the host (no
    /// latency); empty throughput without them.
    pub(super) cold_users: Row,
    pub(super) warm_users: Row,
    pub(super) rss_fresh: f64,
    pub(super) rss_after: f64,
    pub(super) rss_queued: f64,
    /// (calls, calls/s) of the measured accept run.
    pub(super) accept: Option<(usize, f64)>,
    /// (calls, calls/s) of the unmeasured top-up to `--queued`.
    pub(super) topup: Option<(usize, f64)>,
    /// Pending calls when the RSS was read.
    pub(super) queued: u64,
    pub(super) force_rm: Option<Result<Duration, String>>,
    /// Containers found after each daemon stopped.
    pub(super) leftovers: Vec<(&'static str, usize)>,
    /// The sync latency rows under `--runtime`, if asked.
    pub(super) runtime: Option<RuntimeRows>,
}

impl Report {
    pub(super) fn render(&self, args: &BenchArgs) -> String {
        let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}", a / b)
            } else {
                "-".into()
            }
        };
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mut out = format!(
            "hyperfuncd bench — image {}, network {}, {} calls, pool {}, Docker Engine {}, {cpus} CPUs\n\n",
            self.image, args.network, args.calls, args.pool, self.engine
        );

        let raw_p50 = self.raw.latency.p50.as_secs_f64();
        let lat = |name: &str, r: &Row| {
            vec![
                name.to_string(),
                ms(r.latency.p50),
                ms(r.latency.p95),
                ratio(r.latency.p50.as_secs_f64(), raw_p50),
            ]
        };
        out += &section(
            &["sync latency (ms)", "p50", "p95", "p50 vs docker run"],
            vec![
                lat("docker run --rm -i", &self.raw),
                lat("hyperfuncd cold", &self.cold),
                lat("hyperfuncd warm", &self.warm),
            ],
        );
        out.push('\n');
        if let Some(r) = &self.runtime {
            let base = r.raw.p50.as_secs_f64();
            let lat = |name: String, l: &Latency| {
                vec![name, ms(l.p50), ms(l.p95), ratio(l.p50.as_secs_f64(), base)]
            };
            let rt = &r.runtime;
            let header = format!("sync latency under {rt} (ms)");
            let vs = format!("p50 vs docker run --runtime {rt}");
            out += &section(
                &[&header, "p50", "p95", &vs],
                vec![
                    lat(format!("docker run --rm -i --runtime {rt}"), &r.raw),
                    lat(format!("hyperfuncd cold, {rt}"), &r.cold),
                    lat(format!("hyperfuncd warm, {rt}"), &r.warm),
                ],
            );
            let _ = writeln!(
                out,
                "  warm calls under {rt} that started their own container: {}/{}",
                r.misses, args.calls
            );
            out.push('\n');
        }

        let mut header = vec![format!("finished calls/s ({} calls)", args.batch)];
        header.extend(args.concurrency.iter().map(|c| format!("c={c}")));
        header.push("daemon CPU ms/call".into());
        let tp = |name: &str, r: &Row| {
            let mut row = vec![name.to_string()];
            row.extend(r.throughput.iter().map(|t| format!("{t:.1}")));
            row.push(if r.finished > 0 {
                format!("{:.1}", ticks_to_ms(r.cpu_ticks) / r.finished as f64)
            } else {
                "-".into()
            });
            row
        };
        let tp_ratio = |name: &str, r: &Row| {
            let mut row = vec![name.to_string()];
            row.extend(
                r.throughput
                    .iter()
                    .zip(&self.raw.throughput)
                    .map(|(h, d)| ratio(*h, *d)),
            );
            row.push(String::new());
            row
        };
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        let mut rows = vec![
            tp("docker run --rm -i", &self.raw),
            tp("hyperfuncd cold", &self.cold),
            tp("hyperfuncd warm", &self.warm),
        ];
        let users = args.users;
        let shared = !self.cold_users.throughput.is_empty();
        if shared {
            rows.push(tp(
                &format!("hyperfuncd cold, {users} users"),
                &self.cold_users,
            ));
            rows.push(tp(
                &format!("hyperfuncd warm, {users} users"),
                &self.warm_users,
            ));
        }
        rows.push(tp_ratio("cold vs docker run", &self.cold));
        rows.push(tp_ratio("warm vs docker run", &self.warm));
        if shared {
            rows.push(tp_ratio(
                &format!("cold, {users} users vs docker run"),
                &self.cold_users,
            ));
            rows.push(tp_ratio(
                &format!("warm, {users} users vs docker run"),
                &self.warm_users,
            ));
        }
        out += &section(&header, rows);
        if shared {
            let _ = writeln!(
                out,
                "  {users} users: each owns its bench-cat (default quota); each level's calls spread evenly over them"
            );
        }
        out.push('\n');

        let mut rows = Vec::new();
        if let Some((n, r)) = self.accept {
            rows.push(vec![
                format!("{n} calls, {} clients", args.clients),
                format!("{r:.0}"),
            ]);
        }
        if let Some((n, r)) = self.topup {
            rows.push(vec![format!("{n} more (queue top-up)"), format!("{r:.0}")]);
        }
        out += &section(
            &[
                "accepted async calls/s (1 KiB payloads, HTTPS keep-alive, 202 = durable)",
                "",
            ],
            rows,
        );
        out.push('\n');

        out += &section(
            &["daemon RSS (MiB)", ""],
            vec![
                vec!["idle, fresh start".into(), format!("{:.1}", self.rss_fresh)],
                vec![
                    "idle, after the calls above".into(),
                    format!("{:.1}", self.rss_after),
                ],
                vec![
                    format!("{} calls queued", self.queued),
                    format!("{:.1}", self.rss_queued),
                ],
            ],
        );
        out.push('\n');

        let rm = match &self.force_rm {
            Some(Ok(d)) => format!("{:.1} s", d.as_secs_f64()),
            Some(Err(e)) => e.clone(),
            None => "-".into(),
        };
        let _ = writeln!(
            out,
            "func rm --force with {} calls queued: {rm}",
            self.queued
        );
        let per_level = |misses: &[usize]| -> String {
            misses
                .iter()
                .zip(&args.concurrency)
                .map(|(m, c)| format!("{m}/{} at c={c}", args.batch))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some((first, rest)) = self.warm.misses.split_first() {
            let _ = writeln!(
                out,
                "warm calls that started their own container: {first}/{} sync, {}",
                args.calls,
                per_level(rest)
            );
        }
        if !self.warm_users.misses.is_empty() {
            let _ = writeln!(
                out,
                "warm calls of {} users that started their own container: {}",
                args.users,
                per_level(&self.warm_users.misses)
            );
        }
        let left: Vec<String> = self
            .leftovers
            .iter()
            .map(|(d, n)| format!("{d} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "containers left after SIGTERM (removed by bench): {}",
            left.join(", ")
        );
        out
    }
}

/// A header and rows: the first column left-aligned, the rows' indented
/// under the header's; the other columns right-aligned.
pub(super) fn section(header: &[&str], rows: Vec<Vec<String>>) -> String {
    const INDENT: usize = 2;
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, (w, c)) in widths.iter_mut().zip(r).enumerate() {
            let indent = if i == 0 { INDENT } else { 0 };
            *w = (*w).max(c.chars().count() + indent);
        }
    }
    let line = |cells: Vec<&str>, indent: usize| {
        let mut s = " ".repeat(indent);
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(s, "{c:<w$}", w = w - indent);
            } else {
                let _ = write!(s, "  {c:>w$}");
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec(), 0);
    for r in &rows {
        out += &line(r.iter().map(String::as_str).collect(), INDENT);
    }
    out
}
