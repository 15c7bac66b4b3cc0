//! Process exit codes. Documented in README.md; scripts and service managers rely on them.

/// Success; for `call`, the connector answered without an error.
pub const OK: u8 = 0;
/// `call` got an answer that is an error (the connector's or the agent's); the JSON is printed.
pub const CALL_ERROR: u8 = 1;
/// Bad command-line usage (clap's own code).
pub const USAGE: u8 = 2;
/// The configuration is invalid; every problem was printed.
pub const CONFIG: u8 = 3;
/// The agent could not start (state folder, tenant store, listen address).
pub const STARTUP: u8 = 4;
/// The CLI could not reach the agent's API.
pub const UNREACHABLE: u8 = 5;
/// The CLI has no token to send (its file is missing, unreadable or empty), or the API
/// refused it.
pub const UNAUTHORIZED: u8 = 6;
/// The agent quit at once on a second stop signal, or the drain grace ran out.
pub const FORCED_STOP: u8 = 7;
/// `doctor` found something wrong; every line marked FAIL says what.
pub const CHECK_FAILED: u8 = 8;
/// A command's output could not be written (a full disk, say; not a reader that went away,
/// as in `… | head`, which ends the command quietly with success).
pub const OUTPUT: u8 = 9;
/// A supervised task failed (a bug); the agent stopped in order.
pub const INTERNAL: u8 = 70;

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// Scripts and service managers read the README's table: it lists every code this module
    /// defines, and no other.
    #[test]
    fn the_readme_lists_exactly_these_codes() {
        let defined: BTreeSet<u8> = include_str!("exit.rs")
            .lines()
            .filter_map(|line| line.strip_prefix("pub const ")?.split_once(": u8 = "))
            .map(|(_, value)| value.trim_end_matches(';').parse().unwrap())
            .collect();
        assert!(defined.contains(&super::INTERNAL), "{defined:?}");
        let documented: BTreeSet<u8> = crate::readme::table_rows("Exit codes:")
            .iter()
            .map(|row| row[0].parse().unwrap())
            .collect();
        assert_eq!(documented, defined);
    }
}
