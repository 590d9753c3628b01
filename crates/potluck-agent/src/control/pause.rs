//! A pause outlives the agent: `potluck provide pause` leaves a file in the state
//! directory, and an agent started while it is there starts paused (a volunteer who
//! paused because they need the machine is not served again by a crash, a reboot or a
//! service manager's restart). `resume` removes it.

use std::path::{Path, PathBuf};

/// The file in the state directory whose presence means "paused".
pub const PAUSE_FILE: &str = "paused";

fn file(state_dir: &Path) -> PathBuf {
    state_dir.join(PAUSE_FILE)
}

/// Whether the volunteer's last word, in an earlier run, was `pause`.
pub fn remembered(state_dir: Option<&Path>) -> bool {
    state_dir.is_some_and(|d| file(d).exists())
}

/// Start paused if the volunteer's last word, in an earlier run, was `pause`.
pub(crate) fn restore(sh: &crate::state::Shared) {
    if remembered(sh.config.state_dir.as_deref()) {
        sh.gate.set(crate::gate::DrainReason::Paused, true);
        tracing::warn!("paused since an earlier run: `potluck provide resume` serves again");
    }
}

/// Remember `paused` across restarts (nothing to do without a state directory: then the
/// agent keeps nothing on disk, and a pause lasts until it stops).
pub fn remember(state_dir: Option<&Path>, paused: bool) -> std::io::Result<()> {
    let Some(dir) = state_dir else {
        return Ok(());
    };
    let path = file(dir);
    if paused {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            &path,
            b"paused by `potluck provide pause`; `potluck provide resume` serves again\n",
        )
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_is_remembered_until_a_resume() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Some(tmp.path());
        assert!(!remembered(dir));
        remember(dir, true).unwrap();
        assert!(remembered(dir));
        remember(dir, true).unwrap();
        remember(dir, false).unwrap();
        assert!(!remembered(dir));
        remember(dir, false).unwrap();
        assert!(!remembered(None));
        remember(None, true).unwrap();
    }
}
