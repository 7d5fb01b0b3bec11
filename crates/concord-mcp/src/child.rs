//! Stdio upstream processes. Each child runs in its own process group so that launchers such as
//! `npx` or `uvx`, which start the real server as a grandchild, are stopped together with it:
//! killing only the direct child would leave the server orphaned.
//!
//! The group is only ever signalled while its leader (the direct child) has not been reaped: an
//! exited but unreaped leader is a zombie that still holds its pid, so its group id cannot have
//! been given to another process. Once it is reaped that guarantee is gone, so the task that
//! reaps it kills what is left of the group first, and nothing signals the group afterwards.
//!
//! The child's stderr is its log. It is read as bytes for as long as the child holds it open
//! (stopping early would close the pipe and kill the child with SIGPIPE on its next write), in
//! lines of bounded length (the rest of an over-long line is skipped up to its newline), decoded
//! leniently, and logged at a bounded rate per upstream with a count of what was suppressed.

use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

/// How long a child gets to exit after SIGTERM before it is killed.
const TERMINATE_GRACE: Duration = Duration::from_secs(3);
/// The longest stderr line logged; the rest of a longer line is skipped.
pub(crate) const MAX_STDERR_LINE: usize = 8 * 1024;
/// Stderr lines logged per upstream and window; the rest are counted and reported in one line.
const STDERR_LINES_PER_WINDOW: u32 = 100;
const STDERR_WINDOW: Duration = Duration::from_secs(1);
/// How often the exit of a child is looked for when SIGCHLD cannot be watched.
const EXIT_POLL: Duration = Duration::from_millis(100);

/// A running stdio server. Dropping it kills the whole process group (if the leader has not
/// been reaped yet).
pub(crate) struct ChildProcess {
    group: Arc<Group>,
    exit: watch::Receiver<Option<String>>,
    terminated: bool,
}

pub(crate) struct SpawnedChild {
    pub process: ChildProcess,
    pub stdout: ChildStdout,
    pub stdin: ChildStdin,
}

/// The child's process group, and whether its leader has been reaped (after which the group id
/// may belong to someone else and must never be signalled).
struct Group {
    pgid: i32,
    reaped: Mutex<bool>,
}

impl Group {
    /// Signals the group unless its leader has been reaped; returns whether it was signalled.
    fn signal(&self, signal: i32) -> bool {
        let reaped = self.reaped.lock();
        if *reaped {
            return false;
        }
        // SAFETY: killpg has no memory-safety preconditions. The leader is not reaped (checked
        // under the lock its reaper holds), so `pgid` is still this child's group.
        unsafe {
            libc::killpg(self.pgid, signal);
        }
        true
    }

    /// Kills what is left of the group, then runs `reap` (which reaps the leader) and records
    /// that the group must not be signalled any more. The lock makes the two one step for
    /// [`Self::signal`].
    fn kill_then_reap<T>(&self, reap: impl FnOnce() -> T) -> T {
        let mut reaped = self.reaped.lock();
        if !*reaped {
            // SAFETY: as in `signal`: the leader is not reaped yet.
            unsafe {
                libc::killpg(self.pgid, libc::SIGKILL);
            }
        }
        let out = reap();
        *reaped = true;
        out
    }

    /// The leader was reaped by someone else (or may be at any moment): never signal again.
    fn forget(&self) {
        *self.reaped.lock() = true;
    }
}

pub(crate) fn spawn(
    server: &str,
    command: &str,
    args: &[String],
    env: &std::collections::BTreeMap<String, String>,
    cwd: Option<&std::path::Path>,
    stderr_log: Arc<StderrLog>,
) -> std::io::Result<SpawnedChild> {
    let mut cmd = Command::new(command);
    cmd.args(args)
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let mut child = cmd.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("child exited at once"))? as i32;
    let stdout = child.stdout.take().expect("stdout was piped");
    let stdin = child.stdin.take().expect("stdin was piped");
    let stderr = child.stderr.take().expect("stderr was piped");

    // The server's stderr is its log: it goes to ours, line by line, never into the protocol.
    let span = tracing::info_span!("upstream_stderr", server = %server, pid);
    tokio::spawn(
        async move {
            pump_stderr(stderr, &stderr_log, log_stderr_event).await;
        }
        .instrument(span),
    );

    let group = Arc::new(Group {
        pgid: pid,
        reaped: Mutex::new(false),
    });
    let (exit_tx, exit_rx) = watch::channel(None);
    let mut reaper = Reaper {
        child,
        group: group.clone(),
    };
    tokio::spawn(async move {
        let description = match reaper.wait().await {
            Ok(status) => match (
                status.code(),
                std::os::unix::process::ExitStatusExt::signal(&status),
            ) {
                (Some(code), _) => format!("process exited with status {code}"),
                (None, Some(signal)) => format!("process killed by signal {signal}"),
                _ => "process exited".to_string(),
            },
            Err(e) => format!("process lost: {e}"),
        };
        let _ = exit_tx.send(Some(description));
    });

    Ok(SpawnedChild {
        process: ChildProcess {
            group,
            exit: exit_rx,
            terminated: false,
        },
        stdout,
        stdin,
    })
}

/// The only owner of the child's handle, and so the only one that reaps it.
struct Reaper {
    child: Child,
    group: Arc<Group>,
}

impl Reaper {
    /// Waits for the leader to exit, kills the rest of its group while the leader is still an
    /// unreaped zombie (so the group id is still the child's), then reaps it.
    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Err(e) = leader_exited(self.group.pgid).await {
            // The exit cannot be watched without reaping: stop signalling the group before
            // reaping, as it may be another's afterwards.
            tracing::debug!(error = %e, "cannot watch the child's exit without reaping it");
            self.group.forget();
            return self.child.wait().await;
        }
        let child = &mut self.child;
        match self.group.kill_then_reap(|| child.try_wait()) {
            Ok(Some(status)) => Ok(status),
            // Cannot happen (the leader had exited); the group is no longer signalled anyway.
            Ok(None) => self.child.wait().await,
            Err(e) => Err(e),
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // Dropped before reaping (the runtime is shutting down): `kill_on_drop` leaves the
        // child to tokio's orphan reaper, which may reap it at any time from now on, so this is
        // the last moment the group may be signalled.
        self.group.kill_then_reap(|| ());
    }
}

/// Resolves once the process `pid` (a child of ours) has exited, without reaping it.
async fn leader_exited(pid: i32) -> std::io::Result<()> {
    // Watch SIGCHLD before looking, so an exit between the look and the wait is not missed.
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();
    loop {
        if exited_unreaped(pid)? {
            return Ok(());
        }
        match &mut sigchld {
            Some(signals) => {
                if signals.recv().await.is_none() {
                    sigchld = None;
                }
            }
            None => tokio::time::sleep(EXIT_POLL).await,
        }
    }
}

/// True when the child `pid` has exited; it is left a zombie (`WNOWAIT`), still holding its pid.
fn exited_unreaped(pid: i32) -> std::io::Result<bool> {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value, and waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t for the duration of the call.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if rc == -1 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        // With WNOHANG, si_pid stays 0 when the child has not changed state.
        return Ok(siginfo_pid(&info) != 0);
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn siginfo_pid(info: &libc::siginfo_t) -> libc::pid_t {
    // SAFETY: waitid filled a SIGCHLD siginfo (or left it zeroed), whose pid field is valid.
    unsafe { info.si_pid() }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn siginfo_pid(info: &libc::siginfo_t) -> libc::pid_t {
    info.si_pid
}

impl ChildProcess {
    /// Resolves with a description of how the process ended.
    pub async fn exited(&self) -> String {
        let mut exit = self.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(description) => description.clone().unwrap_or_default(),
            Err(_) => "process lost".to_string(),
        }
    }

    /// Sends `signal` to the child's process group, unless the child has been reaped; returns
    /// whether it was sent.
    pub fn signal(&self, signal: i32) -> bool {
        self.group.signal(signal)
    }

    /// SIGTERM to the group, then SIGKILL if it is still there after a grace period; returns
    /// once the direct child has been reaped (what is left of the group is killed just before).
    pub async fn terminate(mut self) {
        self.terminated = true;
        self.signal(libc::SIGTERM);
        if tokio::time::timeout(TERMINATE_GRACE, self.exited())
            .await
            .is_err()
        {
            self.signal(libc::SIGKILL);
            self.exited().await;
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if !self.terminated {
            self.signal(libc::SIGKILL);
        }
    }
}

/// What the stderr pump reports.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StderrEvent {
    /// One line (lossily decoded, control characters escaped, cut with a marker if too long).
    Line(String),
    /// This many lines were not logged since the last report (over the rate limit).
    Suppressed(u64),
}

/// The stderr of one upstream, across its restarts: the rate limit is the upstream's.
pub(crate) struct StderrLog {
    limiter: Mutex<LineLimiter>,
}

impl Default for StderrLog {
    fn default() -> Self {
        Self::new(STDERR_LINES_PER_WINDOW, STDERR_WINDOW)
    }
}

impl StderrLog {
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self {
            limiter: Mutex::new(LineLimiter::new(per_window, window)),
        }
    }
}

fn log_stderr_event(event: StderrEvent) {
    match event {
        StderrEvent::Line(line) => tracing::info!(target: "concord::upstream", "{line}"),
        StderrEvent::Suppressed(lines) => tracing::warn!(
            target: "concord::upstream",
            suppressed = lines,
            "{lines} stderr lines of this server suppressed (over {STDERR_LINES_PER_WINDOW} per {STDERR_WINDOW:?})"
        ),
    }
}

/// Reads `reader` to its end (the child and everything that inherited its stderr are gone),
/// passing its lines through the upstream's rate limit to `sink`.
pub(crate) async fn pump_stderr<R: AsyncRead + Unpin>(
    mut reader: R,
    log: &StderrLog,
    mut sink: impl FnMut(StderrEvent),
) {
    let mut splitter = LineSplitter::new(MAX_STDERR_LINE);
    let mut buf = vec![0u8; 8 * 1024];
    let mut lines = Vec::new();
    loop {
        let summary_due = log.limiter.lock().summary_due();
        let read = tokio::select! {
            read = reader.read(&mut buf) => read,
            _ = async {
                match summary_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(suppressed) = log.limiter.lock().flush(Instant::now()) {
                    sink(StderrEvent::Suppressed(suppressed));
                }
                continue;
            }
        };
        match read {
            Ok(0) => break,
            Ok(n) => {
                splitter.push(&buf[..n], &mut lines);
                emit(log, &mut lines, &mut sink);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, "reading the server's stderr failed");
                break;
            }
        }
    }
    splitter.finish(&mut lines);
    emit(log, &mut lines, &mut sink);
    if let Some(suppressed) = log.limiter.lock().take_suppressed() {
        sink(StderrEvent::Suppressed(suppressed));
    }
}

fn emit(log: &StderrLog, lines: &mut Vec<String>, sink: &mut impl FnMut(StderrEvent)) {
    if lines.is_empty() {
        return;
    }
    let now = Instant::now();
    for line in lines.drain(..) {
        let (summary, admitted) = log.limiter.lock().admit(now);
        if let Some(suppressed) = summary {
            sink(StderrEvent::Suppressed(suppressed));
        }
        if admitted {
            sink(StderrEvent::Line(line));
        }
    }
}

/// Cuts a byte stream into lines of at most `max` bytes. A longer line is reported at once,
/// cut, with a marker; the rest of it is skipped up to its newline, so no line is ever held
/// whole.
pub(crate) struct LineSplitter {
    max: usize,
    line: Vec<u8>,
    /// The current line was too long and has been reported: skip to its end.
    skipping: bool,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            line: Vec::new(),
            skipping: false,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<String>) {
        while !bytes.is_empty() {
            let (part, ended) = match bytes.iter().position(|b| *b == b'\n') {
                Some(at) => (&bytes[..at], Some(at + 1)),
                None => (bytes, None),
            };
            if !self.skipping {
                let room = self.max - self.line.len();
                if part.len() <= room {
                    self.line.extend_from_slice(part);
                } else {
                    self.line.extend_from_slice(&part[..room]);
                    let mut text = render(&self.line);
                    text.push_str(&format!(" [concord: line cut at {} bytes]", self.max));
                    out.push(text);
                    self.line.clear();
                    self.skipping = true;
                }
            }
            match ended {
                Some(next) => {
                    if self.skipping {
                        self.skipping = false;
                    } else {
                        out.push(render(&self.line));
                    }
                    self.line.clear();
                    bytes = &bytes[next..];
                }
                None => break,
            }
        }
    }

    /// The last line, when the stream ended without a newline.
    pub fn finish(&mut self, out: &mut Vec<String>) {
        if !self.skipping && !self.line.is_empty() {
            out.push(render(&self.line));
        }
        self.line.clear();
        self.skipping = false;
    }
}

/// A stderr line as text: invalid UTF-8 replaced, a trailing CR dropped, and control
/// characters escaped so a line cannot forge others in the log.
fn render(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    let text = String::from_utf8_lossy(bytes);
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return text.into_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// At most `per_window` lines per window; the lines over it are counted, and the count is
/// reported once the window is over (or with the next line admitted).
pub(crate) struct LineLimiter {
    per_window: u32,
    window: Duration,
    started: Option<Instant>,
    admitted: u32,
    suppressed: u64,
}

impl LineLimiter {
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            started: None,
            admitted: 0,
            suppressed: 0,
        }
    }

    /// Whether a line seen at `now` is logged, and the count of suppressed lines to report
    /// first (when a window ended with some).
    pub fn admit(&mut self, now: Instant) -> (Option<u64>, bool) {
        let summary = self.flush(now);
        if self.started.is_none() {
            self.started = Some(now);
        }
        if self.admitted < self.per_window {
            self.admitted += 1;
            (summary, true)
        } else {
            self.suppressed += 1;
            (summary, false)
        }
    }

    /// When the current window ends, if lines were suppressed in it.
    pub fn summary_due(&self) -> Option<Instant> {
        match self.started {
            Some(started) if self.suppressed > 0 => Some(started + self.window),
            _ => None,
        }
    }

    /// Closes the window if it is over at `now`: returns the lines it suppressed, if any.
    pub fn flush(&mut self, now: Instant) -> Option<u64> {
        match self.started {
            Some(started) if now.duration_since(started) >= self.window => {
                self.started = None;
                self.admitted = 0;
                self.take_suppressed()
            }
            _ => None,
        }
    }

    /// The lines suppressed and not yet reported, whatever the window.
    pub fn take_suppressed(&mut self) -> Option<u64> {
        (self.suppressed > 0).then(|| std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A generous bound on waiting for something that must happen; it decides only failure.
    const DEADLINE: Duration = Duration::from_secs(60);

    fn sh(script: &str) -> SpawnedChild {
        spawn(
            "test",
            "sh",
            &["-c".to_string(), script.to_string()],
            &Default::default(),
            None,
            Arc::default(),
        )
        .expect("spawn sh")
    }

    /// Reads the child's stdout to its end: every process holding it (the whole group) exited.
    async fn stdout_closed(stdout: &mut ChildStdout) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::time::timeout(DEADLINE, stdout.read_to_end(&mut out))
            .await
            .expect("something in the group still holds stdout open")
            .expect("read stdout");
        out
    }

    #[tokio::test]
    async fn a_reaped_child_is_never_signalled_again() {
        let mut spawned = sh("exit 3");
        let process = spawned.process;
        assert_eq!(
            tokio::time::timeout(DEADLINE, process.exited())
                .await
                .unwrap(),
            "process exited with status 3"
        );
        stdout_closed(&mut spawned.stdout).await;
        // Reaped: its pid, and so its group id, may already be someone else's.
        assert!(!process.signal(libc::SIGKILL), "signalled a reaped group");
        assert!(!process.signal(0));
        // Dropping it sends nothing either (nothing to observe but the flag it checks).
        drop(process);

        // A live child, by contrast, is signalled.
        let live = sh("read line");
        assert!(live.process.signal(0), "a live child must be signalled");
        tokio::time::timeout(DEADLINE, live.process.terminate())
            .await
            .expect("terminate");
    }

    #[tokio::test]
    async fn the_group_dies_with_its_leader_before_the_leader_is_reaped() {
        // A launcher that leaves a helper behind and exits: the helper (same group, same
        // stdout) must not outlive it, although nothing terminates the process.
        let mut spawned = sh("sleep 1000 & echo started; exit 0");
        let out = stdout_closed(&mut spawned.stdout).await;
        assert_eq!(out, b"started\n");
        assert_eq!(
            tokio::time::timeout(DEADLINE, spawned.process.exited())
                .await
                .unwrap(),
            "process exited with status 0"
        );
        assert!(!spawned.process.signal(0));
    }

    #[tokio::test]
    async fn dropping_a_live_child_kills_its_group() {
        let mut spawned = sh("sleep 1000 & echo started; wait");
        let mut first = [0u8; 8];
        spawned.stdout.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"started\n");
        drop(spawned.process);
        assert_eq!(stdout_closed(&mut spawned.stdout).await, b"");
    }

    fn split(chunks: &[&[u8]], max: usize) -> Vec<String> {
        let mut splitter = LineSplitter::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.push(chunk, &mut out);
        }
        splitter.finish(&mut out);
        out
    }

    #[test]
    fn lines_are_decoded_leniently_and_control_characters_escaped() {
        assert_eq!(
            split(
                &[b"caf\xc3", b"\xa9 ok\r\nbad \xff\xfe byte\n", b"tail"],
                64
            ),
            vec!["café ok", "bad \u{fffd}\u{fffd} byte", "tail"]
        );
        assert_eq!(
            split(&[b"a\x1b[31mred\tx\rforged\n"], 64),
            vec!["a\\u{1b}[31mred\tx\\rforged"]
        );
    }

    #[test]
    fn an_over_long_line_is_cut_at_once_and_its_rest_skipped() {
        let max = 16;
        let long = vec![b'x'; 1000];
        // The long line arrives in pieces, never ends within them, then ends.
        let out = split(&[b"short\n", &long, &long, b"yyy\nnext\n"], max);
        assert_eq!(
            out,
            vec![
                "short".to_string(),
                format!("{} [concord: line cut at {max} bytes]", "x".repeat(max)),
                "next".to_string(),
            ]
        );
        // Held at most `max` bytes at any time, however long the line.
        let mut splitter = LineSplitter::new(max);
        let mut out = Vec::new();
        for _ in 0..1000 {
            splitter.push(&long, &mut out);
            assert!(splitter.line.len() <= max);
        }
        assert_eq!(out.len(), 1);
        // A line of exactly `max` bytes is whole.
        let exact = "z".repeat(max);
        assert_eq!(split(&[format!("{exact}\n").as_bytes()], max), vec![exact]);
    }

    #[test]
    fn the_limiter_admits_a_window_s_worth_and_reports_the_rest() {
        let start = Instant::now();
        let window = Duration::from_secs(1);
        let mut limiter = LineLimiter::new(3, window);
        let verdicts: Vec<_> = (0..10).map(|_| limiter.admit(start)).collect();
        assert_eq!(
            verdicts.iter().filter(|(_, logged)| *logged).count(),
            3,
            "{verdicts:?}"
        );
        assert!(verdicts.iter().all(|(summary, _)| summary.is_none()));
        assert_eq!(limiter.summary_due(), Some(start + window));
        // Not yet over: nothing to report.
        assert_eq!(limiter.flush(start + window / 2), None);
        // Over: the count is reported once.
        assert_eq!(limiter.flush(start + window), Some(7));
        assert_eq!(limiter.flush(start + window * 2), None);
        assert_eq!(limiter.summary_due(), None);
        // A new window admits again; a report pending is given with the next line.
        let later = start + window * 3;
        for _ in 0..5 {
            limiter.admit(later);
        }
        assert_eq!(limiter.admit(later + window), (Some(2), true));
    }

    #[tokio::test]
    async fn the_pump_reads_everything_and_logs_a_bounded_amount() {
        let mut input = Vec::new();
        input.extend_from_slice(b"\xff\xfe not utf-8\n");
        input.extend(std::iter::repeat_n(b'h', 100_000));
        input.push(b'\n');
        for i in 0..10_000 {
            input.extend_from_slice(format!("flood {i}\n").as_bytes());
        }
        input.extend_from_slice(b"no newline at the end");
        // One window for the whole test: no clock involved.
        let log = StderrLog::new(50, Duration::from_secs(3600));
        let mut events = Vec::new();
        pump_stderr(&input[..], &log, |e| events.push(e)).await;
        let lines: Vec<&String> = events
            .iter()
            .filter_map(|e| match e {
                StderrEvent::Line(line) => Some(line),
                StderrEvent::Suppressed(_) => None,
            })
            .collect();
        let suppressed: u64 = events
            .iter()
            .filter_map(|e| match e {
                StderrEvent::Suppressed(n) => Some(*n),
                StderrEvent::Line(_) => None,
            })
            .sum();
        assert_eq!(lines.len(), 50);
        assert_eq!(lines[0], "\u{fffd}\u{fffd} not utf-8");
        assert!(lines[1].ends_with(&format!("[concord: line cut at {MAX_STDERR_LINE} bytes]")));
        assert!(lines[1].len() < MAX_STDERR_LINE + 64, "{}", lines[1].len());
        assert_eq!(lines[2], "flood 0");
        // Every line is accounted for: logged or counted.
        assert_eq!(lines.len() as u64 + suppressed, 2 + 10_000 + 1);
        assert_eq!(events.last(), Some(&StderrEvent::Suppressed(suppressed)));
    }
}
