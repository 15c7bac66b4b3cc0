//! The plugin worker: `lumos-agent plugin-host <LIBRARY>`, the agent binary re-executed to host
//! one native connector in its own process, so a crash, abort or segfault in the plugin kills
//! only the worker.
//!
//! It loads the library, checks its header, starts it, sends HELLO, then serves CALL and CANCEL
//! frames from stdin and sends COMPLETE and LOG frames on what was stdout. It exits when stdin
//! closes (the agent stopped or died) or when the agent dies (parent-death signal).

use std::cell::Cell;
use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use lumos_connector_abi::ffi::{log_level, status};
use lumos_connector_abi::host::{HostCallbacks, Library};
use serde_json::json;

use super::frame;

/// Largest frame the worker reads from the agent (the envelope of one call).
const MAX_INBOUND_FRAME: u32 = 256 << 20;

type FrameWriter = Arc<Mutex<BufWriter<std::fs::File>>>;

thread_local! {
    /// True on the dispatch thread while it runs start_call: completions made there are flushed
    /// by the dispatch loop once no more calls are queued, so a burst costs one write, not one
    /// per call. Completions from the plugin's own threads are flushed at once.
    static DISPATCHING: Cell<bool> = const { Cell::new(false) };
}

fn send(writer: &FrameWriter, kind: u8, parts: &[&[u8]]) {
    let mut w = writer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let written = w.write_all(&frame::encode(kind, parts));
    let flushed = if DISPATCHING.with(Cell::get) {
        Ok(())
    } else {
        w.flush()
    };
    if written.and(flushed).is_err() {
        // The agent is gone: nothing to serve.
        std::process::exit(0);
    }
}

fn flush(writer: &FrameWriter) {
    let mut w = writer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if w.flush().is_err() {
        std::process::exit(0);
    }
}

struct WorkerCallbacks {
    writer: FrameWriter,
    in_flight: Mutex<HashSet<u64>>,
}

impl HostCallbacks for WorkerCallbacks {
    fn complete(&self, call_id: u64, status: u32, output: &[u8]) {
        let first = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&call_id);
        if first {
            send(
                &self.writer,
                frame::COMPLETE,
                &[&call_id.to_le_bytes(), &status.to_le_bytes(), output],
            );
        } else {
            let message = format!(
                "the plugin completed call {call_id} again (or a call it never had); ignored"
            );
            send(
                &self.writer,
                frame::LOG,
                &[&log_level::WARN.to_le_bytes(), message.as_bytes()],
            );
        }
    }

    fn log(&self, level: u32, message: &[u8]) {
        send(&self.writer, frame::LOG, &[&level.to_le_bytes(), message]);
    }
}

/// The worker's frame channel: a private copy of stdout. On Unix, fd 1 then becomes stderr, so
/// a plugin that prints can never corrupt the protocol. Windows has no safe way to rebind the
/// C runtime's stdout; there a plugin that prints to stdout breaks its frames, and the agent
/// restarts the worker with a clear reason.
fn frame_output() -> Result<std::fs::File, String> {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        let frames = nix::unistd::dup(std::io::stdout().as_fd())
            .map_err(|e| format!("cannot duplicate stdout: {e}"))?;
        nix::unistd::dup2_stdout(std::io::stderr().as_fd())
            .map_err(|e| format!("cannot redirect stdout: {e}"))?;
        Ok(std::fs::File::from(frames))
    }
    #[cfg(windows)]
    {
        use std::os::windows::io::AsHandle;
        let handle = std::io::stdout()
            .as_handle()
            .try_clone_to_owned()
            .map_err(|e| format!("cannot duplicate stdout: {e}"))?;
        Ok(std::fs::File::from(handle))
    }
}

/// Runs the worker; returns the process exit code.
pub fn main(library: &Path) -> u8 {
    // If the agent dies, even by SIGKILL, the worker goes with it.
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);

    let writer: FrameWriter = match frame_output() {
        Ok(file) => Arc::new(Mutex::new(BufWriter::new(file))),
        Err(e) => {
            eprintln!("plugin-host: {e}");
            return 4;
        }
    };

    let lib = match Library::load(library) {
        Ok(lib) => lib,
        Err(e) => {
            send(&writer, frame::LOAD_ERROR, &[e.to_string().as_bytes()]);
            return 3;
        }
    };
    let callbacks = Arc::new(WorkerCallbacks {
        writer: writer.clone(),
        in_flight: Mutex::new(HashSet::new()),
    });
    let instance = match lib.start(callbacks.clone()) {
        Ok(instance) => instance,
        Err(e) => {
            send(&writer, frame::LOAD_ERROR, &[e.to_string().as_bytes()]);
            return 3;
        }
    };
    let info: serde_json::Value = match serde_json::from_slice(&instance.info()) {
        Ok(info) => info,
        Err(e) => {
            send(
                &writer,
                frame::LOAD_ERROR,
                &[format!("the connector's info is not JSON: {e}").as_bytes()],
            );
            return 3;
        }
    };
    let hello = json!({
        "id": lib.id(),
        "version": lib.version(),
        "build_info": lib.build_info(),
        "abi_minor": lib.abi_minor(),
        "info": info,
    });
    send(&writer, frame::HELLO, &[hello.to_string().as_bytes()]);

    let mut stdin = BufReader::with_capacity(64 * 1024, std::io::stdin().lock());
    loop {
        if stdin.buffer().is_empty() {
            // About to wait for the agent: everything answered so far goes out now.
            flush(&writer);
        }
        let frame = match frame::read_blocking(&mut stdin, MAX_INBOUND_FRAME) {
            Ok(Some(frame)) => frame,
            // The agent closed our stdin: it is stopping. Calls still running are abandoned.
            Ok(None) => return 0,
            Err(e) => {
                eprintln!("plugin-host: bad frame from the agent: {e}");
                return 5;
            }
        };
        match frame.kind {
            frame::CALL => {
                let Some(call) = frame::decode_call(&frame.payload) else {
                    eprintln!("plugin-host: malformed CALL frame");
                    continue;
                };
                callbacks
                    .in_flight
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(call.call_id);
                DISPATCHING.with(|d| d.set(true));
                let accepted = instance.start_call(
                    call.call_id,
                    &call.capability,
                    &call.input,
                    call.deadline_unix_ms,
                );
                DISPATCHING.with(|d| d.set(false));
                if !accepted {
                    let refused = b"{\"is_error\":true,\"error\":{\"message\":\"the connector refused the call\",\"error_code\":\"agent.connector_refused\"}}";
                    callbacks.complete(call.call_id, status::ERROR, refused);
                }
            }
            frame::CANCEL => {
                if let Some(call_id) = frame::decode_cancel(&frame.payload) {
                    instance.cancel(call_id);
                }
            }
            other => eprintln!("plugin-host: unexpected frame kind {other}"),
        }
    }
}
