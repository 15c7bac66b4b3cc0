//! A call's result document: in memory when small, spooled to an unlinked file in the state
//! folder when large.
//!
//! Why: results can be hundreds of MB (`list_accounts` of a large directory). An executable's
//! stdout is written to disk as it arrives once it passes [`SPOOL_THRESHOLD`], checked for JSON
//! by a streaming parser, and sent on (to the tunnel in chunks, or to an HTTP client) straight
//! from the file, so the agent holds at most a chunk of it in memory, never several copies.
//! The file is unlinked at creation: it disappears when the last handle is dropped, even if
//! the agent is killed.

use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

/// Output up to this size stays in memory; beyond it, it goes to a spool file.
pub const SPOOL_THRESHOLD: usize = 1 << 20;

/// Size of the reads used to validate and stream spooled output.
const READ_BLOCK: usize = 256 * 1024;

/// A result document, or a slice of one.
#[derive(Debug, Clone)]
pub enum ResultBody {
    /// Small: in memory.
    Memory(Bytes),
    /// Large: a range of an unlinked spool file.
    Spooled(SpooledSlice),
}

/// A range of a spool file.
#[derive(Debug, Clone)]
pub struct SpooledSlice {
    file: Arc<std::fs::File>,
    offset: u64,
    len: u64,
}

impl From<Bytes> for ResultBody {
    fn from(bytes: Bytes) -> Self {
        Self::Memory(bytes)
    }
}

impl From<Vec<u8>> for ResultBody {
    fn from(bytes: Vec<u8>) -> Self {
        Self::Memory(Bytes::from(bytes))
    }
}

impl ResultBody {
    /// The first `len` bytes of `file`, which nothing else writes to any more (a result read
    /// back from disk into an unlinked copy).
    pub fn from_file(file: std::fs::File, len: u64) -> Self {
        Self::Spooled(SpooledSlice {
            file: Arc::new(file),
            offset: 0,
            len,
        })
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Self::Memory(b) => b.len() as u64,
            Self::Spooled(s) => s.len,
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it lives in memory (and counts against memory budgets).
    pub fn in_memory(&self) -> bool {
        matches!(self, Self::Memory(_))
    }

    /// `len` bytes from `offset` (clamped to the end). Spooled reads happen on a blocking
    /// thread.
    pub async fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let end = (offset.saturating_add(len as u64)).min(self.len());
        let offset = offset.min(end);
        match self {
            Self::Memory(b) => Ok(b.slice(to_usize(offset)..to_usize(end))),
            Self::Spooled(s) => {
                let slice = s.clone();
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; to_usize(end - offset)];
                    read_exact_at(&slice.file, &mut buf, slice.offset + offset)?;
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(io::Error::other)?
            }
        }
    }

    /// The whole document in memory. For small results, tests and callers that need a value.
    pub async fn to_bytes(&self) -> io::Result<Bytes> {
        self.read_at(0, to_usize(self.len())).await
    }

    /// A sub-range of this body (no copy).
    pub fn slice(&self, start: u64, end: u64) -> Self {
        let end = end.min(self.len());
        let start = start.min(end);
        match self {
            Self::Memory(b) => Self::Memory(b.slice(to_usize(start)..to_usize(end))),
            Self::Spooled(s) => Self::Spooled(SpooledSlice {
                file: s.file.clone(),
                offset: s.offset + start,
                len: end - start,
            }),
        }
    }

    /// This body, moved out of memory into an unlinked file in `dir` (a no-op when spooled).
    /// Blocking: a body may be a megabyte. On failure the body comes back with the error.
    pub fn spill(self, dir: &Path) -> Result<Self, (Self, io::Error)> {
        use std::io::Write;
        let Self::Memory(bytes) = &self else {
            return Ok(self);
        };
        let written = tempfile::tempfile_in(dir).and_then(|mut file| {
            file.write_all(bytes)?;
            Ok(file)
        });
        match written {
            Ok(file) => Ok(Self::from_file(file, bytes.len() as u64)),
            Err(e) => Err((self, e)),
        }
    }

    /// A blocking reader over the body, for streaming parsers.
    pub fn reader(&self) -> Box<dyn Read + Send> {
        match self {
            Self::Memory(b) => Box::new(io::Cursor::new(b.clone())),
            Self::Spooled(s) => Box::new(SliceReader {
                slice: s.clone(),
                pos: 0,
            }),
        }
    }

    /// Whether the body is exactly one JSON document (surrounding whitespace allowed), checked
    /// without building it in memory. Blocking for spooled bodies: call from a blocking thread.
    pub fn is_one_json_document(&self) -> Result<(), serde_json::Error> {
        match self {
            Self::Memory(b) => serde_json::from_slice::<serde::de::IgnoredAny>(b).map(drop),
            Self::Spooled(_) => {
                let reader = io::BufReader::with_capacity(READ_BLOCK, self.reader());
                serde_json::from_reader::<_, serde::de::IgnoredAny>(reader).map(drop)
            }
        }
    }

    /// The range of the last non-blank line, if there is text before it. Blocking for
    /// spooled bodies.
    pub fn last_line(&self) -> io::Result<Option<(u64, u64)>> {
        let mut end = self.len();
        let mut block_end = end;
        let mut found_end = false;
        // Walk backwards block by block: first past trailing whitespace, then to the newline.
        while block_end > 0 {
            let block_start = block_end.saturating_sub(READ_BLOCK as u64);
            let block = self.read_blocking(block_start, block_end)?;
            for (i, byte) in block.iter().enumerate().rev() {
                let at = block_start + i as u64;
                if !found_end {
                    if !byte.is_ascii_whitespace() {
                        found_end = true;
                        end = at + 1;
                    }
                } else if *byte == b'\n' {
                    return Ok(Some((at + 1, end)));
                }
            }
            block_end = block_start;
        }
        Ok(None)
    }

    fn read_blocking(&self, start: u64, end: u64) -> io::Result<Bytes> {
        match self {
            Self::Memory(b) => Ok(b.slice(to_usize(start)..to_usize(end))),
            Self::Spooled(s) => {
                let mut buf = vec![0u8; to_usize(end - start)];
                read_exact_at(&s.file, &mut buf, s.offset + start)?;
                Ok(Bytes::from(buf))
            }
        }
    }
}

struct SliceReader {
    slice: SpooledSlice,
    pos: u64,
}

impl Read for SliceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.slice.len - self.pos;
        let want = buf.len().min(to_usize(left));
        if want == 0 {
            return Ok(0);
        }
        let n = read_at(
            &self.slice.file,
            &mut buf[..want],
            self.slice.offset + self.pos,
        )?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(unix)]
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

fn read_exact_at(file: &std::fs::File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match read_at(file, buf, offset)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Collects output: in memory up to [`SPOOL_THRESHOLD`], then in an unlinked file in `dir`.
#[derive(Debug)]
pub struct Spool {
    memory: Vec<u8>,
    file: Option<tokio::fs::File>,
    len: u64,
    dir: std::path::PathBuf,
}

impl Spool {
    /// An empty spool that spills into `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            memory: Vec::with_capacity(16 * 1024),
            file: None,
            len: 0,
            dir: dir.to_path_buf(),
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data`.
    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.file.is_none() && self.memory.len() + data.len() > SPOOL_THRESHOLD {
            self.force_file().await?;
        }
        self.len += data.len() as u64;
        match &mut self.file {
            Some(file) => file.write_all(data).await,
            None => {
                self.memory.extend_from_slice(data);
                Ok(())
            }
        }
    }

    /// Moves what is collected to a file now; later writes go there.
    async fn force_file(&mut self) -> io::Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
        // Unlinked at once (O_TMPFILE or create-then-unlink): nothing to clean up, ever.
        let dir = self.dir.clone();
        let std_file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir))
            .await
            .map_err(io::Error::other)??;
        let mut file = tokio::fs::File::from_std(std_file);
        file.write_all(&std::mem::take(&mut self.memory)).await?;
        self.file = Some(file);
        Ok(())
    }

    /// The collected output.
    pub async fn finish(self) -> io::Result<ResultBody> {
        match self.file {
            None => Ok(ResultBody::Memory(Bytes::from(self.memory))),
            Some(mut file) => {
                file.flush().await?;
                let file = file.into_std().await;
                Ok(ResultBody::Spooled(SpooledSlice {
                    file: Arc::new(file),
                    offset: 0,
                    len: self.len,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn spooled(text: &[u8]) -> ResultBody {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::new(dir.path());
        // Force the file path whatever the size: fill past the threshold in two writes.
        let pad = vec![b' '; SPOOL_THRESHOLD];
        spool.write(&pad).await.unwrap();
        spool.write(text).await.unwrap();
        let body = spool.finish().await.unwrap();
        assert!(!body.in_memory());
        // No file is left in the folder: the spool is unlinked.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        body.slice(SPOOL_THRESHOLD as u64, u64::MAX)
    }

    #[tokio::test]
    async fn spooled_and_memory_bodies_read_the_same() {
        let text = b"log line\n{\"response\": [1, 2, 3]}\n  ";
        for body in [ResultBody::from(text.to_vec()), spooled(text).await] {
            assert_eq!(body.len(), text.len() as u64);
            assert_eq!(&body.to_bytes().await.unwrap()[..], text);
            assert_eq!(&body.read_at(9, 4).await.unwrap()[..], b"{\"re");
            assert!(body.is_one_json_document().is_err());
            let (start, end) = body.last_line().unwrap().unwrap();
            let line = body.slice(start, end);
            assert_eq!(
                &line.to_bytes().await.unwrap()[..],
                b"{\"response\": [1, 2, 3]}"
            );
            assert!(line.is_one_json_document().is_ok());
        }
    }

    /// The last non-blank line's range, if a newline comes before it, found the plain way.
    fn last_line_by_model(text: &[u8]) -> Option<(u64, u64)> {
        let end = text.iter().rposition(|b| !b.is_ascii_whitespace())? + 1;
        let start = text[..end].iter().rposition(|b| *b == b'\n')? + 1;
        Some((start as u64, end as u64))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// The last line of a connector's output (its answer after log lines) is found the
        /// same in memory and in a file, wherever it falls against the file's read blocks: the
        /// line and the blank after it are each around a multiple of the block's size.
        #[test]
        fn the_last_line_is_found_wherever_it_falls_against_the_read_blocks(
            head in proptest::collection::vec(proptest::sample::select(vec![b'x', b' ', b'\n']), 0..8),
            newline in proptest::prelude::any::<bool>(),
            // From the end of the line's newline to the end of the output.
            after in proptest::prop_oneof![0usize..3, READ_BLOCK - 3..READ_BLOCK + 3, 2 * READ_BLOCK - 2..2 * READ_BLOCK + 2],
            blank in proptest::prop_oneof![0usize..3, READ_BLOCK - 3..READ_BLOCK + 3],
        ) {
            let mut text = head;
            if newline {
                text.push(b'\n');
            }
            let blank = blank.min(after);
            text.extend(std::iter::repeat_n(b'x', after - blank));
            text.extend(std::iter::repeat_n(b' ', blank));
            let expected = last_line_by_model(&text);
            let file = tempfile::tempfile().unwrap();
            std::io::Write::write_all(&mut &file, &text).unwrap();
            for body in [ResultBody::from(text.clone()), ResultBody::from_file(file.try_clone().unwrap(), text.len() as u64)] {
                proptest::prop_assert_eq!(body.last_line().unwrap(), expected);
            }
        }
    }

    #[tokio::test]
    async fn a_single_line_has_no_last_line_before_it() {
        for body in [ResultBody::from(b"  {}\n".to_vec()), spooled(b"{}\n").await] {
            let found = body.last_line().unwrap();
            // The spooled one has the padding's spaces before it but no newline.
            assert!(found.is_none(), "{found:?}");
        }
    }
}
