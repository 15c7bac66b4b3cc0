//! The token broker: one owner per credential of "is this token still good, and if not, get a
//! new one", so that connectors always receive a valid access token and hundreds of concurrent
//! calls on one expired token cause exactly one token request.
//!
//! - **Keyed** by tenant, credential id, token URL, client id and scopes: two tenants with the
//!   same client id at different token URLs never share a token.
//! - **Proactive**: a token counts as expired once `now + skew >= expiry`; the skew is 60 s,
//!   shortened to half the token's lifetime for short-lived tokens (so they are not refreshed on
//!   every call).
//! - **Single-flight on a detached task**: the first caller that finds the token stale starts
//!   the refresh; everyone else waits for the same outcome; a caller that goes away does not
//!   cancel it. A failed refresh is reported to every waiter and not remembered as a result: the
//!   next call after the backoff tries again.
//! - **Rotation-safe**: a new refresh token is handed to the persistence hook *before* the new
//!   access token is served; if persisting fails, the new token stays in memory (the old one is
//!   never used again) and a background task retries the hook until it succeeds or newer
//!   tokens supersede these.
//! - **Failure classes**: `invalid_grant` marks the credential as needing re-consent (later
//!   calls fail fast, no request), unless the refresh token has changed meanwhile (a stale
//!   racer); 429 parks every credential of that token host until `Retry-After`; 5xx and
//!   timeouts back off with full jitter while a token that has not actually expired keeps being
//!   served; configuration errors fail with the setting to fix and are retried at the maximum
//!   backoff.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::future::{BoxFuture, FutureExt as _, Shared};
use zeroize::Zeroizing;

use super::{Grant, TokenClient, TokenEndpoint, TokenError, Tokens};

/// Identifies one credential. Tokens are never shared between two keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CredentialKey {
    /// The tenant (Lumos connection).
    pub tenant_id: String,
    /// The credential within the tenant (`""` for single-credential auth).
    pub credential_id: String,
    /// The token URL.
    pub token_url: String,
    /// The client id.
    pub client_id: String,
    /// The scopes, in order.
    pub scopes: Vec<String>,
}

/// How a credential gets new tokens.
#[derive(Clone)]
pub enum GrantKind {
    /// With its refresh token.
    RefreshToken,
    /// With the client's own credentials.
    ClientCredentials,
    /// With a resource owner's password (only where an app needs it).
    Password {
        /// The user.
        username: String,
        /// The password.
        password: Zeroizing<String>,
    },
    /// Through something other than a token endpoint: the connector's own
    /// `refresh_access_token` capability, where the agent lacks the token URL. Given the
    /// current refresh token.
    Exchange(Exchange),
}

/// Trades a refresh token for new tokens without a token endpoint (see [`GrantKind::Exchange`]).
pub type Exchange = Arc<
    dyn Fn(Option<Zeroizing<String>>) -> BoxFuture<'static, Result<Tokens, TokenError>>
        + Send
        + Sync,
>;

impl fmt::Debug for GrantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RefreshToken => "RefreshToken",
            Self::ClientCredentials => "ClientCredentials",
            Self::Password { .. } => "Password([redacted])",
            Self::Exchange(_) => "Exchange",
        })
    }
}

/// What is known of a credential when the broker first sees it (from the tenant store, or
/// from the call for cloud-held credentials).
#[derive(Default)]
pub struct Seed {
    /// When the access token was issued, if known (its lifetime shortens the skew).
    pub issued_at: Option<SystemTime>,
    /// The current access token, if any.
    pub access_token: Option<Zeroizing<String>>,
    /// When it expires.
    pub expires_at: Option<SystemTime>,
    /// The current refresh token, if any.
    pub refresh_token: Option<Zeroizing<String>>,
    /// Fingerprints ([`fingerprint`]) of older refresh tokens this seed supersedes: a caller
    /// presenting one of them is behind, not re-consented (a cloud that has not applied a
    /// `CredentialUpdate` yet).
    pub supersedes: Vec<[u8; 32]>,
}

impl fmt::Debug for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seed")
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "[redacted]"),
            )
            .field("expires_at", &self.expires_at)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .finish_non_exhaustive()
    }
}

/// An access token as served to a call.
pub struct AccessToken {
    /// The token.
    pub token: Zeroizing<String>,
    /// When it expires (absolute), if known.
    pub expires_at: Option<SystemTime>,
    /// When it was obtained, if known: with `expires_at`, its lifetime (for the skew).
    pub issued_at: Option<SystemTime>,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Stores a credential's new tokens durably (the tenant store for agent-held credentials, the
/// outbox towards the cloud for cloud-held ones). Called before a new access token is used,
/// with the refresh token they replace.
pub type Persist = Arc<
    dyn Fn(&CredentialKey, &Tokens, Option<&str>) -> BoxFuture<'static, Result<(), String>>
        + Send
        + Sync,
>;

/// A refresh token's SHA-256: how the broker remembers tokens it has held without keeping them.
pub fn fingerprint(refresh_token: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(refresh_token.as_bytes()).into()
}

/// How many superseded refresh tokens a credential remembers (to tell a caller that is behind
/// from a re-consent).
const KNOWN_REFRESH_TOKENS: usize = 16;

/// A credential's state, as `GET /v1/tenants` and the cloud see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialStatus {
    /// Tokens are being served.
    Ok,
    /// The last refresh failed; retrying after a backoff.
    Failing,
    /// The authorization server refused the grant: an admin must consent again.
    NeedsReconsent,
}

impl CredentialStatus {
    /// The word used in the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failing => "failing",
            Self::NeedsReconsent => "needs_reconsent",
        }
    }
}

/// The broker's timing.
#[derive(Debug, Clone, Copy)]
pub struct BrokerSettings {
    /// Refresh this long before expiry (shortened for short-lived tokens).
    pub skew: Duration,
    /// First backoff after a failed refresh.
    pub backoff_initial: Duration,
    /// Longest backoff (also the wait after a configuration error).
    pub backoff_max: Duration,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            skew: Duration::from_secs(60),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

type Refresh = Shared<BoxFuture<'static, Result<Arc<AccessToken>, TokenError>>>;

#[derive(Default)]
struct CredentialState {
    access: Option<Arc<AccessToken>>,
    refresh_token: Option<Zeroizing<String>>,
    /// `invalid_grant` was answered for the current refresh token.
    needs_consent: bool,
    /// No refresh before this (after a failure), and the error to give meanwhile.
    parked: Option<(SystemTime, TokenError)>,
    failures: u32,
    inflight: Option<Refresh>,
    /// Fingerprints of refresh tokens this credential held before (newest last).
    known: Vec<[u8; 32]>,
    /// Bumped when a caller re-seeds the credential (re-consent): a refresh started before
    /// then is discarded.
    generation: u64,
}

impl CredentialState {
    fn seeded(seed: Seed, generation: u64) -> Self {
        let mut known = seed.supersedes;
        known.extend(seed.refresh_token.as_deref().map(|t| fingerprint(t)));
        Self {
            access: seed.access_token.map(|token| {
                Arc::new(AccessToken {
                    token,
                    expires_at: seed.expires_at,
                    issued_at: seed.issued_at,
                })
            }),
            refresh_token: seed.refresh_token,
            known,
            generation,
            ..Self::default()
        }
    }

    /// Whether a caller presenting `refresh_token` brings a grant this credential never held.
    fn is_new_grant(&self, refresh_token: &str) -> bool {
        self.refresh_token.as_deref().map(String::as_str) != Some(refresh_token)
            && !self.known.contains(&fingerprint(refresh_token))
    }

    /// Adds fingerprints older than the ones it knows (oldest first), within the bound.
    fn remember_before(&mut self, older: Vec<[u8; 32]>) {
        let mut known: Vec<[u8; 32]> = older
            .into_iter()
            .filter(|print| !self.known.contains(print))
            .collect();
        known.append(&mut self.known);
        let excess = known.len().saturating_sub(KNOWN_REFRESH_TOKENS);
        known.drain(..excess);
        self.known = known;
    }

    fn remember(&mut self, refresh_token: &str) {
        let print = fingerprint(refresh_token);
        if !self.known.contains(&print) {
            self.known.push(print);
            if self.known.len() > KNOWN_REFRESH_TOKENS {
                self.known.remove(0);
            }
        }
    }
}

/// Counts of refresh outcomes, by class (for `/metrics`).
#[derive(Debug, Default)]
pub struct RefreshCounts {
    counts: Mutex<HashMap<&'static str, u64>>,
}

impl RefreshCounts {
    fn add(&self, outcome: &'static str) {
        *self
            .counts
            .lock()
            .expect("counts poisoned")
            .entry(outcome)
            .or_default() += 1;
    }

    /// How many refreshes ended as `outcome` (`ok` or a [`TokenError::class`]).
    pub fn get(&self, outcome: &str) -> u64 {
        self.counts
            .lock()
            .expect("counts poisoned")
            .get(outcome)
            .copied()
            .unwrap_or(0)
    }
}

/// What the broker tells the rest of the agent (metrics, the tenant store, the cloud).
pub trait BrokerEvents: Send + Sync {
    /// A refresh ended as `outcome` (`ok` or a [`TokenError::class`]).
    fn refreshed(&self, outcome: &'static str);
    /// The authorization server refused the credential's grant: it needs re-consent.
    fn needs_reconsent(&self, key: &CredentialKey);
}

/// The token broker. Shared by every call.
pub struct TokenBroker {
    events: Option<Arc<dyn BrokerEvents>>,
    client: TokenClient,
    settings: BrokerSettings,
    persist: Persist,
    states: Mutex<HashMap<CredentialKey, Arc<Mutex<CredentialState>>>>,
    /// Token hosts that answered 429, until when.
    hosts: Arc<Mutex<HashMap<String, SystemTime>>>,
    /// Refresh outcomes.
    pub counts: Arc<RefreshCounts>,
}

impl fmt::Debug for TokenBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBroker")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TokenBroker {
    /// A broker that asks token endpoints through `client` and stores new tokens with
    /// `persist`.
    pub fn new(client: TokenClient, settings: BrokerSettings, persist: Persist) -> Self {
        Self {
            events: None,
            client,
            settings,
            persist,
            states: Mutex::default(),
            hosts: Arc::default(),
            counts: Arc::default(),
        }
    }

    /// Reports refresh outcomes and lost grants to `events`.
    #[must_use]
    pub fn with_events(mut self, events: Arc<dyn BrokerEvents>) -> Self {
        self.events = Some(events);
        self
    }

    /// A valid access token for `key`, refreshing it first if it is stale. `seed` is used the
    /// first time the broker sees `key`.
    pub async fn token(
        &self,
        key: &CredentialKey,
        endpoint: &TokenEndpoint,
        grant: &GrantKind,
        seed: impl FnOnce() -> Seed,
    ) -> Result<Arc<AccessToken>, TokenError> {
        self.token_presented(key, endpoint, grant, None, seed).await
    }

    /// [`Self::token`] for a caller that presents the credential's refresh token with each
    /// call (cloud-held credentials, or a tenant store an admin may rewrite): a refresh token
    /// this credential never held is a new grant (re-consent), and `seed` replaces what the
    /// broker knew. A refresh token it held before means the caller is behind; it is ignored.
    pub async fn token_presented(
        &self,
        key: &CredentialKey,
        endpoint: &TokenEndpoint,
        grant: &GrantKind,
        presented: Option<&str>,
        seed: impl FnOnce() -> Seed,
    ) -> Result<Arc<AccessToken>, TokenError> {
        let state = self.state_presented(key, presented, seed);
        let now = SystemTime::now();
        let refresh = {
            let mut s = state.lock().expect("credential state poisoned");
            if let Some(access) = &s.access {
                if !self.stale(access, now) {
                    return Ok(access.clone());
                }
            }
            if s.needs_consent {
                return Err(TokenError::InvalidGrant { description: None });
            }
            let host_until = self.host_parked_until(&endpoint.url);
            let parked = s
                .parked
                .as_ref()
                .filter(|(until, _)| *until > now)
                .map(|(_, e)| e.clone())
                .or_else(|| {
                    host_until
                        .filter(|until| *until > now)
                        .map(|until| TokenError::RateLimited {
                            retry_after: until.duration_since(now).unwrap_or_default(),
                        })
                });
            if let Some(error) = parked {
                // Waiting out a failure: a token that has not actually expired still works.
                return match &s.access {
                    Some(access) if access.expires_at.is_none_or(|at| at > now) => {
                        Ok(access.clone())
                    }
                    _ => Err(error),
                };
            }
            self.join_or_start(key, endpoint, grant, &state, &mut s)
        };
        refresh.await
    }

    /// A new access token after the app refused `rejected` (a connector answered
    /// `refreshable`): single-flight keyed by the rejected token, so many calls failing with
    /// the same token cause one refresh, and a call whose token was already replaced just gets
    /// the newer one.
    pub async fn token_after_rejection(
        &self,
        key: &CredentialKey,
        endpoint: &TokenEndpoint,
        grant: &GrantKind,
        rejected: &str,
    ) -> Result<Arc<AccessToken>, TokenError> {
        let state = self.state_presented(key, None, Seed::default);
        let now = SystemTime::now();
        let refresh = {
            let mut s = state.lock().expect("credential state poisoned");
            if let Some(access) = &s.access {
                // Already replaced: the newer token, unless it is due for a refresh itself.
                if access.token.as_str() != rejected
                    && s.inflight.is_none()
                    && !self.stale(access, now)
                {
                    return Ok(access.clone());
                }
            }
            if s.needs_consent {
                return Err(TokenError::InvalidGrant { description: None });
            }
            if let Some((until, error)) = &s.parked {
                if *until > now {
                    return Err(error.clone());
                }
            }
            self.join_or_start(key, endpoint, grant, &state, &mut s)
        };
        refresh.await
    }

    /// Whether the credential was refused with `invalid_grant` and needs re-consent.
    pub fn needs_consent(&self, key: &CredentialKey) -> bool {
        self.status(key) == Some(CredentialStatus::NeedsReconsent)
    }

    /// The credential's state, if the broker has seen it.
    pub fn status(&self, key: &CredentialKey) -> Option<CredentialStatus> {
        let state = self
            .states
            .lock()
            .expect("broker poisoned")
            .get(key)
            .cloned()?;
        let s = state.lock().expect("credential state poisoned");
        Some(if s.needs_consent {
            CredentialStatus::NeedsReconsent
        } else if s.failures > 0 || s.parked.is_some() {
            CredentialStatus::Failing
        } else {
            CredentialStatus::Ok
        })
    }

    /// The state of every credential of `tenant_id` the broker has seen, by credential id.
    pub fn tenant_status(&self, tenant_id: &str) -> Vec<(String, CredentialStatus)> {
        let keys: Vec<CredentialKey> = self
            .states
            .lock()
            .expect("broker poisoned")
            .keys()
            .filter(|k| k.tenant_id == tenant_id)
            .cloned()
            .collect();
        let mut out: Vec<(String, CredentialStatus)> = keys
            .iter()
            .filter_map(|k| Some((k.credential_id.clone(), self.status(k)?)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Forgets every credential of `tenant_id` (its stored credentials were replaced or
    /// removed); a refresh in flight finishes but its tokens are discarded.
    pub fn forget_tenant(&self, tenant_id: &str) {
        self.states
            .lock()
            .expect("broker poisoned")
            .retain(|k, state| {
                if k.tenant_id == tenant_id {
                    state.lock().expect("credential state poisoned").generation += 1;
                    false
                } else {
                    true
                }
            });
    }

    fn state_presented(
        &self,
        key: &CredentialKey,
        presented: Option<&str>,
        seed: impl FnOnce() -> Seed,
    ) -> Arc<Mutex<CredentialState>> {
        let mut states = self.states.lock().expect("broker poisoned");
        // The hot path: a known credential, found without cloning its key.
        if let Some(state) = states.get(key) {
            let state = state.clone();
            drop(states);
            if let Some(presented) = presented {
                let mut s = state.lock().expect("credential state poisoned");
                if s.is_new_grant(presented) {
                    // Re-consent: start over from what the caller brings; a refresh in flight
                    // for the old grant is discarded when it ends.
                    tracing::info!(tenant_id = %key.tenant_id, credential = %key.credential_id, "a new grant was presented for the credential; using it");
                    let generation = s.generation + 1;
                    let held = std::mem::take(&mut s.known);
                    *s = CredentialState::seeded(seed(), generation);
                    // The tokens it held before stay known: a caller still presenting one is
                    // behind, not bringing yet another grant (which would re-seed again, and
                    // discard a refresh in flight, each time old and new callers alternate).
                    s.remember_before(held);
                }
            }
            return state;
        }
        states
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Mutex::new(CredentialState::seeded(seed(), 0))))
            .clone()
    }

    /// `now + skew >= expiry`, the skew shortened to half the lifetime for short-lived tokens.
    fn stale(&self, access: &AccessToken, now: SystemTime) -> bool {
        let Some(expires_at) = access.expires_at else {
            return false;
        };
        // Lifetime unknown (a seeded token): the full skew.
        let skew = match access.issued_at {
            Some(issued) => self
                .settings
                .skew
                .min(expires_at.duration_since(issued).unwrap_or_default() / 2),
            None => self.settings.skew,
        };
        now + skew >= expires_at
    }

    fn host_parked_until(&self, url: &str) -> Option<SystemTime> {
        self.hosts
            .lock()
            .expect("hosts poisoned")
            .get(host_of(url))
            .copied()
    }

    /// The refresh in flight for the credential, or a new one.
    fn join_or_start(
        &self,
        key: &CredentialKey,
        endpoint: &TokenEndpoint,
        grant: &GrantKind,
        state: &Arc<Mutex<CredentialState>>,
        s: &mut CredentialState,
    ) -> Refresh {
        if let Some(refresh) = &s.inflight {
            return refresh.clone();
        }
        let refresh = self.start_refresh(key, endpoint, grant, state, s);
        s.inflight = Some(refresh.clone());
        refresh
    }

    /// Spawns the refresh as a task of its own, so a caller that goes away cannot cancel it.
    fn start_refresh(
        &self,
        key: &CredentialKey,
        endpoint: &TokenEndpoint,
        grant: &GrantKind,
        state: &Arc<Mutex<CredentialState>>,
        s: &mut CredentialState,
    ) -> Refresh {
        let used = s.refresh_token.clone();
        let generation = s.generation;
        let task = tokio::spawn(refresh_task(RefreshJob {
            generation,
            client: self.client.clone(),
            persist: self.persist.clone(),
            settings: self.settings,
            hosts: self.hosts.clone(),
            counts: self.counts.clone(),
            events: self.events.clone(),
            key: key.clone(),
            endpoint: endpoint.clone(),
            grant: grant.clone(),
            used,
            state: state.clone(),
        }));
        let state = state.clone();
        async move {
            task.await.unwrap_or_else(|e| {
                // The task died before recording its outcome (a panic in the store hook):
                // forget it, so the next call starts a new refresh instead of joining this one.
                state.lock().expect("credential state poisoned").inflight = None;
                Err(TokenError::Unavailable(format!(
                    "the refresh task failed: {e}"
                )))
            })
        }
        .boxed()
        .shared()
    }
}

struct RefreshJob {
    /// The credential's generation when this refresh started.
    generation: u64,
    client: TokenClient,
    persist: Persist,
    settings: BrokerSettings,
    hosts: Arc<Mutex<HashMap<String, SystemTime>>>,
    counts: Arc<RefreshCounts>,
    events: Option<Arc<dyn BrokerEvents>>,
    key: CredentialKey,
    endpoint: TokenEndpoint,
    grant: GrantKind,
    /// The refresh token this refresh sends.
    used: Option<Zeroizing<String>>,
    state: Arc<Mutex<CredentialState>>,
}

async fn refresh_task(job: RefreshJob) -> Result<Arc<AccessToken>, TokenError> {
    let grant = match (&job.grant, job.used.as_deref()) {
        (GrantKind::RefreshToken, Some(token)) => Grant::RefreshToken(token),
        (GrantKind::RefreshToken, None) => {
            let err = TokenError::InvalidGrant {
                description: Some("no refresh token is stored for this credential".into()),
            };
            return finish(&job, Err(err)).await;
        }
        (GrantKind::ClientCredentials, _) => Grant::ClientCredentials,
        (GrantKind::Password { username, password }, _) => Grant::Password { username, password },
        (GrantKind::Exchange(exchange), used) => {
            let outcome = exchange(used.map(|t| Zeroizing::new(t.to_string()))).await;
            return finish(&job, outcome).await;
        }
    };
    let outcome = job.client.request(&job.endpoint, grant).await;
    finish(&job, outcome).await
}

/// Records a refresh's outcome in the credential's state (persisting new tokens first).
async fn finish(
    job: &RefreshJob,
    outcome: Result<Tokens, TokenError>,
) -> Result<Arc<AccessToken>, TokenError> {
    let now = SystemTime::now();
    let superseded = || {
        job.state
            .lock()
            .expect("credential state poisoned")
            .generation
            != job.generation
    };
    if superseded() {
        // The credential was re-seeded (re-consent) while this refresh ran: its outcome
        // belongs to the old grant and must not overwrite the new one.
        tracing::info!(tenant_id = %job.key.tenant_id, credential = %job.key.credential_id, "discarding a refresh of a replaced grant");
        job.state
            .lock()
            .expect("credential state poisoned")
            .inflight = None;
        return Err(TokenError::Unavailable(
            "the credential was replaced while it was being refreshed".into(),
        ));
    }
    match outcome {
        Ok(tokens) => {
            // Known before the store shows it: a call that reads the new refresh token from
            // the store before this state holds it is behind, not bringing a new grant (which
            // would re-seed the credential under the refresh that is finishing).
            if let Some(new) = &tokens.refresh_token {
                job.state
                    .lock()
                    .expect("credential state poisoned")
                    .remember(new);
            }
            // Durable before used: a crash after this point finds the new refresh token.
            if let Err(e) =
                (job.persist)(&job.key, &tokens, job.used.as_deref().map(String::as_str)).await
            {
                tracing::error!(tenant_id = %job.key.tenant_id, credential = %job.key.credential_id, "cannot store the credential's new tokens; keeping them in memory and retrying: {e}");
                tokio::spawn(retry_persist(
                    job.persist.clone(),
                    job.key.clone(),
                    tokens.clone(),
                    job.used.clone(),
                    job.state.clone(),
                    job.settings,
                ));
            }
            let access = Arc::new(AccessToken {
                token: tokens.access_token.clone(),
                expires_at: tokens.expires_at,
                issued_at: Some(now),
            });
            let mut s = job.state.lock().expect("credential state poisoned");
            s.access = Some(access.clone());
            if let Some(new) = tokens.refresh_token {
                if let Some(old) = s.refresh_token.take() {
                    s.remember(&old);
                }
                s.remember(&new);
                s.refresh_token = Some(new);
            }
            s.needs_consent = false;
            s.parked = None;
            s.failures = 0;
            s.inflight = None;
            drop(s);
            job.counts.add("ok");
            if let Some(events) = &job.events {
                events.refreshed("ok");
            }
            Ok(access)
        }
        Err(error) => {
            job.counts.add(error.class());
            if let Some(events) = &job.events {
                events.refreshed(error.class());
            }
            let mut s = job.state.lock().expect("credential state poisoned");
            s.inflight = None;
            match &error {
                TokenError::InvalidGrant { .. } => {
                    // A racer's stale refusal: the credential has a newer refresh token now.
                    if s.refresh_token.as_deref() == job.used.as_deref() && !s.needs_consent {
                        s.needs_consent = true;
                        drop(s);
                        tracing::warn!(tenant_id = %job.key.tenant_id, credential = %job.key.credential_id, "the authorization server refused the refresh token (invalid_grant): the credential needs re-consent");
                        if let Some(events) = &job.events {
                            events.needs_reconsent(&job.key);
                        }
                        return Err(error);
                    }
                }
                TokenError::RateLimited { retry_after } => {
                    job.hosts
                        .lock()
                        .expect("hosts poisoned")
                        .insert(host_of(&job.endpoint.url).to_string(), now + *retry_after);
                }
                TokenError::Unavailable(_) => {
                    s.failures = s.failures.saturating_add(1);
                    let wait = crate::tunnel::full_jitter(
                        job.settings.backoff_initial,
                        job.settings.backoff_max,
                        s.failures,
                    );
                    s.parked = Some((now + wait, error.clone()));
                }
                TokenError::Config { .. } => {
                    s.parked = Some((now + job.settings.backoff_max, error.clone()));
                }
            }
            Err(error)
        }
    }
}

/// Retries storing `tokens` with backoff until it works, or until a newer refresh token has
/// replaced them (its own persist covers it).
async fn retry_persist(
    persist: Persist,
    key: CredentialKey,
    tokens: Tokens,
    replaced: Option<Zeroizing<String>>,
    state: Arc<Mutex<CredentialState>>,
    settings: BrokerSettings,
) {
    let mut attempt = 0u32;
    loop {
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(crate::tunnel::full_jitter(
            settings.backoff_initial,
            settings.backoff_max,
            attempt,
        ))
        .await;
        let superseded = state
            .lock()
            .expect("credential state poisoned")
            .refresh_token
            .as_deref()
            != tokens.refresh_token.as_deref();
        if superseded {
            return;
        }
        match persist(&key, &tokens, replaced.as_deref().map(String::as_str)).await {
            Ok(()) => {
                tracing::info!(tenant_id = %key.tenant_id, credential = %key.credential_id, attempt, "stored the credential's new tokens");
                return;
            }
            Err(e) => {
                tracing::warn!(tenant_id = %key.tenant_id, attempt, "still cannot store the credential's new tokens: {e}")
            }
        }
    }
}

/// The `scheme://host:port` part of a URL: 429s are shared per token host.
fn host_of(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| after_scheme + i);
    &url[..end]
}

#[cfg(test)]
mod tests {
    use super::super::fake::{fake_endpoint, Script};
    use super::super::{BodyFormat, ClientAuth};
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn endpoint(url: &str) -> TokenEndpoint {
        TokenEndpoint {
            url: url.to_string(),
            client_id: "client".into(),
            client_secret: Some(Zeroizing::new("secret".into())),
            auth: ClientAuth::Post,
            format: BodyFormat::Form,
            scopes: vec![],
            api_key: None,
        }
    }

    fn key(tenant: &str, url: &str) -> CredentialKey {
        CredentialKey {
            tenant_id: tenant.into(),
            credential_id: String::new(),
            token_url: url.into(),
            client_id: "client".into(),
            scopes: vec![],
        }
    }

    /// Whether tenant `t`'s credential at `url` has a refresh in flight.
    fn in_flight(broker: &TokenBroker, url: &str) -> bool {
        broker
            .states
            .lock()
            .unwrap()
            .get(&key("t", url))
            .is_some_and(|s| s.lock().unwrap().inflight.is_some())
    }

    /// One `token` call for `tenant` at `url`.
    async fn ask(
        broker: &TokenBroker,
        tenant: &str,
        url: &str,
        grant: GrantKind,
        seed: impl FnOnce() -> Seed,
    ) -> Result<Arc<AccessToken>, TokenError> {
        broker
            .token(&key(tenant, url), &endpoint(url), &grant, seed)
            .await
    }

    /// A new token after the app refused `rejected` (tenant `t`, refresh-token grant).
    async fn after_rejection(
        broker: &TokenBroker,
        url: &str,
        rejected: &str,
    ) -> Result<Arc<AccessToken>, TokenError> {
        broker
            .token_after_rejection(
                &key("t", url),
                &endpoint(url),
                &GrantKind::RefreshToken,
                rejected,
            )
            .await
    }

    /// Records what was persisted, in order.
    fn recorder() -> (Persist, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let persist: Persist = Arc::new(move |_key, tokens, _replaced| {
            let entry = format!(
                "{}|{}",
                tokens.access_token.as_str(),
                tokens.refresh_token.as_deref().map_or("-", String::as_str)
            );
            sink.lock().unwrap().push(entry);
            async { Ok(()) }.boxed()
        });
        (persist, log)
    }

    fn broker(persist: Persist, settings: BrokerSettings) -> TokenBroker {
        TokenBroker::new(
            TokenClient::new(None, Duration::from_secs(5)).unwrap(),
            settings,
            persist,
        )
    }

    fn fast() -> BrokerSettings {
        BrokerSettings {
            skew: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(1),
            backoff_max: Duration::from_millis(2),
        }
    }

    fn expired_seed() -> Seed {
        Seed {
            issued_at: None,
            access_token: Some(Zeroizing::new("OLD".into())),
            expires_at: Some(SystemTime::now() - Duration::from_secs(1)),
            refresh_token: Some(Zeroizing::new("RT-0".into())),
            supersedes: Vec::new(),
        }
    }

    /// A strict rotating server: each refresh token works once; reusing one is invalid_grant.
    fn rotating_server(delay: Duration) -> (Script, Arc<AtomicUsize>) {
        let issued = Arc::new(AtomicUsize::new(0));
        let counter = issued.clone();
        let script: Script = Arc::new(move |seen| {
            let params: HashMap<String, String> = form_urlencoded::parse(seen.body.as_bytes())
                .into_owned()
                .collect();
            let n = counter.load(Ordering::SeqCst);
            std::thread::sleep(delay);
            if params.get("refresh_token").map(String::as_str) != Some(&format!("RT-{n}")) {
                return (400, vec![], r#"{"error": "invalid_grant"}"#.into());
            }
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            (
                200,
                vec![],
                format!(
                    r#"{{"access_token": "AT-{n}", "refresh_token": "RT-{n}", "expires_in": 3600}}"#
                ),
            )
        });
        (script, issued)
    }

    /// A seed holding access token AT-0 (and refresh token RT-0) that expires `secs` from
    /// when it is seeded.
    fn held_for(secs: u64) -> impl FnOnce() -> Seed {
        move || Seed {
            access_token: Some(Zeroizing::new("AT-0".into())),
            expires_at: Some(SystemTime::now() + Duration::from_secs(secs)),
            refresh_token: Some(Zeroizing::new("RT-0".into())),
            ..Seed::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rejected_tokens_refresh_once_and_a_caller_behind_gets_the_newer_token() {
        let (script, issued) = rotating_server(Duration::from_millis(30));
        let (url, seen) = fake_endpoint(script).await;
        let (persist, persisted) = recorder();
        let broker = Arc::new(broker(persist, fast()));
        // A token the broker thinks is good for an hour, which the app refuses.
        let first = ask(&broker, "t", &url, GrantKind::RefreshToken, held_for(3600))
            .await
            .unwrap();
        assert_eq!(first.token.as_str(), "AT-0");
        assert!(
            seen.lock().unwrap().is_empty(),
            "a fresh token needs no request"
        );
        let mut calls = Vec::new();
        for _ in 0..50 {
            let (broker, url) = (broker.clone(), url.clone());
            calls.push(tokio::spawn(async move {
                after_rejection(&broker, &url, "AT-0")
                    .await
                    .map(|t| t.token.to_string())
            }));
        }
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), "AT-1");
        }
        // A latecomer whose call failed with the old token: no second request.
        let late = after_rejection(&broker, &url, "AT-0").await.unwrap();
        assert_eq!(late.token.as_str(), "AT-1");
        assert_eq!(issued.load(Ordering::SeqCst), 1);
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert_eq!(*persisted.lock().unwrap(), vec!["AT-1|RT-1".to_string()]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rejection_is_not_answered_with_a_held_token_that_has_expired_since() {
        let (script, issued) = rotating_server(Duration::ZERO);
        let (url, _seen) = fake_endpoint(script).await;
        let (persist, _) = recorder();
        let broker = broker(
            persist,
            BrokerSettings {
                skew: Duration::ZERO,
                ..fast()
            },
        );
        let held = ask(&broker, "t", &url, GrantKind::RefreshToken, held_for(1))
            .await
            .unwrap();
        assert_eq!(held.token.as_str(), "AT-0");
        // A sleep lasts at least this long, however busy the machine: AT-0 has expired after.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // A call that ran with some other token was refused; the held AT-0 is not newer, it
        // is expired.
        let after = after_rejection(&broker, &url, "AT-elsewhere")
            .await
            .unwrap();
        assert_eq!(after.token.as_str(), "AT-1");
        assert_eq!(issued.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_presenting_an_old_refresh_token_is_behind_and_a_new_one_is_a_reconsent() {
        let (script, issued) = rotating_server(Duration::ZERO);
        let (url, _seen) = fake_endpoint(script).await;
        let (persist, _) = recorder();
        let broker = broker(persist, fast());
        let k = key("t", &url);
        let ep = endpoint(&url);
        let get = |presented: &'static str, access: &'static str| {
            let (broker, k, ep) = (&broker, k.clone(), ep.clone());
            async move {
                broker
                    .token_presented(&k, &ep, &GrantKind::RefreshToken, Some(presented), || {
                        Seed {
                            access_token: Some(Zeroizing::new(access.into())),
                            expires_at: Some(SystemTime::now() - Duration::from_secs(1)),
                            refresh_token: Some(Zeroizing::new(presented.into())),
                            ..Seed::default()
                        }
                    })
                    .await
            }
        };
        // RT-0 is exchanged for RT-1; a cloud that still sends RT-0 is behind: no reuse of
        // RT-0 (which a strict server would answer with invalid_grant and a revocation).
        assert_eq!(get("RT-0", "OLD").await.unwrap().token.as_str(), "AT-1");
        assert_eq!(get("RT-0", "OLD").await.unwrap().token.as_str(), "AT-1");
        assert_eq!(issued.load(Ordering::SeqCst), 1);
        // The admin connected again and the server issued a grant the broker never held.
        assert!(broker.status(&k) == Some(CredentialStatus::Ok));
        issued.store(7, Ordering::SeqCst);
        let fresh = get("RT-7", "NEW-CONSENT").await.unwrap();
        assert_eq!(
            fresh.token.as_str(),
            "AT-8",
            "the new grant was used, not the old one"
        );
    }

    /// Agent-held credentials are presented from the tenant store with each call, so calls
    /// holding the store from before a rotation and calls holding it from after arrive mixed.
    /// Neither may re-seed the credential: the old token is behind, the new one already known
    /// (even while it is being stored), so no second request reuses a rotated token and no
    /// refresh in flight is discarded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_presenting_the_old_and_the_new_refresh_token_mixed_never_reseed() {
        let (script, issued) = rotating_server(Duration::ZERO);
        let (url, _seen) = fake_endpoint(script).await;
        // The store is slow: callers arrive while the new tokens are being stored.
        let (entered, mut storing) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (release, released) = tokio::sync::watch::channel(false);
        let persist: Persist = Arc::new(move |_key, _tokens, _replaced| {
            let _ = entered.send(());
            let mut released = released.clone();
            async move {
                let _ = released.wait_for(|r| *r).await;
                Ok(())
            }
            .boxed()
        });
        let broker = Arc::new(broker(persist, fast()));
        let k = key("t", &url);
        let ep = endpoint(&url);
        let call = |presented: &'static str, access: &'static str, expired: bool| {
            let (broker, k, ep) = (broker.clone(), k.clone(), ep.clone());
            tokio::spawn(async move {
                broker
                    .token_presented(&k, &ep, &GrantKind::RefreshToken, Some(presented), || {
                        let age = Duration::from_secs(3600);
                        Seed {
                            access_token: Some(Zeroizing::new(access.into())),
                            expires_at: Some(if expired {
                                SystemTime::now() - Duration::from_secs(1)
                            } else {
                                SystemTime::now() + age
                            }),
                            refresh_token: Some(Zeroizing::new(presented.into())),
                            ..Seed::default()
                        }
                    })
                    .await
                    .map(|t| t.token.to_string())
            })
        };
        let first = call("RT-0", "AT-0", true);
        storing.recv().await.unwrap();
        // While RT-1 is being stored: one caller already reads it from the store, one still
        // the old RT-0.
        let new_reader = call("RT-1", "AT-1", false);
        let old_reader = call("RT-0", "AT-0", true);
        release.send(true).unwrap();
        for caller in [first, new_reader, old_reader] {
            assert_eq!(caller.await.unwrap().unwrap(), "AT-1");
        }
        // And after it, in any order.
        for (presented, access, expired) in [("RT-0", "AT-0", true), ("RT-1", "AT-1", false)] {
            assert_eq!(
                call(presented, access, expired).await.unwrap().unwrap(),
                "AT-1"
            );
        }
        assert_eq!(
            issued.load(Ordering::SeqCst),
            1,
            "one request, RT-0 never reused"
        );
        assert_eq!(broker.counts.get("ok"), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thousand_callers_on_an_expired_token_make_one_request_and_share_the_token() {
        let (script, issued) = rotating_server(Duration::from_millis(50));
        let (url, seen) = fake_endpoint(script).await;
        let (persist, persisted) = recorder();
        let broker = Arc::new(broker(persist, fast()));
        let mut calls = Vec::new();
        for _ in 0..1000 {
            let (broker, url) = (broker.clone(), url.clone());
            calls.push(tokio::spawn(async move {
                ask(&broker, "t", &url, GrantKind::RefreshToken, expired_seed)
                    .await
                    .map(|t| t.token.to_string())
            }));
        }
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), "AT-1");
        }
        assert_eq!(seen.lock().unwrap().len(), 1, "exactly one token request");
        assert_eq!(issued.load(Ordering::SeqCst), 1);
        assert_eq!(*persisted.lock().unwrap(), vec!["AT-1|RT-1".to_string()]);
        assert_eq!(broker.counts.get("ok"), 1);
        // Fresh now: no more requests.
        let again = ask(&broker, "t", &url, GrantKind::RefreshToken, Seed::default)
            .await
            .unwrap();
        assert_eq!(again.token.as_str(), "AT-1");
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_caller_does_not_cancel_the_refresh_and_rotation_is_persisted_first() {
        let (script, issued) = rotating_server(Duration::from_millis(200));
        let (url, _) = fake_endpoint(script).await;
        let (persist, persisted) = recorder();
        let broker = Arc::new(broker(persist, fast()));
        let b = broker.clone();
        let u = url.clone();
        let caller =
            tokio::spawn(
                async move { ask(&b, "t", &u, GrantKind::RefreshToken, expired_seed).await },
            );
        // Abort only once the refresh has started (a fixed sleep would race a busy machine).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if in_flight(&broker, &url) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the refresh never started"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        caller.abort();
        // The refresh completes and is stored although its caller is gone. Finished means
        // no longer in flight as well: the tokens are persisted *before* the state takes them,
        // and a look between the two would expire the seed and then join that refresh.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while persisted.lock().unwrap().is_empty() || in_flight(&broker, &url) {
            assert!(
                std::time::Instant::now() < deadline,
                "the refresh never finished"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(issued.load(Ordering::SeqCst), 1);
        // The next refresh sends the rotated token (a strict server would revoke on RT-0).
        let stale_key = key("t", &url);
        {
            let states = broker.states.lock().unwrap();
            let mut s = states.get(&stale_key).unwrap().lock().unwrap();
            if let Some(a) = s.access.as_mut() {
                *a = Arc::new(AccessToken {
                    token: a.token.clone(),
                    expires_at: Some(SystemTime::now()),
                    issued_at: Some(SystemTime::now() - Duration::from_secs(3600)),
                });
            }
        }
        let token = broker
            .token(
                &stale_key,
                &endpoint(&url),
                &GrantKind::RefreshToken,
                Seed::default,
            )
            .await
            .unwrap();
        assert_eq!(token.token.as_str(), "AT-2");
        assert_eq!(
            *persisted.lock().unwrap(),
            vec!["AT-1|RT-1".to_string(), "AT-2|RT-2".to_string()]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_refresh_reaches_every_waiter_and_the_next_call_tries_again() {
        let calls = Arc::new(AtomicUsize::new(0));
        let n = calls.clone();
        let script: Script = Arc::new(move |_| {
            // Long enough for all 50 waiters to join this refresh, even on a busy machine.
            std::thread::sleep(Duration::from_millis(500));
            if n.fetch_add(1, Ordering::SeqCst) == 0 {
                (503, vec![], "<html>down</html>".into())
            } else {
                (
                    200,
                    vec![],
                    r#"{"access_token": "AT-ok", "expires_in": 3600}"#.into(),
                )
            }
        });
        let (url, _) = fake_endpoint(script).await;
        let (persist, _) = recorder();
        let broker = Arc::new(broker(persist, fast()));
        let mut waiters = Vec::new();
        for _ in 0..50 {
            let (broker, url) = (broker.clone(), url.clone());
            waiters.push(tokio::spawn(async move {
                ask(
                    &broker,
                    "t",
                    &url,
                    GrantKind::ClientCredentials,
                    Seed::default,
                )
                .await
            }));
        }
        for w in waiters {
            assert_eq!(w.await.unwrap().unwrap_err().class(), "unavailable");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(10)).await; // past the (tiny) backoff
        let token = ask(
            &broker,
            "t",
            &url,
            GrantKind::ClientCredentials,
            Seed::default,
        )
        .await
        .unwrap();
        assert_eq!(token.token.as_str(), "AT-ok");
        assert_eq!(broker.counts.get("unavailable"), 1);
        assert_eq!(broker.counts.get("ok"), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_store_keeps_the_new_token_and_retries_until_it_is_stored() {
        let (script, _) = rotating_server(Duration::ZERO);
        let (url, seen) = fake_endpoint(script).await;
        let attempts = Arc::new(AtomicUsize::new(0));
        let stored = Arc::new(Mutex::new(Vec::new()));
        let (a, st) = (attempts.clone(), stored.clone());
        let persist: Persist = Arc::new(move |_key, tokens, _replaced| {
            let n = a.fetch_add(1, Ordering::SeqCst);
            let rt = tokens.refresh_token.as_deref().cloned().unwrap_or_default();
            let st = st.clone();
            async move {
                if n < 2 {
                    Err("disk full".to_string())
                } else {
                    st.lock().unwrap().push(rt);
                    Ok(())
                }
            }
            .boxed()
        });
        let broker = broker(persist, fast());
        let k = key("t", &url);
        let token = broker
            .token(&k, &endpoint(&url), &GrantKind::RefreshToken, expired_seed)
            .await
            .unwrap();
        // Served from memory: the rotated token, never the old one.
        assert_eq!(token.token.as_str(), "AT-1");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while stored.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never stored");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*stored.lock().unwrap(), vec!["RT-1".to_string()]);
        assert_eq!(
            seen.lock().unwrap().len(),
            1,
            "no second refresh to get there"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refresh_task_that_dies_does_not_poison_the_next_one() {
        let (url, seen) = fake_endpoint(answer_ok()).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let n = calls.clone();
        let persist: Persist = Arc::new(move |_key, _tokens, _replaced| {
            let first = n.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                assert!(!first, "a store hook that panics (deliberately, once)");
                Ok(())
            }
            .boxed()
        });
        let broker = broker(persist, fast());
        let err = ask(
            &broker,
            "t",
            &url,
            GrantKind::ClientCredentials,
            Seed::default,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("refresh task failed"), "{err}");
        let token = ask(
            &broker,
            "t",
            &url,
            GrantKind::ClientCredentials,
            Seed::default,
        )
        .await
        .unwrap();
        assert_eq!(token.token.as_str(), "AT-ok");
        assert_eq!(
            seen.lock().unwrap().len(),
            2,
            "the second call made its own request"
        );
    }

    fn answer_ok() -> Script {
        Arc::new(|_| {
            (
                200,
                vec![],
                r#"{"access_token": "AT-ok", "expires_in": 3600}"#.into(),
            )
        })
    }

    #[tokio::test]
    async fn invalid_grant_needs_re_consent_and_later_calls_fail_fast() {
        let (url, seen) = fake_endpoint(Arc::new(|_| {
            (400, vec![], r#"{"error": "invalid_grant"}"#.into())
        }))
        .await;
        let (persist, _) = recorder();
        let broker = broker(persist, fast());
        let k = key("t", &url);
        for _ in 0..5 {
            let err = broker
                .token(&k, &endpoint(&url), &GrantKind::RefreshToken, expired_seed)
                .await
                .unwrap_err();
            assert_eq!(err.class(), "invalid_grant");
        }
        assert_eq!(seen.lock().unwrap().len(), 1, "one request, no retry loop");
        assert!(broker.needs_consent(&k));
    }

    #[tokio::test]
    async fn rate_limits_are_shared_per_host_and_a_valid_token_keeps_being_served() {
        let (url, seen) = fake_endpoint(Arc::new(|_| {
            (429, vec![("retry-after", "120".to_string())], String::new())
        }))
        .await;
        let (persist, _) = recorder();
        let broker = broker(persist, fast());
        // Stale (inside the skew) but not expired: served despite the 429.
        let soon = || Seed {
            issued_at: None,
            access_token: Some(Zeroizing::new("STILL-VALID".into())),
            expires_at: Some(SystemTime::now() + Duration::from_secs(30)),
            refresh_token: Some(Zeroizing::new("RT".into())),
            supersedes: Vec::new(),
        };
        let first = ask(&broker, "a", &url, GrantKind::RefreshToken, soon).await;
        assert_eq!(
            first.unwrap_err().class(),
            "rate_limited",
            "the refresh itself reports the 429"
        );
        let served = ask(&broker, "a", &url, GrantKind::RefreshToken, soon)
            .await
            .unwrap();
        assert_eq!(served.token.as_str(), "STILL-VALID");
        // Another credential at the same host waits too, without a request.
        let other = ask(&broker, "b", &url, GrantKind::RefreshToken, expired_seed)
            .await
            .unwrap_err();
        assert!(
            matches!(other, TokenError::RateLimited { retry_after } if retry_after > Duration::from_secs(100))
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_skew_is_shortened_for_short_lived_tokens_and_expiry_counts_at_the_boundary() {
        let (persist, _) = recorder();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let broker = rt.block_on(async { broker(persist, BrokerSettings::default()) });
        let now = SystemTime::now();
        let token = |lifetime: u64, issued_ago: u64| AccessToken {
            token: Zeroizing::new("t".into()),
            issued_at: Some(now - Duration::from_secs(issued_ago)),
            expires_at: Some(now - Duration::from_secs(issued_ago) + Duration::from_secs(lifetime)),
        };
        // An hour-long token: stale 60 s before expiry, not before.
        assert!(!broker.stale(&token(3600, 3539), now));
        assert!(
            broker.stale(&token(3600, 3540), now),
            "now + skew == expiry counts as expired"
        );
        // A 20 s token: the skew is 10 s, so it serves its first 10 s without a refresh.
        assert!(!broker.stale(&token(20, 5), now));
        assert!(broker.stale(&token(20, 10), now));
        // No expiry known: never stale by time.
        let unknown = AccessToken {
            token: Zeroizing::new("t".into()),
            issued_at: Some(now),
            expires_at: None,
        };
        assert!(!broker.stale(&unknown, now));
        // Issue time unknown (a seeded token): the full skew.
        let seeded = AccessToken {
            token: Zeroizing::new("t".into()),
            issued_at: None,
            expires_at: Some(now + Duration::from_secs(30)),
        };
        assert!(broker.stale(&seeded, now));
    }

    #[tokio::test]
    async fn two_tenants_with_one_client_id_at_different_token_urls_never_share_a_token() {
        let (url_a, _) = fake_endpoint(Arc::new(|_| {
            (200, vec![], r#"{"access_token": "FROM-A"}"#.into())
        }))
        .await;
        let (url_b, _) = fake_endpoint(Arc::new(|_| {
            (200, vec![], r#"{"access_token": "FROM-B"}"#.into())
        }))
        .await;
        let (persist, _) = recorder();
        let broker = broker(persist, fast());
        let a = ask(
            &broker,
            "t1",
            &url_a,
            GrantKind::ClientCredentials,
            Seed::default,
        )
        .await
        .unwrap();
        let b = ask(
            &broker,
            "t2",
            &url_b,
            GrantKind::ClientCredentials,
            Seed::default,
        )
        .await
        .unwrap();
        assert_eq!((a.token.as_str(), b.token.as_str()), ("FROM-A", "FROM-B"));
        assert_ne!(host_of(&url_a), host_of(&url_b));
        assert_eq!(
            host_of("https://login.example.com:8443/oauth/token?x=1"),
            "https://login.example.com:8443"
        );
    }
}
