//! A child process killed (and reaped) when dropped. One file, compiled into the agent's own
//! tests (`agent/tests/support`) and the integration harness (`tests/src/lib.rs`), which cannot
//! depend on each other.

/// A child process (a real `lumos-agent`, a `sleep`) killed and reaped when dropped, so that a
/// test that fails part way leaves nothing running. Derefs to the `Child`.
#[derive(Debug)]
pub struct KilledOnDrop(std::process::Child);

impl KilledOnDrop {
    /// Spawns `command`.
    #[allow(
        clippy::unwrap_used,
        reason = "tests: a child that cannot start fails the test"
    )]
    pub fn spawn(command: &mut std::process::Command) -> Self {
        Self(command.spawn().unwrap())
    }
}

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
