//! One stream to the cloud: Hello → Welcome, then inventory, calls, results, acks, cancels and
//! heartbeats until the stream dies, the cloud goes silent, or the agent stops.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lumos_agent_proto::v1::agent_tunnel_client::AgentTunnelClient;
use lumos_agent_proto::v1::{
    self as pb, agent_message, cloud_message, AgentMessage, CallStatus, CloudMessage,
};
use std::future::Future as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::calls::{Admission, Outcome, Queued, StoredResult};
use super::{TunnelContext, TunnelParts};
use crate::config::OperationMode;
use crate::dispatch::{CallBody, CallRequest};
use crate::error::{CallError, ErrorCode};
use crate::output::ResultBody;
use crate::plugins::{ConnectorKind, ConnectorStatus, Inventory};

/// Heartbeat interval when the cloud's Welcome names none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// Chunk size when the cloud's Welcome names none.
const DEFAULT_CHUNK: usize = 1 << 20;
/// Largest chunk ever sent, whatever the cloud asks: under gRPC's 4 MiB default with room for
/// the message's other fields.
const MAX_CHUNK: usize = (4 << 20) - (64 << 10);
/// Smallest chunk, so a bogus Welcome cannot make a result a million messages.
const MIN_CHUNK: usize = 1024;
/// Messages read from the stream in one go before the session looks at its other duties
/// (heartbeats, stop, inventory) and starts the calls read.
const MAX_BURST: usize = 128;
/// How long the session runs a burst's calls itself before it hands the rest to another task
/// (see `Session::start_batch`). Tuned on the tunnel benchmark: 30 µs and 75 µs were slower.
const INLINE_BUDGET: Duration = Duration::from_micros(50);

/// How a stream that was welcomed ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The agent stopped (quit, or drained with every result delivered).
    Finished,
    /// The stream broke or went silent: reconnect.
    Lost(String),
}

/// Why a stream was never welcomed.
#[derive(Debug)]
pub enum SessionError {
    /// UNAUTHENTICATED or PERMISSION_DENIED.
    Unauthorized(String),
    /// Anything else.
    Failed(String),
}

/// A call request being assembled from its chunks.
struct Partial {
    app_id: String,
    capability: String,
    tenant_id: String,
    deadline_ms: u64,
    next_seq: u32,
    /// May hold credentials: zeroized when dropped, parsed or not.
    payload: zeroize::Zeroizing<Vec<u8>>,
}

/// Runs one stream over `channel`.
pub async fn run(
    ctx: &TunnelContext,
    channel: Channel,
    token: &str,
) -> Result<SessionEnd, SessionError> {
    let (control_tx, control_rx) = mpsc::channel::<AgentMessage>(64);
    control_tx
        .try_send(message(agent_message::Message::Hello(hello(ctx))))
        .map_err(|_| SessionError::Failed("internal: cannot queue Hello".into()))?;
    // Results are attached once the cloud has welcomed this stream (see below); until then the
    // outbound stream carries control messages only.
    let (results_tx, results_rx) = tokio::sync::oneshot::channel();
    let outbound = Outbound {
        control: control_rx,
        pending_results: Some(results_rx),
        results: None,
        chunk: DEFAULT_CHUNK,
        current: None,
    };

    let mut request = tonic::Request::new(outbound);
    let mut bearer =
        tonic::metadata::MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            SessionError::Failed("the agent token holds characters not allowed in a header".into())
        })?;
    bearer.set_sensitive(true);
    request.metadata_mut().insert("authorization", bearer);

    let mut client = AgentTunnelClient::new(channel)
        .max_decoding_message_size(MAX_CHUNK + (1 << 20))
        .max_encoding_message_size(MAX_CHUNK + (1 << 20));
    let timeout = ctx.cloud.connect_timeout;
    let response = tokio::time::timeout(timeout, client.connect(request))
        .await
        .map_err(|_| SessionError::Failed(format!("the cloud did not answer within {timeout:?}")))?
        .map_err(status_error)?;
    let mut inbound = response.into_inner();
    let welcome = match tokio::time::timeout(timeout, inbound.message()).await {
        Err(_) => {
            return Err(SessionError::Failed(format!(
                "no Welcome within {timeout:?}"
            )))
        }
        Ok(Err(status)) => return Err(status_error(status)),
        Ok(Ok(None)) => {
            return Err(SessionError::Failed(
                "the cloud closed the stream before its Welcome".into(),
            ))
        }
        Ok(Ok(Some(CloudMessage {
            message: Some(cloud_message::Message::Welcome(welcome)),
        }))) => welcome,
        Ok(Ok(Some(_))) => {
            return Err(SessionError::Failed(
                "the cloud's first message was not a Welcome".into(),
            ))
        }
    };
    let heartbeat = match welcome.heartbeat_interval_ms {
        0 => DEFAULT_HEARTBEAT,
        ms => Duration::from_millis(u64::from(ms)).max(Duration::from_millis(50)),
    };
    let chunk = match welcome.max_chunk_size {
        0 => DEFAULT_CHUNK,
        n => usize::try_from(n)
            .unwrap_or(MAX_CHUNK)
            .clamp(MIN_CHUNK, MAX_CHUNK),
    };
    ctx.set_status(super::CloudStatus::Connected);
    tracing::info!(
        session_id = %welcome.session_id,
        heartbeat_ms = heartbeat.as_millis() as u64,
        chunk_bytes = chunk,
        "connected to the Lumos cloud"
    );

    let mut session = Session {
        ctx,
        control: control_tx,
        stall_limit: heartbeat * 3,
        partials: HashMap::new(),
        refused: RefusedCalls::new(ctx.cloud.max_concurrent_calls.saturating_mul(2)),
        batch: std::sync::Mutex::default(),
    };
    let mut inventory = ctx.parts.registry.subscribe();
    let snapshot = inventory.borrow_and_update().clone();
    if let Err(reason) = session.send_control(inventory_message(&snapshot)).await {
        return Ok(SessionEnd::Lost(reason));
    }

    // Every unacknowledged result goes out again on this stream, then each new one.
    if results_tx.send((ctx.parts.table.attach(), chunk)).is_err() {
        return Ok(SessionEnd::Lost("the stream closed".into()));
    }

    // Credential updates the cloud has not acknowledged go out again on this stream too.
    let store = ctx.parts.dispatcher.tenants().clone();
    // Subscribed before the first send: an update added meanwhile is seen as a change.
    let mut updates = store.updates.subscribe();
    let mut updates_sent = HashSet::new();
    if let Err(reason) = session.send_updates(&store, &mut updates_sent).await {
        return Ok(SessionEnd::Lost(reason));
    }

    let mut last_heard = Instant::now();
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_announced = false;
    loop {
        // Made before `idle` is checked: a `Notified` hears every `notify_waiters` from its
        // making on, so the table emptying between the check and the wait still wakes this
        // loop. (Today only this loop's own acks empty it, and it checks again after them.)
        let emptied = ctx.parts.table.emptied.notified();
        if ctx.parts.draining.is_cancelled() {
            if !drain_announced {
                drain_announced = true;
                let in_flight = u32::try_from(ctx.parts.table.running()).unwrap_or(u32::MAX);
                tracing::info!(in_flight, "telling the cloud this agent is draining");
                let draining = message(agent_message::Message::Draining(pb::Draining {
                    grace_ms: u64::try_from(ctx.parts.config.get().calls.drain_grace.as_millis())
                        .unwrap_or(u64::MAX),
                    in_flight,
                }));
                if let Err(reason) = session.send_control(draining).await {
                    return Ok(SessionEnd::Lost(reason));
                }
            }
            if super::idle(&ctx.parts.table) {
                tracing::info!("every result is delivered; closing the tunnel");
                return Ok(SessionEnd::Finished);
            }
        }
        tokio::select! {
            biased;
            () = ctx.stop.cancelled() => return Ok(SessionEnd::Finished),
            received = inbound.message() => {
                // The rest of the burst already read comes too (bounded, so that a cloud that
                // never pauses cannot starve the heartbeat and stop checks); then the calls of
                // the burst start together.
                let mut received = received;
                let mut read = 0;
                let ended = loop {
                    match received {
                        Ok(Some(msg)) => {
                            last_heard = Instant::now();
                            session.handle(msg);
                        }
                        Ok(None) => break Some("the cloud closed the stream".to_string()),
                        Err(status) => break Some(format!("the stream failed: {}", describe_status(&status))),
                    }
                    read += 1;
                    if read == MAX_BURST {
                        break None;
                    }
                    match futures_util::FutureExt::now_or_never(inbound.message()) {
                        Some(next) => received = next,
                        None => break None,
                    }
                };
                session.start_batch();
                if let Some(reason) = ended {
                    return Ok(SessionEnd::Lost(reason));
                }
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() >= heartbeat * 3 {
                    return Ok(SessionEnd::Lost(format!(
                        "nothing from the cloud for {:?} (3 heartbeat intervals)",
                        last_heard.elapsed()
                    )));
                }
                // Never wait on a full queue for a heartbeat: a full queue is traffic enough.
                let _ = session.control.try_send(message(agent_message::Message::Heartbeat(now_heartbeat())));
            }
            Ok(()) = inventory.changed() => {
                let snapshot = inventory.borrow_and_update().clone();
                tracing::info!(revision = snapshot.revision, "sending the new inventory to the cloud");
                if let Err(reason) = session.send_control(inventory_message(&snapshot)).await {
                    return Ok(SessionEnd::Lost(reason));
                }
            }
            Ok(()) = updates.changed() => {
                if let Err(reason) = session.send_updates(&store, &mut updates_sent).await {
                    return Ok(SessionEnd::Lost(reason));
                }
            }
            () = ctx.parts.draining.cancelled(), if !drain_announced => {}
            () = emptied, if drain_announced => {}
        }
    }
}

struct Session<'a> {
    ctx: &'a TunnelContext,
    control: mpsc::Sender<AgentMessage>,
    /// How long a message may wait for room on the stream before the stream counts as dead.
    stall_limit: Duration,
    partials: HashMap<String, Partial>,
    /// Calls whose chunks were refused: their later chunks are dropped until the last one.
    refused: RefusedCalls,
    /// Calls admitted from the current burst of messages, started together by `start_batch`.
    /// (In a mutex only so that `&Session` is `Send`; used through `get_mut`, never locked.)
    batch: std::sync::Mutex<Vec<BoxedCall>>,
}

type BoxedCall = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Session<'_> {
    /// Queues a control message. A queue that stays full for 3 heartbeat intervals means the
    /// cloud stopped reading: the stream is dead, and waiting on it would stall the session
    /// loop (and with it the silence check) for ever.
    async fn send_control(&self, msg: AgentMessage) -> Result<(), String> {
        match tokio::time::timeout(self.stall_limit, self.control.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("the stream closed".into()),
            Err(_) => Err(format!(
                "the cloud took nothing for {:?} (3 heartbeat intervals)",
                self.stall_limit
            )),
        }
    }

    /// Sends every pending credential update not yet sent on this stream.
    async fn send_updates(
        &self,
        store: &crate::tenants::TenantStore,
        sent: &mut HashSet<String>,
    ) -> Result<(), String> {
        for update in store.pending_updates() {
            if !sent.insert(update.update_id.clone()) {
                continue;
            }
            tracing::info!(update_id = %update.update_id, tenant_id = %update.tenant_id, credential = %update.credential_id, status = %update.status, "sending a credential update to the cloud");
            let msg = message(agent_message::Message::CredentialUpdate(
                pb::CredentialUpdate {
                    update_id: update.update_id,
                    tenant_id: update.tenant_id,
                    credential_id: update.credential_id,
                    credential: update.credential.expose().as_bytes().to_vec().into(),
                    issued_at_ms: update.issued_at_ms,
                    status: update.status,
                },
            ));
            self.send_control(msg).await?;
        }
        Ok(())
    }

    /// Not async, nor anything it calls: a future per message would be kilobytes moved for
    /// every call, and nothing here needs to wait.
    fn handle(&mut self, msg: CloudMessage) {
        match msg.message {
            Some(cloud_message::Message::CallRequest(chunk)) => self.on_chunk(chunk),
            Some(cloud_message::Message::ResultAck(ack)) => {
                if self.ctx.parts.table.acknowledge(&ack.call_id) {
                    return;
                }
                let store = self.ctx.parts.dispatcher.tenants().clone();
                if !store.has_pending_update(&ack.call_id) {
                    tracing::debug!(call_id = %ack.call_id, "ack for a result this agent does not hold (already acknowledged)");
                    return;
                }
                // Forgetting the update rewrites the tenant store (an fsync): not on the
                // session's loop, which would stop reading the stream meanwhile.
                tokio::task::spawn_blocking(move || match store.acknowledge_update(&ack.call_id) {
                    Ok(true) => {
                        tracing::debug!(update_id = %ack.call_id, "the cloud stored a credential update")
                    }
                    Ok(false) => {
                        tracing::debug!(update_id = %ack.call_id, "credential update already forgotten")
                    }
                    // Kept, so it is sent again: the cloud stores the same update twice, harmlessly.
                    Err(e) => {
                        tracing::error!(update_id = %ack.call_id, "cannot forget an acknowledged credential update: {e}")
                    }
                });
            }
            Some(cloud_message::Message::Cancel(cancel)) => {
                if self.ctx.parts.table.cancel(&cancel.call_id) {
                    tracing::info!(call_id = %cancel.call_id, "call cancelled by the cloud");
                } else {
                    tracing::debug!(call_id = %cancel.call_id, "cancel for a call that is not running (finished or unknown): nothing to do");
                }
                // A call still being received is dropped too, and one being refused is done
                // with: its next chunks are a new call.
                self.partials.remove(&cancel.call_id);
                self.refused.remove(&cancel.call_id);
            }
            Some(cloud_message::Message::Heartbeat(_)) => {}
            Some(cloud_message::Message::Welcome(_)) => {
                tracing::debug!("a second Welcome on one stream was ignored");
            }
            // A message kind newer than this agent: ignored, per the protocol's versioning.
            None => tracing::debug!("an empty or unknown cloud message was ignored"),
        }
    }

    fn on_chunk(&mut self, mut chunk: pb::CallRequest) {
        // The chunk's strings move into the call: no copies.
        let call_id = std::mem::take(&mut chunk.call_id);
        if call_id.is_empty() {
            tracing::warn!("a CallRequest without call_id was ignored: there is no id to answer");
            return;
        }
        if self.refused.contains(&call_id) {
            // The rest of a refused call is dropped up to its last chunk. A chunk 0 is the call
            // sent again (the refusal said to): it starts afresh, not dropped with the rest.
            if chunk.seq != 0 {
                if chunk.last {
                    self.refused.remove(&call_id);
                }
                return;
            }
            self.refused.remove(&call_id);
        }
        let max_request = self.ctx.cloud.max_request_bytes;
        let partial = match self.partials.remove(&call_id) {
            None if chunk.seq == 0 => {
                if self.partials.len() >= self.ctx.cloud.max_concurrent_calls.saturating_mul(2) {
                    return self.refuse(
                        &call_id,
                        (&chunk.app_id, &chunk.capability),
                        chunk.last,
                        busy(self.ctx.cloud.max_concurrent_calls),
                    );
                }
                Partial {
                    app_id: std::mem::take(&mut chunk.app_id),
                    capability: std::mem::take(&mut chunk.capability),
                    tenant_id: std::mem::take(&mut chunk.tenant_id),
                    deadline_ms: chunk.deadline_ms,
                    next_seq: 1,
                    payload: zeroize::Zeroizing::new(chunk.payload.to_vec()),
                }
            }
            None => {
                let err = CallError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "chunk {} of call {call_id} arrived without chunk 0; send the call again",
                        chunk.seq
                    ),
                );
                return self.refuse(
                    &call_id,
                    (&chunk.app_id, &chunk.capability),
                    chunk.last,
                    err,
                );
            }
            Some(mut partial) => {
                if chunk.seq != partial.next_seq {
                    let err = CallError::new(
                        ErrorCode::BadRequest,
                        format!(
                            "chunk {} of call {call_id} arrived, expected {}; send the call again",
                            chunk.seq, partial.next_seq
                        ),
                    );
                    return self.refuse(
                        &call_id,
                        (&partial.app_id, &partial.capability),
                        chunk.last,
                        err,
                    );
                }
                partial.next_seq += 1;
                partial.payload.extend_from_slice(&chunk.payload);
                partial
            }
        };
        if partial.payload.len() as u64 > max_request {
            let err = CallError::new(
                ErrorCode::BadRequest,
                format!("the payload of call {call_id} is over {max_request} bytes (cloud.max_request_bytes)"),
            );
            return self.refuse(
                &call_id,
                (&partial.app_id, &partial.capability),
                chunk.last,
                err,
            );
        }
        if chunk.last {
            self.start(call_id, partial);
        } else {
            self.partials.insert(call_id, partial);
        }
    }

    /// Answers a call with an error without running it. The result is stored like any other
    /// (and acknowledged like any other); the call may be sent again and then run.
    /// `last`: whether the refused chunk was its call's last (later ones are dropped quietly).
    fn refuse(&mut self, call_id: &str, call: (&str, &str), last: bool, err: CallError) {
        let (app_id, capability) = call;
        if !last {
            self.refused.insert(call_id);
        }
        self.partials.remove(call_id);
        let app_id = (!app_id.is_empty()).then_some(app_id);
        store_refusal(&self.ctx.parts, call_id, app_id, capability, &err);
    }

    fn start(&mut self, call_id: String, partial: Partial) {
        let ctx = self.ctx;
        let app_id = Some(partial.app_id.as_str()).filter(|a| !a.is_empty());
        if ctx.parts.draining.is_cancelled() {
            let err = CallError::new(
                ErrorCode::ShuttingDown,
                "this agent is shutting down and takes no new calls; send it to another agent of the cluster",
            );
            return store_refusal(&ctx.parts, &call_id, app_id, &partial.capability, &err);
        }
        let token = match ctx
            .parts
            .table
            .admit(&call_id, ctx.cloud.max_concurrent_calls)
        {
            Admission::Run(token) => token,
            Admission::AlreadyRunning => {
                tracing::info!(%call_id, "call already running: its result follows when ready, it is not run twice");
                return;
            }
            Admission::Resent => {
                tracing::info!(%call_id, "call already ran: sending its stored result again, not running it twice");
                return;
            }
            Admission::Acknowledged => {
                let err = CallError::new(
                    ErrorCode::DuplicateCall,
                    format!("call {call_id} already ran on this agent and its result was acknowledged; it is not run twice"),
                );
                tracing::warn!(%call_id, "{}", err.message);
                // Not stored (the cloud already holds this call's result), and never waited
                // for: a full queue means a stalled stream, which the silence check ends.
                let notice = message(agent_message::Message::CallResult(pb::CallResult {
                    call_id: call_id.clone(),
                    seq: 0,
                    data: Bytes::from(err.to_json_bytes(app_id)),
                    last: true,
                    status: CallStatus::AgentError as i32,
                }));
                if self.control.try_send(notice).is_err() {
                    tracing::warn!(%call_id, "the duplicate-call notice was dropped: the stream is stalled");
                }
                return;
            }
            Admission::Busy => {
                return store_refusal(
                    &ctx.parts,
                    &call_id,
                    app_id,
                    &partial.capability,
                    &busy(ctx.cloud.max_concurrent_calls),
                )
            }
        };
        let dispatcher = ctx.parts.dispatcher.clone();
        let table = ctx.parts.table.clone();
        let call = Box::pin(async move {
            let (outcome, body) = match parse_call(partial) {
                Err((err, app_id)) => (
                    Outcome::AgentError,
                    ResultBody::from(err.to_json_bytes(Some(&app_id))),
                ),
                Ok(request) => match dispatcher.call(&request, &token).await {
                    Ok(answer) => (Outcome::Answered, answer.json),
                    Err(err) => (
                        Outcome::AgentError,
                        ResultBody::from(err.to_json_bytes(Some(&request.app_id))),
                    ),
                },
            };
            table.finish(&call_id, outcome, body, true).await;
        });
        self.batch_mut().push(call);
    }

    fn batch_mut(&mut self) -> &mut Vec<BoxedCall> {
        self.batch
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts the calls of the last burst of messages. The session polls them once in place
    /// (an in-process connector's answer is usually ready at once) until it has spent
    /// [`INLINE_BUDGET`] on them; the rest of the burst is shared out among tasks, one per
    /// other worker of the runtime, each polling its share once in place. A call that has to
    /// wait (a worker, an executable, a slow connector) gets a task of its own. Cheap calls
    /// thus cost no task and no hop between threads, and costly ones still spread over the
    /// workers: a task per call, or calls dealt out to a task per worker up front, cost a third
    /// more CPU per call on the tunnel benchmark (wake-ups, and the workers contending for the
    /// call table), while running every call here leaves the other workers idle while the
    /// session works through a burst. The budget also bounds how long the session's loop
    /// (heartbeats, cancels, acks) waits on a burst.
    fn start_batch(&mut self) {
        // The burst's calls are on disk before any of them runs (and its acks with them).
        self.ctx.parts.table.flush_journal();
        let calls = std::mem::take(self.batch_mut());
        let started = std::time::Instant::now();
        let mut calls = calls.into_iter();
        for mut call in calls.by_ref() {
            if futures_util::FutureExt::now_or_never(&mut call).is_none() {
                self.ctx.parts.tracker.spawn(call);
            }
            if started.elapsed() >= INLINE_BUDGET {
                break;
            }
        }
        let rest = calls.len();
        if rest == 0 {
            return;
        }
        // With two workers (the benchmark's) one task; with more, calls that each take long
        // (an in-process connector doing real work in `start_call`) still run side by side.
        let others = tokio::runtime::Handle::current()
            .metrics()
            .num_workers()
            .saturating_sub(1)
            .max(1);
        let share = rest.div_ceil(others);
        while calls.len() > 0 {
            let group: Vec<BoxedCall> = calls.by_ref().take(share).collect();
            let tracker = self.ctx.parts.tracker.clone();
            self.ctx.parts.tracker.spawn(async move {
                for mut call in group {
                    if futures_util::FutureExt::now_or_never(&mut call).is_none() {
                        tracker.spawn(call);
                    }
                }
            });
        }
    }
}

/// The calls refused part-way whose remaining chunks are dropped quietly, up to their last.
///
/// Bounded, like the calls being received: a cloud that abandons refused calls (never sends
/// their last chunk nor a Cancel) would otherwise grow it until the stream ends. Past the
/// bound the oldest is forgotten, which is harmless: its next chunk, arriving without chunk 0,
/// is refused again and the id remembered anew. While the first refusal is unacknowledged it
/// stands (a call id has one result); after, the cloud gets a second refusal of a call it
/// has given up on.
struct RefusedCalls {
    /// Each id with the order it was refused in, to forget the oldest first.
    ids: HashMap<String, u64>,
    next: u64,
    bound: usize,
}

impl RefusedCalls {
    fn new(bound: usize) -> Self {
        Self {
            ids: HashMap::new(),
            next: 0,
            bound: bound.max(1),
        }
    }

    fn contains(&self, call_id: &str) -> bool {
        self.ids.contains_key(call_id)
    }

    fn insert(&mut self, call_id: &str) {
        if self.ids.len() >= self.bound && !self.ids.contains_key(call_id) {
            // Linear, but only when a cloud has left `bound` refused calls unfinished.
            if let Some(oldest) = self
                .ids
                .iter()
                .min_by_key(|(_, order)| **order)
                .map(|(id, _)| id.clone())
            {
                tracing::debug!(call_id = %oldest, "forgetting the oldest refused call: {} are unfinished", self.ids.len());
                self.ids.remove(&oldest);
            }
        }
        self.ids.insert(call_id.to_owned(), self.next);
        self.next += 1;
    }

    fn remove(&mut self, call_id: &str) {
        self.ids.remove(call_id);
    }
}

fn busy(limit: usize) -> CallError {
    let mut err = CallError::new(
        ErrorCode::Busy,
        format!("this agent is running its maximum of {limit} calls (cloud.max_concurrent_calls); retry shortly"),
    );
    err.retry_after_seconds = Some(1);
    err
}

fn store_refusal(
    parts: &TunnelParts,
    call_id: &str,
    app_id: Option<&str>,
    capability: &str,
    err: &CallError,
) {
    if parts
        .table
        .refuse(call_id, ResultBody::from(err.to_json_bytes(app_id)))
    {
        parts
            .dispatcher
            .count_refusal(app_id.unwrap_or_default(), capability, err.code);
        // Refusals come in storms (an overloaded agent refuses every call over its limit).
        if let Some(held_back) = parts.refused_call_lines.admit(err.code.as_str()) {
            tracing::warn!(
                call_id,
                code = err.code.as_str(),
                "call refused: {}{}",
                err.message,
                crate::telemetry::held_back_note(held_back)
            );
        }
    } else {
        tracing::debug!(call_id, "not refused: this id has its own result");
    }
}

/// The dispatcher's request from an assembled CallRequest; an error comes with the call's
/// `app_id` (for its error document).
fn parse_call(mut partial: Partial) -> Result<CallRequest, (CallError, String)> {
    match envelope_of(&mut partial) {
        Ok(body) => Ok(CallRequest {
            app_id: partial.app_id,
            capability: partial.capability,
            body,
            deadline: (partial.deadline_ms > 0).then(|| Duration::from_millis(partial.deadline_ms)),
        }),
        Err(err) => Err((err, partial.app_id)),
    }
}

fn envelope_of(partial: &mut Partial) -> Result<CallBody, CallError> {
    if partial.app_id.is_empty() || partial.capability.is_empty() {
        return Err(CallError::new(
            ErrorCode::BadRequest,
            "the call names no app_id or no capability",
        ));
    }
    let mut body: CallBody = if partial.payload.iter().all(u8::is_ascii_whitespace) {
        CallBody::default()
    } else {
        serde_json::from_slice(&partial.payload).map_err(|e| {
            CallError::new(
                ErrorCode::BadRequest,
                format!("the call's payload is not a valid envelope ({e}); expected {{\"request\", \"settings\", \"auth\" | \"credentials\", \"page\", \"include_raw_data\"}}"),
            )
        })?
    };
    // The payload (it may hold credentials) is zeroized now that it is parsed.
    drop(std::mem::take(&mut partial.payload));
    if !partial.tenant_id.is_empty() {
        match &body.tenant_id {
            Some(inner) if inner != &partial.tenant_id => {
                return Err(CallError::new(
                    ErrorCode::BadRequest,
                    "the payload's tenant_id differs from the call's",
                ))
            }
            _ => body.tenant_id = Some(std::mem::take(&mut partial.tenant_id)),
        }
    }
    Ok(body)
}

/// What the agent sends on one stream, produced as tonic asks for it: control messages first,
/// then the results queued by the call table, chunk by chunk. Produced lazily, so a result's
/// memory while it is sent is one chunk plus what HTTP/2 flow control lets out, however large
/// it is, and a finished call's result needs no task of its own to reach the stream.
struct Outbound {
    control: mpsc::Receiver<AgentMessage>,
    /// The result queue and chunk size, once the cloud's Welcome has set them.
    pending_results:
        Option<tokio::sync::oneshot::Receiver<(mpsc::UnboundedReceiver<Queued>, usize)>>,
    results: Option<mpsc::UnboundedReceiver<Queued>>,
    chunk: usize,
    current: Option<Sending>,
}

/// A result part-way sent.
struct Sending {
    call_id: String,
    result: Arc<StoredResult>,
    offset: u64,
    seq: u32,
    /// A read from the spool file in progress.
    read: Option<futures_util::future::BoxFuture<'static, std::io::Result<Bytes>>>,
}

impl tokio_stream::Stream for Outbound {
    type Item = AgentMessage;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<AgentMessage>> {
        use std::task::Poll;
        let me = &mut *self;
        match me.control.poll_recv(cx) {
            Poll::Ready(Some(msg)) => return Poll::Ready(Some(msg)),
            // The session is over.
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        if let Some(pending) = &mut me.pending_results {
            match std::pin::Pin::new(pending).poll(cx) {
                Poll::Ready(Ok((queue, chunk))) => {
                    me.results = Some(queue);
                    me.chunk = chunk;
                    me.pending_results = None;
                }
                Poll::Ready(Err(_)) => me.pending_results = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        loop {
            if me.current.is_none() {
                let Some(queue) = &mut me.results else {
                    return Poll::Pending;
                };
                match queue.poll_recv(cx) {
                    Poll::Ready(Some((call_id, result))) => {
                        // Acknowledged or replaced meanwhile (a duplicate in the queue, or a
                        // refusal of a call sent again): nothing to send.
                        if !result.withdrawn() {
                            me.current = Some(Sending {
                                call_id,
                                result,
                                offset: 0,
                                seq: 0,
                                read: None,
                            });
                        }
                        continue;
                    }
                    // A newer stream took the queue over (this one is ending), or nothing yet.
                    Poll::Ready(None) | Poll::Pending => return Poll::Pending,
                }
            }
            let Some(sending) = &mut me.current else {
                continue;
            };
            let data = match &sending.result.body {
                ResultBody::Memory(bytes) => {
                    let start = usize::try_from(sending.offset)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    let end = start.saturating_add(me.chunk).min(bytes.len());
                    bytes.slice(start..end)
                }
                ResultBody::Spooled(_) => {
                    let read = sending.read.get_or_insert_with(|| {
                        let (result, offset, chunk) =
                            (sending.result.clone(), sending.offset, me.chunk);
                        Box::pin(async move { result.body.read_at(offset, chunk).await })
                    });
                    let read = std::task::ready!(read.as_mut().poll(cx));
                    sending.read = None;
                    match read {
                        Ok(bytes) => bytes,
                        Err(e) => {
                            // The spool file is unreadable: this result cannot be delivered.
                            // Say so loudly; the cloud will time the call out.
                            tracing::error!(call_id = %sending.call_id, error = %e, "cannot read a stored result; it cannot be sent");
                            me.current = None;
                            continue;
                        }
                    }
                }
            };
            sending.offset += data.len() as u64;
            let last = sending.offset >= sending.result.body.len();
            let status = match sending.result.outcome {
                Outcome::Answered => CallStatus::ConnectorAnswered,
                Outcome::AgentError => CallStatus::AgentError,
            };
            let msg = message(agent_message::Message::CallResult(pb::CallResult {
                call_id: if last {
                    std::mem::take(&mut sending.call_id)
                } else {
                    sending.call_id.clone()
                },
                seq: sending.seq,
                data,
                last,
                status: status as i32,
            }));
            sending.seq += 1;
            if last {
                me.current = None;
            }
            return Poll::Ready(Some(msg));
        }
    }
}

fn message(msg: agent_message::Message) -> AgentMessage {
    AgentMessage { message: Some(msg) }
}

fn now_heartbeat() -> pb::Heartbeat {
    pb::Heartbeat {
        sent_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    }
}

fn hello(ctx: &TunnelContext) -> pb::Hello {
    let mode = match ctx.cloud.operation_mode {
        OperationMode::Default => pb::OperationMode::Default,
        OperationMode::ReadPreferred => pb::OperationMode::ReadPreferred,
        OperationMode::WritePreferred => pb::OperationMode::WritePreferred,
    };
    pb::Hello {
        agent_id: ctx.agent_id.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        protocol_version: lumos_agent_proto::PROTOCOL_VERSION,
        hostname: crate::platform::hostname(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        cluster_id: ctx.cloud.cluster_id.clone(),
        operation_mode: mode as i32,
        max_concurrent_calls: u32::try_from(ctx.cloud.max_concurrent_calls).unwrap_or(u32::MAX),
    }
}

/// The proto form of an inventory.
fn inventory_message(inventory: &Inventory) -> AgentMessage {
    let connectors = inventory
        .connectors
        .iter()
        .map(|c| {
            let status = inventory.status_of(c);
            pb::Connector {
                app_id: c.app_id.clone().unwrap_or_default(),
                version: c.version.as_deref().unwrap_or_default().to_owned(),
                kind: match c.kind {
                    Some(ConnectorKind::Bundle) => pb::ConnectorKind::Bundle,
                    Some(ConnectorKind::Executable) => pb::ConnectorKind::Executable,
                    Some(ConnectorKind::Cdylib) => pb::ConnectorKind::Cdylib,
                    None => pb::ConnectorKind::Unspecified,
                } as i32,
                sha256: c.sha256.clone().unwrap_or_default(),
                status: match status {
                    ConnectorStatus::Ready => pb::ConnectorStatus::Ready,
                    ConnectorStatus::Superseded => pb::ConnectorStatus::Superseded,
                    ConnectorStatus::Rejected => pb::ConnectorStatus::Rejected,
                } as i32,
                reason: inventory.reason_of(c).unwrap_or_default(),
                info: c
                    .runnable
                    .as_ref()
                    .and_then(|r| serde_json::to_vec(r.info.document.as_ref()).ok())
                    .map(Bytes::from)
                    .unwrap_or_default(),
                file_name: c.file_name(),
            }
        })
        .collect();
    message(agent_message::Message::Inventory(pb::Inventory {
        revision: inventory.revision,
        connectors,
    }))
}

fn status_error(status: tonic::Status) -> SessionError {
    match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            SessionError::Unauthorized(describe_status(&status))
        }
        _ => SessionError::Failed(describe_status(&status)),
    }
}

fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{:?}", status.code());
    if !status.message().is_empty() {
        text.push_str(": ");
        text.push_str(status.message());
    }
    if let Some(source) = std::error::Error::source(status) {
        text.push_str(" (");
        text.push_str(&super::transport::error_chain(source));
        text.push(')');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::RefusedCalls;

    #[test]
    fn refused_calls_stay_within_their_bound_and_forget_the_oldest_first() {
        let mut refused = RefusedCalls::new(3);
        for id in ["a", "b", "c"] {
            refused.insert(id);
        }
        // Refused again while remembered: no room is taken, nothing is forgotten.
        refused.insert("a");
        assert!(["a", "b", "c"].iter().all(|id| refused.contains(id)));
        refused.insert("d");
        assert_eq!(refused.ids.len(), 3);
        assert!(!refused.contains("b"), "the oldest is forgotten first");
        assert!(["a", "c", "d"].iter().all(|id| refused.contains(id)));
        // A call that ends (its last chunk, a Cancel) makes room: nothing else goes.
        refused.remove("c");
        refused.insert("e");
        assert!(["a", "d", "e"].iter().all(|id| refused.contains(id)));
        // A cloud that abandons thousands stays at the bound.
        for i in 0..10_000 {
            refused.insert(&format!("abandoned-{i}"));
        }
        assert_eq!(refused.ids.len(), 3);
        assert!(refused.contains("abandoned-9999") && !refused.contains("a"));
    }
}
