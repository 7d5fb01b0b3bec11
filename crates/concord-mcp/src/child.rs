//! Stdio upstream processes. Each child runs in its own process group so that launchers such as
//! `npx` or `uvx`, which start the real server as a grandchild, are stopped together with it:
//! killing only the direct child would leave the server orphaned.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use tracing::Instrument;

/// How long a child gets to exit after SIGTERM before it is killed.
const TERMINATE_GRACE: Duration = Duration::from_secs(3);

/// A running stdio server. Dropping it kills the whole process group.
pub(crate) struct ChildProcess {
    pgid: i32,
    exit: watch::Receiver<Option<String>>,
    terminated: bool,
}

pub(crate) struct SpawnedChild {
    pub process: ChildProcess,
    pub stdout: ChildStdout,
    pub stdin: ChildStdin,
}

pub(crate) fn spawn(
    server: &str,
    command: &str,
    args: &[String],
    env: &std::collections::BTreeMap<String, String>,
    cwd: Option<&std::path::Path>,
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
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "concord::upstream", "{line}");
            }
        }
        .instrument(span),
    );

    let (exit_tx, exit_rx) = watch::channel(None);
    tokio::spawn(async move {
        let description = match child.wait().await {
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
            pgid: pid,
            exit: exit_rx,
            terminated: false,
        },
        stdout,
        stdin,
    })
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

    /// SIGTERM to the group, then SIGKILL if it is still there after a grace period; returns
    /// once the direct child has been reaped.
    pub async fn terminate(mut self) {
        self.terminated = true;
        signal_group(self.pgid, libc::SIGTERM);
        if tokio::time::timeout(TERMINATE_GRACE, self.exited())
            .await
            .is_err()
        {
            signal_group(self.pgid, libc::SIGKILL);
            self.exited().await;
        }
        // Grandchildren that ignored SIGTERM must not outlive the group leader.
        signal_group(self.pgid, libc::SIGKILL);
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if !self.terminated {
            signal_group(self.pgid, libc::SIGKILL);
        }
    }
}

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: killpg has no memory-safety preconditions; a stale group id only yields ESRCH.
    unsafe {
        libc::killpg(pgid, signal);
    }
}
