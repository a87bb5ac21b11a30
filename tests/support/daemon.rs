//! The real `lambda-imaged` binary as a child process: the one way the tests and the bench
//! start a daemon in a process of its own (an in-process daemon is [`super::TestDaemon`]).
//!
//! Every daemon gets a directory (its socket `d.sock`, its cache `cache/`, an empty config
//! file so no host config is read, and its stderr in a log file), inherits none of the
//! variables that would change where it listens or what it was handed (`LAMBDA_IMAGED_*`,
//! `LISTEN_*`, `NOTIFY_SOCKET`), and shows its log in every panic of the thread that owns it.
//! Dropping it kills and reaps the process.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use lambda_imaged::client::{Client, proto};

use super::{Later, engine_host, rie_dir, until_async, until_blocking};

/// The daemon binary cargo built for this test or bench.
const BINARY: &str = env!("CARGO_BIN_EXE_lambda-imaged");

/// How long a daemon may take to answer GetInfo after it was started (a busy 2-core machine).
const READY_WITHIN: Duration = Duration::from_secs(300);

/// Variables of the test's environment the daemon must not inherit: they would choose its
/// socket or RIE dir, or make it believe systemd started it.
const SCRUBBED: [&str; 6] = [
    "LAMBDA_IMAGED_SOCKET",
    "LAMBDA_IMAGED_RIE_DIR",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
];

/// Which engine the daemon is pointed at (its `DOCKER_HOST`).
enum Engine {
    /// The test engine of `scripts/test-env.sh`.
    Test,
    /// A socket in the daemon's directory that nobody serves.
    Missing,
    Host(String),
}

/// Which RIE directory the daemon is given (`--rie-dir`).
enum Rie {
    /// The real RIE binaries of `scripts/test-env.sh`.
    Test,
    /// A directory that does not exist, in the daemon's directory.
    Missing,
    Dir(PathBuf),
}

/// How to start a [`Daemon`]: `Daemon::builder().arg(..).start().await`.
pub struct Builder {
    dir: Option<PathBuf>,
    readable_by_all: bool,
    engine: Engine,
    rie: Rie,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    nofile: Option<u64>,
    launcher: Option<Command>,
}

/// Where a daemon lives: a temp dir of its own, or one the test keeps (to restart a daemon
/// on the same socket and cache).
enum Home {
    Own(tempfile::TempDir),
    Given(PathBuf),
}

impl Home {
    fn path(&self) -> &Path {
        match self {
            Home::Own(dir) => dir.path(),
            Home::Given(path) => path,
        }
    }
}

/// A running `lambda-imaged`; killed and reaped when dropped.
pub struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    // Dropped after `child` is reaped (see `Drop`), so the log outlives the process.
    home: Home,
}

impl Builder {
    /// Runs the daemon in `dir` (kept by the caller; created if missing) instead of a temp dir
    /// of its own: a second daemon in the same dir has the same socket and cache.
    pub fn in_dir(mut self, dir: &Path) -> Builder {
        self.dir = Some(dir.to_owned());
        self
    }

    /// Makes its temp dir traversable by every user (for clients running as another user).
    pub fn readable_by_all(mut self) -> Builder {
        self.readable_by_all = true;
        self
    }

    /// Points the daemon at the engine at `host` (a `DOCKER_HOST` value) instead of the test
    /// engine.
    pub fn engine(mut self, host: &str) -> Builder {
        self.engine = Engine::Host(host.to_owned());
        self
    }

    /// Points the daemon at an engine socket that nobody serves.
    pub fn no_engine(mut self) -> Builder {
        self.engine = Engine::Missing;
        self
    }

    /// Gives the daemon `dir` as its RIE directory instead of the real RIE's.
    pub fn rie(mut self, dir: &Path) -> Builder {
        self.rie = Rie::Dir(dir.to_owned());
        self
    }

    /// Gives the daemon an RIE directory that does not exist.
    pub fn missing_rie(mut self) -> Builder {
        self.rie = Rie::Missing;
        self
    }

    /// Adds a command-line flag or value.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Builder {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds command-line flags and values.
    pub fn args<I, S>(mut self, args: I) -> Builder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable (after the scrubbed ones are removed, so it may set one).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Builder {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Limits the daemon to `limit` open file descriptors (RLIMIT_NOFILE).
    pub fn nofile(mut self, limit: u64) -> Builder {
        self.nofile = Some(limit);
        self
    }

    /// Runs the daemon through `launcher` (e.g. `systemd-socket-activate --listen ..`): the
    /// daemon's path and flags are appended to its arguments. The process is the launcher's.
    pub fn launcher(mut self, launcher: Command) -> Builder {
        self.launcher = Some(launcher);
        self
    }

    /// Starts the daemon and waits until it answers GetInfo; panics with its log if it exits
    /// first or does not answer in time.
    pub async fn start(self) -> Daemon {
        let mut daemon = self.spawn();
        let socket = daemon.socket.clone();
        let what = daemon.waiting("the daemon to answer GetInfo");
        until_async(what, READY_WITHIN, || {
            daemon.assert_running("it to answer GetInfo");
            let socket = socket.clone();
            async move { answers(&socket).await }
        })
        .await;
        daemon
    }

    /// [`Builder::start`] for a test without an async runtime.
    pub fn start_blocking(self) -> Daemon {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut daemon = self.spawn();
        let what = daemon.waiting("the daemon to answer GetInfo");
        let socket = daemon.socket.clone();
        until_blocking(what, READY_WITHIN, || {
            daemon.assert_running("it to answer GetInfo");
            runtime.block_on(answers(&socket))
        });
        daemon
    }

    /// Starts the process without waiting for anything (the caller waits for what it expects:
    /// a launcher's socket, a notification, an exit).
    pub fn spawn(self) -> Daemon {
        let home = match self.dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir).unwrap();
                Home::Given(dir)
            }
            None => Home::Own(tempfile::tempdir().unwrap()),
        };
        let dir = home.path();
        if self.readable_by_all {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let socket = dir.join("d.sock");
        // One log and one config per start: a restart in the same dir keeps the first log.
        let run = (1..)
            .find(|n| !dir.join(format!("daemon-{n}.log")).exists())
            .expect("a free log name");
        let log = dir.join(format!("daemon-{run}.log"));
        let config = dir.join(format!("daemon-{run}.toml"));
        // Keep-warm off unless a test turns it on (`--keep-warm`; flags win over the file):
        // background rebuilds would race with the builds other tests count.
        std::fs::write(&config, "keep_warm = \"0s\"\n").unwrap();
        let engine = match self.engine {
            Engine::Test => engine_host(),
            Engine::Missing => format!("unix://{}/no-engine.sock", dir.display()),
            Engine::Host(host) => host,
        };
        let rie = match self.rie {
            Rie::Test => rie_dir(),
            Rie::Missing => dir.join("no-rie-here"),
            Rie::Dir(rie) => rie,
        };
        let mut command = match self.launcher {
            Some(mut launcher) => {
                launcher.arg(BINARY);
                launcher
            }
            None => Command::new(BINARY),
        };
        command
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .arg("--rie-dir")
            .arg(&rie)
            .args(&self.args);
        for key in SCRUBBED {
            command.env_remove(key);
        }
        command
            .env("DOCKER_HOST", engine)
            .env("NO_COLOR", "1")
            .envs(self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(limit) = self.nofile {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit is async-signal-safe and only reads `rlimit`, a copy owned by
            // the closure; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        Daemon {
            child,
            socket,
            log,
            home,
        }
    }
}

/// True when a daemon on `socket` answers GetInfo on a new connection.
pub async fn answers(socket: &Path) -> bool {
    match Client::connect(socket).await {
        Ok(mut client) => client.info().await.is_ok(),
        Err(_) => false,
    }
}

impl Daemon {
    /// A daemon on the test engine with the real RIE, in a temp dir of its own.
    pub fn builder() -> Builder {
        Builder {
            dir: None,
            readable_by_all: false,
            engine: Engine::Test,
            rie: Rie::Test,
            args: Vec::new(),
            env: Vec::new(),
            nofile: None,
            launcher: None,
        }
    }

    /// Its socket (`--socket`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its directory: the socket, `cache/`, the log.
    pub fn dir(&self) -> &Path {
        self.home.path()
    }

    /// Its cache directory (`--cache-dir`).
    pub fn cache(&self) -> PathBuf {
        self.dir().join("cache")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// What it wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A new connection.
    pub async fn client(&self) -> Client {
        Client::connect(&self.socket)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.socket.display()))
    }

    /// Its counters, from GetInfo.
    pub async fn stats(&self) -> proto::Stats {
        self.client()
            .await
            .info()
            .await
            .unwrap()
            .stats
            .expect("GetInfo carries stats")
    }

    /// How it exited, if it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Panics, with its log, if it has exited while the test waited for `what`.
    pub fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.exited() {
            panic!(
                "the daemon exited ({status}) while waiting for {what}; its log:\n{}",
                self.log()
            );
        }
    }

    /// SIGKILL, then reaps it.
    pub fn kill_9(&mut self) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped yet.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9 {}", self.pid());
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM (the caller waits for the exit with [`Daemon::wait_exit`]).
    pub fn terminate(&self) {
        // SAFETY: signalling our own child, which has not been reaped.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM): {}", std::io::Error::last_os_error());
    }

    /// Waits at most `limit` for it to exit; panics with its log otherwise.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let what = self.waiting("the daemon to exit");
        let mut status = None;
        until_async(what, limit, || {
            status = self.exited();
            std::future::ready(status.is_some())
        })
        .await;
        status.expect("until returned once it exited")
    }

    /// [`Daemon::wait_exit`] for a test without an async runtime.
    pub fn wait_exit_blocking(&mut self, limit: Duration) -> ExitStatus {
        let what = self.waiting("the daemon to exit");
        let mut status = None;
        until_blocking(what, limit, || {
            status = self.exited();
            status.is_some()
        });
        status.expect("until returned once it exited")
    }

    /// Its open file descriptors now.
    pub fn fds(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.pid());
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot count the daemon's fds in {dir}: {e}"))
            .count()
    }

    /// Its resident memory now (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        self.status_bytes("VmRSS")
    }

    /// Its peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM")
    }

    /// A `kB` line of `/proc/<pid>/status`, in bytes; panics when it cannot be read, since a
    /// missing figure must not pass for a small one.
    fn status_bytes(&self, field: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read the daemon's {field} from {path}: {e}"));
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {field} line with a size in kB in {path}:\n{status}"));
        kib * 1024
    }

    /// `what`, shown with the log as it is when a wait on it times out.
    fn waiting(&self, what: &str) -> impl fmt::Display + use<> {
        let (what, log) = (what.to_owned(), self.log.clone());
        Later(move || {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            format!("{what}; the daemon's log:\n{log}")
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "the log of the daemon on {}:\n{}",
                self.socket.display(),
                self.log()
            );
        }
    }
}
