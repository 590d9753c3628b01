//! Local control over a Unix socket (mode 0600, in a directory of mode 0700; never a TCP
//! port): `pause`, `resume`, `status`. One JSON request line, one JSON answer line.
//!
//! Request: `{"cmd":"pause"}`. Answer: `{"ok":true,"status":{...}}` or
//! `{"ok":false,"error":"..."}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gate::DrainReason;
use crate::journal::{self, Totals};
use crate::state::{LastError, Shared};

mod metrics;
pub mod pause;
pub use metrics::metrics_text;

/// Longest request line.
pub const MAX_CONTROL_REQUEST_BYTES: u64 = 4096;
/// Longest answer line read by the client.
pub const MAX_CONTROL_ANSWER_BYTES: u64 = 4 * 1024 * 1024;
/// How long one control connection may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket file name in the runtime or state directory.
pub const SOCKET_NAME: &str = "provide.sock";

/// A control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Drain until `resume`.
    Pause,
    /// Stop draining for `pause`.
    Resume,
    /// Report.
    Status,
}

/// The answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    /// Whether the command worked.
    pub ok: bool,
    /// The state after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// Why it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One model in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// Public name.
    pub model: String,
    /// The backend's name.
    pub backend_name: String,
    /// File hash.
    pub sha256: Option<String>,
    /// Requests in flight.
    pub in_flight: usize,
    /// Caps.
    pub max_concurrency: Option<u32>,
    /// Caps.
    pub max_tokens: Option<u32>,
    /// Caps.
    pub max_context: Option<u32>,
}

/// One tunnel in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubStatus {
    /// The hub's URL (with the address it is pinned to, if any).
    pub url: String,
    /// Whether its tunnel is open now.
    pub connected: bool,
    /// Times its tunnel was opened (more than 1 after reconnects).
    pub opened: u64,
    /// Why it last closed or failed to open (content-free).
    pub last_error: Option<String>,
}

/// What `potluck provide status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `accepting` or `draining`.
    pub state: String,
    /// Why draining (`paused`, `schedule`, `busy`) or why nothing arrives (`no_hub`).
    pub reasons: Vec<String>,
    /// The first hub's URL.
    pub hub: String,
    /// Whether at least one tunnel is open.
    pub hub_connected: bool,
    /// Each tunnel (one per hub, per address of a hub with several).
    #[serde(default)]
    pub hubs: Vec<HubStatus>,
    /// Models offered.
    pub models: Vec<ModelStatus>,
    /// Requests in flight.
    pub in_flight: usize,
    /// Capacity announced.
    pub capacity: u32,
    /// Runtime worker threads the agent relays on (`potluck provide --threads`).
    #[serde(default)]
    pub threads: usize,
    /// The agent's CPU priority as a nice value (`potluck provide --nice`; 19 is the
    /// lowest); `None` where it cannot be read.
    #[serde(default)]
    pub nice: Option<i32>,
    /// Watts used for energy.
    pub watts: Option<f64>,
    /// Journal totals (today is the UTC day).
    pub journal: Totals,
    /// Recent errors, oldest first (content-free).
    pub last_errors: Vec<LastError>,
}

/// Build the status (reads the journal on a blocking thread).
pub async fn status(sh: &Shared) -> Status {
    let offer = sh.offer();
    let routes = sh.routes();
    let mut reasons: Vec<String> = sh
        .gate
        .reasons()
        .iter()
        .map(|r| match r {
            DrainReason::Paused => "paused",
            DrainReason::Schedule => "schedule",
            DrainReason::Busy => "busy",
        })
        .map(str::to_owned)
        .collect();
    let accepting = reasons.is_empty();
    if !sh.is_connected() {
        reasons.push("no_hub".into());
    }
    let totals = match sh.config.state_dir.as_ref().map(|d| d.join("journal")) {
        Some(d) => {
            let today = journal::day_of(sh.config.clock.now().as_millisecond());
            tokio::task::spawn_blocking(move || journal::totals(&d, &today))
                .await
                .unwrap_or_default()
        }
        None => Totals::default(),
    };
    Status {
        state: if accepting { "accepting" } else { "draining" }.into(),
        reasons,
        hub: sh
            .config
            .hubs
            .first()
            .map(|h| h.as_str().to_owned())
            .unwrap_or_default(),
        hub_connected: sh.is_connected(),
        hubs: sh
            .hubs
            .iter()
            .map(|h| HubStatus {
                url: h.label.clone(),
                connected: h.is_connected(),
                opened: h.times_opened(),
                last_error: h.last_error(),
            })
            .collect(),
        models: routes
            .iter()
            .map(|r| ModelStatus {
                model: r.public.to_string(),
                backend_name: r.backend_name.clone(),
                sha256: r.sha256.as_ref().map(|h| h.to_string()),
                in_flight: sh.in_flight_for(&r.public),
                max_concurrency: r.rule.as_ref().and_then(|x| x.max_concurrency),
                max_tokens: r.rule.as_ref().and_then(|x| x.max_tokens),
                max_context: r.rule.as_ref().and_then(|x| x.max_context),
            })
            .collect(),
        in_flight: sh.in_flight(),
        capacity: offer.capacity,
        threads: tokio::runtime::Handle::current().metrics().num_workers(),
        nice: own_nice(),
        watts: sh.watts(),
        journal: totals,
        last_errors: sh.last_errors(),
    }
}

/// This thread's nice value (threads inherit the one set at start).
#[cfg(target_os = "linux")]
fn own_nice() -> Option<i32> {
    nice_in_stat(&std::fs::read_to_string("/proc/thread-self/stat").ok()?)
}

/// The nice value in a line of Linux's `/proc/…/stat`: `pid (comm) state …`, where the
/// comm may hold spaces and parentheses, and nice is field 19, the 17th after the comm.
pub fn nice_in_stat(stat: &str) -> Option<i32> {
    stat.rsplit_once(") ")?.1.split(' ').nth(16)?.parse().ok()
}

#[cfg(not(target_os = "linux"))]
fn own_nice() -> Option<i32> {
    None
}

/// Why the control socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another agent answers on it.
    #[error("another agent is already running with control socket {0}")]
    InUse(PathBuf),
    /// IO.
    #[error("control socket {0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// Its directory lets other users in.
    #[error("control socket {0}: its directory {1}; choose a directory only you can write (the default, in the state directory, is one)")]
    Unsafe(PathBuf, String),
}

/// Bind the socket. Its directory comes first: created with mode 0700 when missing, then
/// checked ([`check_dir`]) before anything in it is touched; then a stale socket is
/// removed, the socket bound and chmod 0600. (Checked after the bind, as before, a
/// directory another user controls had already had its stale file removed and the new
/// socket put in, for that user to swap; and a symbolic link to a good directory passed.)
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let io = |e| ControlError::Io(path.to_owned(), e);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?,
        Err(e) => return Err(io(e)),
        Ok(_) => {}
    }
    let me = rustix::process::geteuid().as_raw();
    check_dir(dir, me).map_err(|why| ControlError::Unsafe(path.to_owned(), why))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => {
            return Err(ControlError::Io(
                path.to_owned(),
                std::io::Error::other("something other than a socket is there; remove it"),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let l = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(l)
}

/// The socket's directory must be a directory itself (not a symbolic link, which names a
/// place its target's owner chose), belong to this user (`me`) or root, and be written
/// by no one else unless it is sticky (`/tmp`: there, others cannot replace what is in
/// it). Each directory above it, as named and as its links resolve, must belong to this
/// user or root and not be writable by everyone unless sticky: else another user could
/// move the socket's directory away and put one of theirs in its place. (Directories
/// above may be group-writable: with a group per user, as most systems make, the group
/// is the user.) In a directory another user controls, they could swap the socket for
/// one of theirs and catch the volunteer's `pause`.
fn check_dir(dir: &Path, me: u32) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let shown = dir.display();
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{shown}: {e}"))?;
    if m.file_type().is_symlink() {
        return Err(format!(
            "{shown} is a symbolic link; name the directory it points to"
        ));
    }
    if !m.is_dir() {
        return Err(format!("{shown} is not a directory"));
    }
    let mine = |m: &std::fs::Metadata| m.uid() == me || m.uid() == 0;
    let sticky = |mode: u32| mode & 0o1000 != 0;
    if !mine(&m) {
        return Err(format!("{shown} belongs to another user"));
    }
    let mode = m.permissions().mode();
    if mode & 0o022 != 0 && !sticky(mode) {
        return Err(format!("{shown} may be written by other users"));
    }
    // Inside a user namespace (a rootless container, a sandbox) the host's root, which
    // owns `/` and the system's directories, shows as the overflow id: taken as root's
    // above the socket's own directory, which must still be this user's.
    let unmapped = unmapped_uid();
    let above_ok = |m: &std::fs::Metadata| mine(m) || Some(m.uid()) == unmapped;
    let absolute = std::path::absolute(dir).map_err(|e| format!("{shown}: {e}"))?;
    let resolved = std::fs::canonicalize(dir).map_err(|e| format!("{shown}: {e}"))?;
    for above in absolute
        .ancestors()
        .skip(1)
        .chain(resolved.ancestors().skip(1))
    {
        let m = std::fs::metadata(above).map_err(|e| format!("{}: {e}", above.display()))?;
        let mode = m.permissions().mode();
        if !above_ok(&m) || (mode & 0o002 != 0 && !sticky(mode)) {
            return Err(format!(
                "{} above it may be changed by other users",
                above.display()
            ));
        }
    }
    Ok(())
}

/// The id users outside this process's user namespace show as, when it runs in one
/// (`None` in the initial namespace, whose map is the identity).
fn unmapped_uid() -> Option<u32> {
    let map = std::fs::read_to_string("/proc/self/uid_map").ok()?;
    let overflow = std::fs::read_to_string("/proc/sys/kernel/overflowuid").ok()?;
    unmapped_from(&map, &overflow)
}

/// [`unmapped_uid`] from the texts of `/proc/self/uid_map` and the overflow id.
fn unmapped_from(uid_map: &str, overflow: &str) -> Option<u32> {
    let identity = uid_map.split_whitespace().eq(["0", "0", "4294967295"]);
    if identity {
        return None;
    }
    overflow.trim().parse().ok()
}

/// The user the socket belongs to, whose connections alone are served (root's too).
fn owner(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.uid())
}

/// Serve the socket until `shutdown`; removes the socket file at the end.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    sh: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let conns = TaskTracker::new();
    let me = owner(&path);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    // Another user who connected before the socket's mode was set.
                    let peer = stream.peer_cred().ok().map(|c| c.uid());
                    if peer.is_none_or(|uid| Some(uid) != me && uid != 0) {
                        tracing::warn!(uid = ?peer, "refused a control connection from another user");
                        continue;
                    }
                    let sh = Arc::clone(&sh);
                    conns.spawn(async move {
                        let _ = tokio::time::timeout(CONTROL_TIMEOUT, serve_one(stream, &sh)).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.cancelled() => break,
        }
    }
    conns.close();
    let _ = tokio::time::timeout(CONTROL_TIMEOUT, conns.wait()).await;
    let _ = std::fs::remove_file(&path);
}

async fn serve_one(stream: UnixStream, sh: &Shared) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r)
        .take(MAX_CONTROL_REQUEST_BYTES)
        .read_line(&mut line)
        .await?;
    let answer = match serde_json::from_str::<Command>(line.trim()) {
        Err(_) => Answer {
            ok: false,
            status: None,
            error: Some("unknown command; expected pause, resume or status".into()),
        },
        Ok(cmd) => {
            let error = apply(cmd, sh).err().map(|e| {
                format!("applied until the agent stops, but not remembered across a restart: {e}")
            });
            Answer {
                ok: error.is_none(),
                status: Some(status(sh).await),
                error,
            }
        }
    };
    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

/// Carry out a command; an error only where a pause or resume could not be written to
/// the state directory (it took effect all the same).
fn apply(cmd: Command, sh: &Shared) -> std::io::Result<()> {
    let paused = match cmd {
        Command::Pause => true,
        Command::Resume => false,
        Command::Status => return Ok(()),
    };
    if sh.gate.set(DrainReason::Paused, paused) {
        if paused {
            tracing::info!("paused by the local operator: draining");
        } else {
            tracing::info!("resumed by the local operator");
        }
        sh.republish();
    }
    pause::remember(sh.config.state_dir.as_deref(), paused)
}

/// Client side: send one command, read the answer.
pub async fn request(path: &Path, cmd: Command) -> std::io::Result<Answer> {
    let fut = async {
        let stream = UnixStream::connect(path).await?;
        let (r, mut w) = stream.into_split();
        let mut line = serde_json::to_vec(&cmd).map_err(std::io::Error::other)?;
        line.push(b'\n');
        w.write_all(&line).await?;
        let mut answer = String::new();
        BufReader::new(r)
            .take(MAX_CONTROL_ANSWER_BYTES)
            .read_line(&mut answer)
            .await?;
        serde_json::from_str(answer.trim()).map_err(std::io::Error::other)
    };
    tokio::time::timeout(CONTROL_TIMEOUT, fut)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer from the agent")
        })?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn nice_is_read_past_a_comm_with_spaces_and_parentheses() {
        let fields = "S 1 1 1 0 -1 4194560 100 0 0 0 5 3 0 0 39 19 3 0 123 456 789";
        assert_eq!(nice_in_stat(&format!("4242 (potluck) {fields}")), Some(19));
        assert_eq!(nice_in_stat(&format!("4242 (a) b (c) {fields}")), Some(19));
        assert_eq!(nice_in_stat("4242 (potluck) S 1 2"), None, "too short");
        assert_eq!(nice_in_stat("no parentheses at all"), None);
    }

    /// A socket in a directory other users may write is refused (one of them could put
    /// their own socket in its place); a sticky one (`/tmp`) and one only this user
    /// writes are fine.
    #[tokio::test]
    async fn a_socket_in_a_directory_others_may_write_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for (mode, ok) in [
            (0o777, false),
            (0o770, false),
            (0o1777, true),
            (0o700, true),
            (0o755, true),
        ] {
            let dir = tmp.path().join(format!("d{mode:o}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let sock = dir.join(SOCKET_NAME);
            let r = bind(&sock).await;
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {:?}", r.err());
            if !ok {
                assert!(!sock.exists(), "the refused socket was left behind");
            }
        }
    }

    /// The directory is checked before anything in it is touched. Before, the agent
    /// removed a stale socket (or whatever held its name) and bound its own in a
    /// directory anyone could write, then found the directory unsafe: another user's
    /// file was gone, and for a moment the socket was theirs to swap. A symbolic link
    /// to a good directory passed, since the check followed it.
    #[tokio::test]
    async fn an_unsafe_directory_is_refused_before_anything_in_it_is_touched() {
        let tmp = tempfile::tempdir().unwrap();
        // Anyone may write it, and someone left a file under the socket's name.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let planted = open.join(SOCKET_NAME);
        std::fs::write(&planted, "theirs").unwrap();
        let e = bind(&planted).await.unwrap_err();
        assert!(matches!(e, ControlError::Unsafe(..)), "{e}");
        assert!(
            e.to_string().contains("may be written by other users"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&planted).unwrap(), "theirs");

        // A link to a directory only this user writes: the link is refused, and no
        // socket appears in its target.
        let good = tmp.path().join("good");
        std::fs::create_dir(&good).unwrap();
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        let e = bind(&link.join(SOCKET_NAME)).await.unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(
            std::fs::read_dir(&good).unwrap().count(),
            0,
            "nothing in it"
        );

        // A good directory inside one anyone may write (not sticky): it could be moved
        // away and replaced, so it is refused too.
        let inner = open.join("inner");
        std::fs::create_dir(&inner).unwrap();
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = bind(&inner.join(SOCKET_NAME)).await.unwrap_err();
        assert!(e.to_string().contains("above it"), "{e}");
        assert_eq!(std::fs::read_dir(&inner).unwrap().count(), 0);

        // Something other than a socket under its name, in a good directory: left alone.
        std::fs::write(good.join(SOCKET_NAME), "mine").unwrap();
        assert!(bind(&good.join(SOCKET_NAME)).await.is_err());
        assert_eq!(
            std::fs::read_to_string(good.join(SOCKET_NAME)).unwrap(),
            "mine"
        );
    }

    /// A missing directory is made with mode 0700 (and the directories above it that are
    /// missing too), and the socket has mode 0600; a stale socket is replaced.
    #[tokio::test]
    async fn a_missing_directory_is_made_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let sock = dir.join(SOCKET_NAME);
        let l = bind(&sock).await.unwrap();
        for d in [tmp.path().join("a"), dir.clone()] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{}: {mode:o}", d.display());
        }
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Bound and listening: another agent is refused.
        assert!(matches!(bind(&sock).await, Err(ControlError::InUse(_))));
        drop(l);
        // Left behind by an agent that died: replaced.
        bind(&sock).await.unwrap();
    }

    /// Inside a user namespace the host's root shows as the overflow id, which is taken
    /// as root's above the socket's directory; outside one, nobody is.
    #[test]
    fn the_overflow_id_stands_for_root_only_inside_a_user_namespace() {
        assert_eq!(
            unmapped_from("         0          0 4294967295\n", "65534\n"),
            None
        );
        assert_eq!(
            unmapped_from("         0       1000          1\n", "65534\n"),
            Some(65534)
        );
        assert_eq!(unmapped_from("0 100000 65536\n", "nonsense"), None);
    }
}
