//! The daemon under test, as users run it: `sllm-store start` in its own
//! process (timed from launch to its ready line: the pool's start-up), and
//! loads through `sllm-store load --json`, charged with the CPU of both the
//! loading client and the daemon.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sllm_client::load::LoadReport;

use crate::report::{Sample, pid_cpu_s, time_command_output};

/// How long the daemon may take to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running daemon; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    child: Child,
    bin: PathBuf,
    storage: PathBuf,
    pub addr: String,
    /// Seconds from launch to the ready line.
    pub ready_s: f64,
}

impl Daemon {
    /// Starts `bin start` on a free loopback port with `args` added.
    pub fn start(bin: &Path, storage: &Path, pool: &str, args: &[&str]) -> anyhow::Result<Self> {
        let launched = Instant::now();
        let mut child = Command::new(bin)
            .args([
                "start",
                "--port",
                "0",
                "--mem-pool-size",
                pool,
                "--storage-path",
            ])
            .arg(storage)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("the daemon's stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tail = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split(':').take(2).collect::<Vec<_>>().join(":");
                    let _ = tx.send(Ok(addr));
                } else {
                    tail.push(line);
                }
            }
            let _ = tx.send(Err(tail.join("\n")));
        });
        let mut daemon = Self {
            child,
            bin: bin.to_owned(),
            storage: storage.to_owned(),
            addr: String::new(),
            ready_s: 0.0,
        };
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(Ok(addr)) => {
                daemon.ready_s = launched.elapsed().as_secs_f64();
                daemon.addr = addr;
                Ok(daemon)
            }
            Ok(Err(log)) => bail!("the daemon exited before it was ready:\n{log}"),
            Err(_) => bail!("the daemon was not ready within {READY_TIMEOUT:?}"),
        }
    }

    /// Loads `model` onto the daemon's first device with the CLI; the
    /// sample's CPU is the client's plus the daemon's during the load.
    pub fn load(&self, model: &str) -> anyhow::Result<(LoadReport, Sample)> {
        let daemon_cpu = pid_cpu_s(self.child.id());
        let mut cmd = Command::new(&self.bin);
        cmd.args(["load", "--json", "--model", model, "--server", &self.addr])
            .arg("--storage-path")
            .arg(&self.storage)
            .env("RUST_LOG", "warn");
        let (mut sample, stdout) = time_command_output(&mut cmd)?;
        sample.cpu_s += pid_cpu_s(self.child.id()) - daemon_cpu;
        let json = serde_json::from_slice(&stdout).context("reading `sllm-store load --json`")?;
        Ok((json, sample))
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).context("pid")?;
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("the daemon did not stop within 30 s of SIGTERM; killed it")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}
