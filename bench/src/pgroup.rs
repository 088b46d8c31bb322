//! A shell command running in its own process group, with its output
//! appended to a log file, and stopped as a whole: SIGTERM to the group, a
//! grace period, then SIGKILL, every member reaped, and the group waited
//! out so that the next command can bind the same port.
//!
//! The group is stopped when the guard is dropped, so every error path
//! stops it too; [`stop_groups_on_signals`] covers Ctrl-C, SIGTERM and
//! SIGHUP of the benchmark itself (the children, in their own group, do not
//! get the terminal's Ctrl-C).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitOptions};

/// How long the group gets between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(10);
/// How long the group gets to vanish after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

/// The group running now, for the signal thread.
static RUNNING: Mutex<Running> = Mutex::new(Running {
    pgid: 0,
    interrupted: false,
});

struct Running {
    /// 0: none.
    pgid: i32,
    /// Set by the signal thread: start nothing more.
    interrupted: bool,
}

fn running() -> MutexGuard<'static, Running> {
    RUNNING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A command running as `sh -c <command>` in a new process group.
pub struct ProcessGroup {
    child: Child,
    pgid: Pid,
    /// The exit status of `sh`, once reaped.
    status: Option<ExitStatus>,
    stopped: bool,
}

/// How a group was stopped, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Nothing was left running.
    AlreadyGone,
    /// SIGTERM was enough.
    Term,
    /// It needed SIGKILL after the grace period.
    Kill,
    /// Members were still alive (or unreaped) after SIGKILL.
    Lingering,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AlreadyGone => "it had already exited",
            Self::Term => "on SIGTERM",
            Self::Kill => "on SIGKILL, after the grace period",
            Self::Lingering => "some of its processes outlived SIGKILL",
        })
    }
}

impl ProcessGroup {
    /// Starts `sh -c command` in its own process group with stdin from
    /// /dev/null and stdout and stderr appended to `log` (headed by the
    /// command as `shown`: with its secrets masked), with `env` added to the
    /// environment.
    pub fn spawn(
        command: &str,
        shown: &str,
        env: &[(&str, &str)],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let mut out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening the log file {}", log.display()))?;
        writeln!(out, "# sllm-bench: sh -c {shown:?}")
            .with_context(|| format!("writing {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("opening the log file {}", log.display()))?;
        // Held until the group is recorded, so that the signal thread
        // either sees it or keeps it from starting.
        let mut running = running();
        if running.interrupted {
            // The signal thread is stopping the last group and then ends
            // the process: start nothing more, and wait for the end.
            drop(running);
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        let child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting `sh -c {shown:?}`: is sh on PATH?"))?;
        let raw = i32::try_from(child.id()).context("the child's pid does not fit a pid_t")?;
        let pgid = Pid::from_raw(raw).context("the child's pid is 0")?;
        running.pgid = raw;
        Ok(Self {
            child,
            pgid,
            status: None,
            stopped: false,
        })
    }

    /// The pid of `sh`, which is also the process group id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status of `sh` if it has exited (its children may live on).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Stops the whole group: SIGTERM, up to [`TERM_GRACE`] for every member
    /// to exit, SIGKILL for what is left, then up to a few seconds for the
    /// group to vanish. Idempotent.
    pub fn stop(&mut self) -> Stopped {
        if self.stopped {
            return Stopped::AlreadyGone;
        }
        self.stopped = true;
        let how = if !self.alive() {
            Stopped::AlreadyGone
        } else {
            let _ = rustix::process::kill_process_group(self.pgid, Signal::TERM);
            if self.wait_gone(TERM_GRACE) {
                Stopped::Term
            } else {
                tracing::warn!(
                    pgid = self.pgid.as_raw_nonzero().get(),
                    "still running {} s after SIGTERM: sending SIGKILL",
                    TERM_GRACE.as_secs()
                );
                let _ = rustix::process::kill_process_group(self.pgid, Signal::KILL);
                if self.wait_gone(KILL_GRACE) {
                    Stopped::Kill
                } else {
                    tracing::warn!(
                        pgid = self.pgid.as_raw_nonzero().get(),
                        "process group still present {} s after SIGKILL (a process stuck in \
                         the kernel, or not reaped); the next start may find the port taken",
                        KILL_GRACE.as_secs()
                    );
                    Stopped::Lingering
                }
            }
        };
        let mut running = running();
        if running.pgid == self.pgid.as_raw_nonzero().get() {
            running.pgid = 0;
        }
        how
    }

    /// Reaps what can be reaped and polls until the group is gone or
    /// `limit` has passed; true when it is gone.
    fn wait_gone(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if !self.alive() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Reaps `sh` and any member reparented to us, then says whether a
    /// member is left that runs, or that is ours to reap.
    fn alive(&mut self) -> bool {
        // `sh` first, through std, so that its status is not taken from it.
        self.try_exit();
        if self.status.is_some() {
            // Members orphaned while we are the subreaper are our children.
            while let Ok(Some(_)) = rustix::process::waitpgid(self.pgid, WaitOptions::NOHANG) {}
        }
        group_alive(self.pgid)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True while the group has a member that is not a zombie, or a zombie
/// this process is about to reap (a zombie holds no port and no memory, and
/// one left to an init that does not reap would otherwise keep the group
/// "present" forever).
fn group_alive(pgid: Pid) -> bool {
    match rustix::process::test_kill_process_group(pgid) {
        Err(Errno::SRCH) => false,
        Err(_) => true,
        Ok(()) => live_members(pgid) > 0,
    }
}

/// Members of group `pgid` that are not zombies left to someone else, from
/// /proc.
fn live_members(pgid: Pid) -> usize {
    let want = pgid.as_raw_nonzero().get().to_string();
    let me = rustix::process::getpid().as_raw_nonzero().get().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        // No /proc: trust kill(2).
        return 1;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // Fields after the parenthesised name: state, ppid, pgrp, ...
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let ppid = fields.next();
            let pgrp = fields.next();
            let dead = matches!(state, Some("Z" | "X")) && ppid != Some(me.as_str());
            pgrp == Some(want.as_str()) && !dead
        })
        .count()
}

/// Makes this process the reaper of its orphaned descendants (so that the
/// members of a stopped group can be reaped here even where init does not
/// reap), and stops the running group, if any, when this process gets
/// SIGINT, SIGTERM or SIGHUP, then exits with 128 + the signal.
pub fn stop_groups_on_signals() -> anyhow::Result<()> {
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        tracing::debug!("cannot become the child subreaper: {e}");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal thread's runtime")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            runtime.block_on(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let streams = (|| {
                    Ok::<_, std::io::Error>((
                        signal(SignalKind::interrupt())?,
                        signal(SignalKind::terminate())?,
                        signal(SignalKind::hangup())?,
                    ))
                })();
                let (mut int, mut term, mut hup) = match streams {
                    Ok(streams) => {
                        let _ = ready_tx.send(Ok(()));
                        streams
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let number = tokio::select! {
                    _ = int.recv() => 2,
                    _ = term.recv() => 15,
                    _ = hup.recv() => 1,
                };
                stop_running_group();
                std::process::exit(128 + number);
            });
        })
        .context("starting the signal thread")?;
    ready_rx
        .recv()
        .context("the signal thread ended early")?
        .context("installing the signal handlers")?;
    Ok(())
}

/// From the signal thread: stops the group the main thread is running.
fn stop_running_group() {
    let pgid = {
        let mut running = running();
        running.interrupted = true;
        running.pgid
    };
    let Some(pgid) = Pid::from_raw(pgid) else {
        return;
    };
    eprintln!(
        "interrupted: stopping process group {}",
        pgid.as_raw_nonzero()
    );
    let _ = rustix::process::kill_process_group(pgid, Signal::TERM);
    for (limit, then_kill) in [(TERM_GRACE, true), (KILL_GRACE, false)] {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            // The main thread may reap `sh`; reap what was reparented here.
            while let Ok(Some(_)) = rustix::process::waitpgid(pgid, WaitOptions::NOHANG) {}
            if !group_alive(pgid) {
                return;
            }
            std::thread::sleep(POLL);
        }
        if then_kill {
            let _ = rustix::process::kill_process_group(pgid, Signal::KILL);
        }
    }
}

/// The last `lines` lines of `path` (at most its last 64 KiB), lossily
/// decoded; empty when it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> Vec<String> {
    const WINDOW: u64 = 64 << 10;
    let Ok(mut file) = File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(WINDOW);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut all: Vec<&str> = text.lines().collect();
    if start > 0 && !all.is_empty() {
        // The first line of the window is probably cut.
        all.remove(0);
    }
    let skip = all.len().saturating_sub(lines);
    all[skip..].iter().map(|l| l.to_string()).collect()
}

/// A new directory for the logs, kept after the run.
pub fn new_log_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().context(
        "creating a log directory under the system temp dir: set TMPDIR or pass --log-dir",
    )?;
    Ok(dir.keep())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path, 20);
        assert_eq!(tail.len(), 20);
        assert_eq!(tail[0], "line 11");
        assert_eq!(tail[19], "line 30");
        assert!(log_tail(&dir.path().join("missing"), 20).is_empty());
    }

    #[test]
    fn log_tail_of_a_large_file_reads_only_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut text = "x".repeat(200 << 10);
        text.push_str("\nlast but one\nlast\n");
        std::fs::write(&path, text).unwrap();
        assert_eq!(log_tail(&path, 2), ["last but one", "last"]);
    }

    #[test]
    fn a_group_is_stopped_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut group = ProcessGroup::spawn(
            "sleep 600 & echo started; wait",
            "sleep 600 & echo started; wait",
            &[],
            &log,
        )
        .unwrap();
        let pgid = Pid::from_raw(group.pid() as i32).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&log).unwrap().contains("started") {
            assert!(Instant::now() < deadline, "the command never started");
            std::thread::sleep(POLL);
        }
        assert!(group_alive(pgid));
        assert_eq!(group.stop(), Stopped::Term);
        assert!(!group_alive(pgid));
        assert_eq!(group.stop(), Stopped::AlreadyGone);
    }
}
