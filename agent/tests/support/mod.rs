//! What the binary's tests share: children killed when a test fails, and a connector whose
//! `info` hangs.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::Path;
use std::process::Command;

/// A child process killed (and reaped) when dropped, so that a failed assertion leaves no
/// agent or `sleep` running behind the test.
pub struct KilledOnDrop(std::process::Child);

impl std::ops::Deref for KilledOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KilledOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `Command::spawn`, for a [`KilledOnDrop`] child.
pub trait SpawnKilledOnDrop {
    fn spawn_killed_on_drop(&mut self) -> KilledOnDrop;
}

impl SpawnKilledOnDrop for Command {
    fn spawn_killed_on_drop(&mut self) -> KilledOnDrop {
        KilledOnDrop(self.spawn().unwrap())
    }
}

/// Writes an executable connector at `path` whose `info` never answers: it writes its pid to
/// `pid_file` (whole, by a rename) and sleeps for ten minutes.
pub fn hanging_connector(path: &Path, pid_file: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(
        path,
        format!(
            "#!/bin/bash\necho $$ > '{0}.tmp'\nmv '{0}.tmp' '{0}'\nexec sleep 600\n",
            pid_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The pid a [`hanging_connector`] wrote.
pub fn pid_in(pid_file: &Path) -> i32 {
    std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
