//! The README's reference parts (the exit codes, the error codes, the configuration keys, the
//! command line, the metrics), for the unit tests that hold each of them to the code. One
//! reader of the Markdown, so the tests agree on what a table or a block is.

/// The README, as built into the tests.
pub const TEXT: &str = include_str!("../../README.md");

/// The README from `marker` on; a test whose part is gone fails here, naming it.
pub fn from(marker: &str) -> &'static str {
    let at = TEXT
        .find(marker)
        .unwrap_or_else(|| panic!("README.md has no {marker:?}"));
    &TEXT[at..]
}

/// The body rows of the first table at or after `marker` (which may be in its header row),
/// header and separator left out: each row's cells, trimmed and without code quotes around
/// them.
pub fn table_rows(marker: &str) -> Vec<Vec<String>> {
    let at = TEXT
        .find(marker)
        .unwrap_or_else(|| panic!("README.md has no {marker:?}"));
    let line_start = TEXT[..at].rfind('\n').map_or(0, |newline| newline + 1);
    TEXT[line_start..]
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2)
        .map(|row| {
            // `\|` is a pipe inside a cell, not a border.
            let row = row.trim_end().replace("\\|", "\0");
            let cells = row.trim_end_matches('|').split('|').skip(1);
            cells
                .map(|cell| cell.replace('\0', "|").trim().trim_matches('`').to_string())
                .collect()
        })
        .collect()
}

/// The bodies of the fenced blocks of `lang` (```` ```toml ````) in `text`, in order.
pub fn fenced_blocks<'a>(text: &'a str, lang: &str) -> Vec<&'a str> {
    let fence = format!("```{lang}\n");
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&fence) {
        let body = &rest[start + fence.len()..];
        let end = body.find("```").expect("a fenced block without its end");
        blocks.push(&body[..end]);
        rest = &body[end..];
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_blocks_are_found() {
        let rows = table_rows("Exit codes:");
        assert_eq!(rows[0][0], "0", "{rows:?}");
        // A cell with an escaped pipe is one cell, the pipe in it.
        assert!(rows.iter().all(|row| row.len() == 2), "{rows:?}");
        assert!(rows
            .iter()
            .any(|row| row[1].contains("connectors | head -1")));
        let toml = fenced_blocks(TEXT, "toml");
        assert!(toml.len() >= 2 && toml.iter().all(|b| !b.contains("```")));
    }
}
