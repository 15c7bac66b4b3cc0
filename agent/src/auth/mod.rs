//! Who may use the local API (design §6): roles, the bearer tokens that carry them, and the
//! auth providers that check a user's password before a token is issued: the built-in users
//! of `[api.users]`, and a directory (`[api.ldap]`, [`ldap`]) for every other name.
//!
//! Two kinds of bearer token are accepted:
//! - the agent's own admin token (`<state_dir>/admin.token`, 0600): role `admin`, no expiry.
//!   Whoever can read that file can already read the agent's state, so it grants nothing more.
//! - a session token from `POST /v1/auth/token`, after the [`AuthProvider`] accepted the user's
//!   password: the user's role, valid for `api.token_ttl_secs`. Only its SHA-256 is kept, in
//!   memory: a restart ends every session.
//!
//! A wrong password and an unknown user cost the same: an unknown user's password is checked
//! against a decoy hash with the same parameters, so the answer's timing does not tell which
//! user names exist. Password checks (Argon2, memory-hard) run on the blocking pool, at most
//! [`MAX_PASSWORD_CHECKS`] at a time, so a flood of logins cannot exhaust memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::config::{ApiConfig, ApiUser, LdapConfig};

pub mod ldap;
pub mod throttle;

/// Longest user name accepted at a login (a longer one is refused before anything else).
pub const MAX_USER_NAME_BYTES: usize = 256;

/// Password checks that may run at once (each Argon2 check holds its memory cost, 19 MiB by
/// default).
pub const MAX_PASSWORD_CHECKS: usize = 4;

/// What a user may do. Each role may do what the ones below it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read: status, connectors, tenants (never their secrets).
    Viewer,
    /// Also run capability calls.
    Operator,
    /// Also store and delete tenants.
    Admin,
}

impl Role {
    /// The names `[api.users.<name>] role` takes.
    pub const NAMES: &'static [&'static str] = &["admin", "operator", "viewer"];

    /// A role by its name (`admin`, `operator`, `viewer`).
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

/// Why a login was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The same answer for an unknown user and a wrong password.
    #[error("wrong user name or password")]
    WrongCredentials,
    /// The provider could not check the password at all.
    #[error("the {provider} auth provider cannot check passwords now: {detail}")]
    Unavailable {
        /// The provider's name.
        provider: &'static str,
        /// What failed.
        detail: String,
    },
    /// The password is right, but the user is in none of the groups that give a role.
    #[error(
        "{user} is in none of the directory groups that give a role on this agent \
         (api.ldap.admin_groups, operator_groups, viewer_groups)"
    )]
    NoRole {
        /// The user.
        user: String,
    },
    /// A user name longer than [`MAX_USER_NAME_BYTES`]: refused before anything else, as the
    /// throttle keeps the names that failed.
    #[error("the user name is over {MAX_USER_NAME_BYTES} bytes")]
    NameTooLong,
    /// No user can log in: the config lists none and names no directory. Saying so tells a
    /// guesser nothing worth knowing, and an admin what to do.
    #[error(
        "this agent has no users to log in as: add [api.users.<name>] (or [api.ldap]) to its \
         config; the admin token (<state_dir>/admin.token) works without"
    )]
    NoUsers,
    /// Too many failed logins of this name lately ([`throttle`]); not tried.
    #[error(
        "too many failed logins for this user name; retry in {} s",
        retry_after.as_secs_f64().ceil()
    )]
    Throttled {
        /// How long until a login of this name is tried again.
        retry_after: Duration,
    },
}

impl LoginError {
    /// The outcome's name in `lumos_agent_api_logins_total{outcome}`.
    pub fn outcome(&self) -> &'static str {
        match self {
            LoginError::WrongCredentials => "wrong_credentials",
            LoginError::Unavailable { .. } => "unavailable",
            LoginError::NoRole { .. } => "no_role",
            LoginError::Throttled { .. } => "throttled",
            LoginError::NoUsers => "no_users",
            LoginError::NameTooLong => "bad_request",
        }
    }
}

/// Why a request's bearer token was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header.
    #[error(
        "no bearer token: send `Authorization: Bearer <token>` (a token from `POST \
         /v1/auth/token` or `lumos-agent login`{})",
        if *.admin_token { ", or <state_dir>/admin.token" } else { "" }
    )]
    Missing {
        /// Whether the admin token is accepted (`api.admin_token`), so worth naming.
        admin_token: bool,
    },
    /// A token this agent did not issue, or one revoked by a logout, a restart or a change of
    /// the user in the config.
    #[error(
        "unknown bearer token (sessions end at a logout, a restart of the agent, or a change of \
         the user in the config): log in again"
    )]
    Unknown,
    /// A session token past its `api.token_ttl_secs`.
    #[error("the bearer token has expired: log in again (`lumos-agent login`)")]
    Expired,
}

/// Checks a user's password and says what the user may do (design §6: pluggable; the agent
/// has a built-in provider with users in the config).
pub trait AuthProvider: Send + Sync + std::fmt::Debug {
    /// Its name, for messages and logs.
    fn name(&self) -> &'static str;
    /// The user's role if `password` is theirs.
    fn authenticate<'a>(
        &'a self,
        user: &'a str,
        password: &'a [u8],
    ) -> BoxFuture<'a, Result<Role, LoginError>>;
}

/// The built-in provider: `[api.users.<name>]` with Argon2 password hashes.
pub struct BuiltinUsers {
    users: BTreeMap<String, ApiUser>,
    /// Checked for an unknown user, so that it costs what a known one does: a hash that no
    /// password matches, in the form of the hashes most users have (see [`decoy_model`]); or,
    /// should the OS have no randomness, a user's hash (an unknown user is refused whatever
    /// the check says).
    decoy: Option<Arc<str>>,
    /// Argon2 checks made, counted for tests: a refusal that skipped the check would show.
    checks: AtomicU64,
}

impl std::fmt::Debug for BuiltinUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let users: BTreeMap<&str, &str> = self
            .users
            .iter()
            .map(|(name, user)| (name.as_str(), user.role.as_str()))
            .collect();
        f.debug_struct("BuiltinUsers")
            .field("users", &users)
            .finish_non_exhaustive()
    }
}

impl BuiltinUsers {
    /// The users of the config (names already lower case).
    pub fn new(users: BTreeMap<String, ApiUser>) -> Self {
        // Without users there is no name to tell apart.
        let decoy = decoy_model(&users)
            .map(|model| decoy_like(model).unwrap_or_else(|_| model.to_string()))
            .map(Arc::from);
        Self {
            users,
            decoy,
            checks: AtomicU64::new(0),
        }
    }

    /// How many passwords were checked against a hash (the users' or the decoy).
    pub fn password_checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }
}

impl AuthProvider for BuiltinUsers {
    fn name(&self) -> &'static str {
        "built-in"
    }

    fn authenticate<'a>(
        &'a self,
        user: &'a str,
        password: &'a [u8],
    ) -> BoxFuture<'a, Result<Role, LoginError>> {
        Box::pin(async move {
            let found = self.users.get(&user.to_lowercase());
            let (hash, role): (Arc<str>, Option<Role>) = match (found, &self.decoy) {
                (Some(u), _) => (Arc::from(u.password_hash.as_str()), Some(u.role)),
                (None, Some(decoy)) => (decoy.clone(), None),
                // No users at all: no name to tell apart.
                (None, None) => return Err(LoginError::WrongCredentials),
            };
            let password = Zeroizing::new(password.to_vec());
            self.checks.fetch_add(1, Ordering::Relaxed);
            let matched = tokio::task::spawn_blocking(move || verify(&hash, &password))
                .await
                .map_err(|e| LoginError::Unavailable {
                    provider: "built-in",
                    detail: format!("the password check failed: {e}"),
                })?;
            match (matched, role) {
                (true, Some(role)) => Ok(role),
                _ => Err(LoginError::WrongCredentials),
            }
        })
    }
}

fn verify(hash: &str, password: &[u8]) -> bool {
    PasswordHash::new(hash)
        .is_ok_and(|parsed| Argon2::default().verify_password(password, &parsed).is_ok())
}

/// Where a session's user was found: a reload ends the sessions whose source changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Builtin,
    Ldap,
}

/// The providers of one configuration, and the lifetime of the tokens issued after them: a
/// name in `[api.users]` is the built-in provider's, any other the directory's (if
/// `[api.ldap]` is set). A reload swaps in a whole new one.
#[derive(Debug)]
pub struct UserDirectory {
    builtin: BuiltinUsers,
    ldap: Option<ldap::LdapDirectory>,
    /// `api.token_ttl_secs`.
    ttl: Duration,
}

impl UserDirectory {
    /// The providers `config` describes.
    pub fn new(config: &ApiConfig) -> Self {
        Self {
            builtin: BuiltinUsers::new(config.users.clone()),
            ldap: config.ldap.clone().map(ldap::LdapDirectory::new),
            ttl: config.token_ttl,
        }
    }

    /// How many passwords the built-in provider checked against a hash.
    pub fn password_checks(&self) -> u64 {
        self.builtin.password_checks()
    }

    fn source_of(&self, user: &str) -> Source {
        if self.ldap.is_none() || self.builtin.users.contains_key(&user.to_lowercase()) {
            Source::Builtin
        } else {
            Source::Ldap
        }
    }

    fn ldap_config(&self) -> Option<&LdapConfig> {
        self.ldap.as_ref().map(ldap::LdapDirectory::config)
    }
}

impl AuthProvider for UserDirectory {
    fn name(&self) -> &'static str {
        if self.ldap.is_some() {
            "built-in and LDAP"
        } else {
            "built-in"
        }
    }

    fn authenticate<'a>(
        &'a self,
        user: &'a str,
        password: &'a [u8],
    ) -> BoxFuture<'a, Result<Role, LoginError>> {
        if self.ldap.is_none() && self.builtin.users.is_empty() {
            return Box::pin(async { Err(LoginError::NoUsers) });
        }
        match (&self.ldap, self.source_of(user)) {
            (Some(directory), Source::Ldap) => directory.authenticate(user, password),
            _ => self.builtin.authenticate(user, password),
        }
    }
}

/// An Argon2id hash of `password` in PHC form, with a fresh random salt and the `argon2`
/// crate's default parameters (OWASP's: 19 MiB, 2 passes, 1 lane).
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| format!("no randomness for a salt: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| e.to_string())
}

/// The hash whose cost the decoy copies: one of the parameter set (algorithm, version, memory,
/// passes, lanes) that most users' hashes share, so that an unknown name costs what most known
/// ones do. Not `hash_password`'s parameters: hashes made elsewhere, or before its parameters
/// change, may cost more or less, and the difference would tell names apart. `None` without
/// users (there is no name to tell apart).
fn decoy_model(users: &BTreeMap<String, ApiUser>) -> Option<&str> {
    let mut sets: HashMap<String, (usize, &str)> = HashMap::new();
    for user in users.values() {
        let hash = user.password_hash.as_str();
        // Unusable hashes are refused by the config's check; one that slipped by is no model.
        let Ok(parsed) = PasswordHash::new(hash) else {
            continue;
        };
        let set = format!(
            "{}${:?}${}",
            parsed.algorithm, parsed.version, parsed.params
        );
        sets.entry(set).or_insert((0, hash)).0 += 1;
    }
    let most = sets
        .into_values()
        .max_by_key(|&(count, hash)| (count, std::cmp::Reverse(hash)));
    most.map(|(_, hash)| hash)
        .or_else(|| users.values().next().map(|u| u.password_hash.as_str()))
}

/// A hash in `model`'s form (algorithm, version, parameters, salt and output lengths) that no
/// password matches: its salt and output are random. Checking a password against it costs
/// what checking `model` does, and making it costs nothing, where hashing a random password
/// would take an Argon2 run (tens of milliseconds) at every start and reload.
fn decoy_like(model: &str) -> Result<String, String> {
    let model = PasswordHash::new(model).map_err(|e| e.to_string())?;
    let mut salt_buf = [0u8; 64];
    let salt_len = model
        .salt
        .and_then(|salt| salt.decode_b64(&mut salt_buf).ok().map(<[u8]>::len))
        .unwrap_or(16);
    let output_len = model
        .hash
        .map_or(argon2::Params::DEFAULT_OUTPUT_LEN, |output| output.len());
    let mut random = vec![0u8; salt_len + output_len];
    getrandom::fill(&mut random).map_err(|e| format!("no randomness for a decoy: {e}"))?;
    let (salt, output) = random.split_at(salt_len);
    let salt = SaltString::encode_b64(salt).map_err(|e| e.to_string())?;
    let hash = PasswordHash {
        algorithm: model.algorithm,
        version: model.version,
        params: model.params.clone(),
        salt: Some(salt.as_salt()),
        hash: Some(argon2::password_hash::Output::new(output).map_err(|e| e.to_string())?),
    };
    Ok(hash.to_string())
}

/// Whether `hash` is a usable Argon2 hash in PHC form; the reason if not (for `check-config`).
pub fn check_password_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| {
        format!("not a password hash in PHC form ({e}); make one with `lumos-agent hash-password`")
    })?;
    let algorithm = parsed.algorithm.as_str();
    if !["argon2id", "argon2i", "argon2d"].contains(&algorithm) {
        return Err(format!(
            "a {algorithm} hash: only Argon2 hashes are accepted; make one with `lumos-agent \
             hash-password`"
        ));
    }
    argon2::Params::try_from(&parsed)
        .map_err(|e| format!("Argon2 parameters that cannot be used ({e})"))?;
    if parsed.hash.is_none() {
        return Err("a PHC string without its hash part".into());
    }
    Ok(())
}

/// Who made a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The user, or `admin.token` for the agent's own token.
    pub user: String,
    /// What they may do.
    pub role: Role,
    /// When the token expires; `None` for the admin token.
    pub expires_at: Option<SystemTime>,
    /// The session's key (the token's SHA-256), for a logout; `None` for the admin token.
    session: Option<[u8; 32]>,
}

/// A token issued at a login.
pub struct Issued {
    /// The bearer token: shown once, to the caller.
    pub token: Zeroizing<String>,
    /// The user's role.
    pub role: Role,
    /// Its lifetime.
    pub expires_in: Duration,
    /// When it expires.
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("token", &"<redacted>")
            .field("role", &self.role)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

struct Session {
    user: String,
    source: Source,
    role: Role,
    expires: Instant,
    expires_at: SystemTime,
}

/// A token's SHA-256, as tokens are compared and sessions kept.
fn digest_of(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The local API's authentication: the admin token, the provider, and the live sessions.
pub struct ApiAuth {
    /// SHA-256 of the admin token (comparing digests keeps the comparison length-independent);
    /// `None` while `api.admin_token = false`.
    admin_digest: RwLock<Option<[u8; 32]>>,
    provider: RwLock<Arc<UserDirectory>>,
    /// Sessions by the SHA-256 of their token.
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    checks: tokio::sync::Semaphore,
    throttle: throttle::LoginThrottle,
}

impl std::fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiAuth")
            .field("provider", &self.provider())
            .field("sessions", &self.lock_sessions().len())
            .finish_non_exhaustive()
    }
}

impl ApiAuth {
    /// Authentication with the agent's admin token (`None`: not accepted) and the config's
    /// users.
    pub fn new(admin_token: Option<&str>, config: &ApiConfig) -> Self {
        Self {
            admin_digest: RwLock::new(admin_token.map(digest_of)),
            provider: RwLock::new(Arc::new(UserDirectory::new(config))),
            sessions: Mutex::default(),
            checks: tokio::sync::Semaphore::new(MAX_PASSWORD_CHECKS),
            throttle: throttle::LoginThrottle::default(),
        }
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A reload that turns the admin token on (with the token now in its file) or off.
    pub fn set_admin_token(&self, admin_token: Option<&str>) {
        *self
            .admin_digest
            .write()
            .unwrap_or_else(PoisonError::into_inner) = admin_token.map(digest_of);
    }

    /// The provider that checks passwords.
    pub fn provider(&self) -> Arc<UserDirectory> {
        self.provider
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A reloaded config: new users and lifetime. The sessions of a user who is gone or whose
    /// role changed end now; the others keep their expiry.
    pub fn configure(&self, config: &ApiConfig) {
        // Swapped in under the sessions' lock, as `login` checks it, so that no session of the
        // old users' roles outlives this.
        let provider = Arc::new(UserDirectory::new(config));
        let same_directory = self.provider().ldap_config() == config.ldap.as_ref();
        let mut sessions = self.lock_sessions();
        *self
            .provider
            .write()
            .unwrap_or_else(PoisonError::into_inner) = provider;
        let users = &config.users;
        sessions.retain(|_, s| match s.source {
            // A directory user keeps their session while the directory's settings stay, and
            // no built-in user of the same name appeared.
            Source::Ldap => same_directory && !users.contains_key(&s.user),
            Source::Builtin => users.get(&s.user).is_some_and(|u| u.role == s.role),
        });
    }

    /// The request's principal from its `Authorization` header value (`Bearer <token>`).
    pub fn check(&self, authorization: Option<&str>) -> Result<Principal, Denied> {
        let token = authorization
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let admin = *self
            .admin_digest
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let token = token.ok_or(Denied::Missing {
            admin_token: admin.is_some(),
        })?;
        let digest = digest_of(token);
        if admin.is_some_and(|admin| bool::from(digest.ct_eq(&admin))) {
            return Ok(Principal {
                user: "admin.token".into(),
                role: Role::Admin,
                expires_at: None,
                session: None,
            });
        }
        let mut sessions = self.lock_sessions();
        let session = sessions.get(&digest).ok_or(Denied::Unknown)?;
        if Instant::now() >= session.expires {
            sessions.remove(&digest);
            return Err(Denied::Expired);
        }
        Ok(Principal {
            user: session.user.clone(),
            role: session.role,
            expires_at: Some(session.expires_at),
            session: Some(digest),
        })
    }

    /// Checks the password with the provider and issues a token for the user's role.
    pub async fn login(&self, user: &str, password: &[u8]) -> Result<Issued, LoginError> {
        if user.len() > MAX_USER_NAME_BYTES {
            return Err(LoginError::NameTooLong);
        }
        let name = user.to_lowercase();
        if let Some(retry_after) = self.throttle.wait(&name) {
            return Err(LoginError::Throttled { retry_after });
        }
        let result = self.check_and_issue(user, password).await;
        match &result {
            Ok(_) => self.throttle.succeeded(&name),
            Err(LoginError::WrongCredentials) => self.throttle.failed(&name),
            // The password was right (no role), or nothing was checked.
            Err(_) => {}
        }
        result
    }

    async fn check_and_issue(&self, user: &str, password: &[u8]) -> Result<Issued, LoginError> {
        let mut provider = self.provider();
        loop {
            let source = provider.source_of(user);
            let role = {
                // Closed never; a permit only bounds how many checks run at once.
                let _permit = self
                    .checks
                    .acquire()
                    .await
                    .map_err(|e| LoginError::Unavailable {
                        provider: provider.name(),
                        detail: e.to_string(),
                    })?;
                provider.authenticate(user, password).await?
            };
            let mut random = Zeroizing::new([0u8; 32]);
            getrandom::fill(random.as_mut()).map_err(|e| LoginError::Unavailable {
                provider: provider.name(),
                detail: format!("no randomness for a token: {e}"),
            })?;
            let token = Zeroizing::new(format!("lat_{}", hex::encode(random.as_ref())));
            // Under the sessions' lock, which a reload holds while it replaces the users and
            // weeds the sessions: either this session is weeded or the check was the new users'.
            let mut sessions = self.lock_sessions();
            let current = self.provider();
            if !Arc::ptr_eq(&current, &provider) {
                // A reload replaced the users meanwhile: the role may be another, or none.
                drop(sessions);
                provider = current;
                continue;
            }
            let ttl = provider.ttl;
            let now = Instant::now();
            let expires_at = SystemTime::now() + ttl;
            // Ended sessions go as new ones come: the map holds at most a lifetime of logins.
            sessions.retain(|_, s| s.expires > now);
            sessions.insert(
                digest_of(&token),
                Session {
                    user: user.to_lowercase(),
                    source,
                    role,
                    expires: now + ttl,
                    expires_at,
                },
            );
            return Ok(Issued {
                token,
                role,
                expires_in: ttl,
                expires_at,
            });
        }
    }

    /// Ends the principal's session; `false` for the admin token, which has none.
    pub fn logout(&self, principal: &Principal) -> bool {
        principal
            .session
            .is_some_and(|key| self.lock_sessions().remove(&key).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(users: &[(&str, &str, Role)], ttl: Duration) -> ApiConfig {
        ApiConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            token_ttl: ttl,
            ldap: None,
            max_connections: crate::config::DEFAULT_API_CONNECTIONS,
            admin_token: true,
            users: users
                .iter()
                .map(|(name, password, role)| {
                    let user = ApiUser {
                        password_hash: hash_password(password.as_bytes()).unwrap(),
                        role: *role,
                    };
                    ((*name).to_string(), user)
                })
                .collect(),
        }
    }

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    #[test]
    fn hashes_are_salted_argon2id_and_the_checker_names_what_else_it_gets() {
        let a = hash_password(b"correct horse").unwrap();
        let b = hash_password(b"correct horse").unwrap();
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b, "a fresh salt each time");
        check_password_hash(&a).unwrap();
        assert!(verify(&a, b"correct horse"));
        assert!(!verify(&a, b"correct horsf"));
        let bcrypt = "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW";
        assert!(check_password_hash(bcrypt)
            .unwrap_err()
            .contains("hash-password"));
        let sha = "$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
        assert!(check_password_hash(sha)
            .unwrap_err()
            .starts_with("a pbkdf2-sha256 hash"));
        assert!(check_password_hash("hunter2")
            .unwrap_err()
            .starts_with("not a password hash in PHC form"));
    }

    #[tokio::test]
    async fn a_login_issues_a_token_of_the_users_role_and_the_admin_token_stays_admin() {
        let auth = ApiAuth::new(
            Some("the-admin-token"),
            &config(
                &[("alice", "pw-a", Role::Operator)],
                Duration::from_secs(60),
            ),
        );
        let admin = auth.check(Some("Bearer the-admin-token")).unwrap();
        assert_eq!((admin.role, admin.expires_at), (Role::Admin, None));
        assert!(!auth.logout(&admin));

        // User names are not case-sensitive (the config's keys are lower-cased).
        let issued = auth.login("Alice", b"pw-a").await.unwrap();
        assert_eq!(issued.role, Role::Operator);
        assert!(issued.token.starts_with("lat_"));
        assert!(!format!("{issued:?}").contains(issued.token.as_str()));
        let who = auth.check(Some(&bearer(&issued.token))).unwrap();
        assert_eq!((who.user.as_str(), who.role), ("alice", Role::Operator));

        let missing = Denied::Missing { admin_token: true };
        assert_eq!(auth.check(None), Err(missing.clone()));
        assert_eq!(auth.check(Some("Basic abc")), Err(missing.clone()));
        assert!(missing.to_string().ends_with("or <state_dir>/admin.token)"));
        assert_eq!(auth.check(Some("Bearer lat_0000")), Err(Denied::Unknown));
        assert!(auth.logout(&who));
        assert_eq!(
            auth.check(Some(&bearer(&issued.token))),
            Err(Denied::Unknown)
        );

        // `api.admin_token = false` (at a reload): the admin token is one like any other
        // unknown token; a user's session is unaffected; on again, it is admin again.
        let issued = auth.login("alice", b"pw-a").await.unwrap();
        auth.set_admin_token(None);
        assert_eq!(
            auth.check(Some("Bearer the-admin-token")),
            Err(Denied::Unknown)
        );
        // Nor is it offered to a request without a token.
        let missing = auth.check(None).unwrap_err();
        assert_eq!(missing, Denied::Missing { admin_token: false });
        assert!(!missing.to_string().contains("admin.token"), "{missing}");
        assert_eq!(
            auth.check(Some(&bearer(&issued.token))).unwrap().role,
            Role::Operator
        );
        auth.set_admin_token(Some("a-new-admin-token"));
        assert_eq!(
            auth.check(Some("Bearer the-admin-token")),
            Err(Denied::Unknown)
        );
        assert_eq!(
            auth.check(Some("Bearer a-new-admin-token")).unwrap().role,
            Role::Admin
        );
    }

    #[tokio::test]
    async fn an_unknown_user_costs_a_password_check_like_a_wrong_password() {
        let auth = ApiAuth::new(
            Some("admin"),
            &config(&[("alice", "pw-a", Role::Viewer)], Duration::from_secs(60)),
        );
        let provider = auth.provider();
        let before = provider.password_checks();
        let wrong = auth.login("alice", b"nope").await.unwrap_err();
        let unknown = auth.login("mallory", b"nope").await.unwrap_err();
        // One Argon2 check each, and the same words.
        assert_eq!(provider.password_checks() - before, 2);
        assert_eq!(wrong.to_string(), unknown.to_string());
        assert_eq!(wrong.to_string(), "wrong user name or password");
        // A decoy accepts nobody, even with its own password unknown to the test.
        assert!(matches!(
            auth.login("mallory", b"").await,
            Err(LoginError::WrongCredentials)
        ));
    }

    #[test]
    fn the_decoy_hash_has_the_form_and_cost_of_its_model_and_matches_nothing() {
        // One made with hash-password, and one made elsewhere with other costs.
        let light = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(8192, 3, 1, Some(24)).unwrap(),
        )
        .hash_password(
            b"a password",
            &SaltString::from_b64("c2FsdHNhbHRzYWx0").unwrap(),
        )
        .unwrap()
        .to_string();
        for model in [hash_password(b"a password").unwrap(), light] {
            let decoy = decoy_like(&model).unwrap();
            let (real, decoy_parsed) = (
                PasswordHash::new(&model).unwrap(),
                PasswordHash::new(&decoy).unwrap(),
            );
            assert_eq!(decoy_parsed.algorithm, real.algorithm);
            assert_eq!(decoy_parsed.version, real.version);
            assert_eq!(decoy_parsed.params, real.params);
            assert_eq!(
                decoy_parsed.salt.map(|s| s.len()),
                real.salt.map(|s| s.len())
            );
            assert_eq!(
                decoy_parsed.hash.map(|h| h.len()),
                real.hash.map(|h| h.len())
            );
            assert!(check_password_hash(&decoy).is_ok());
            assert!(!verify(&decoy, b""));
            assert!(!verify(&decoy, b"a password"));
            // Random each time: two agents (or reloads) share no decoy.
            assert_ne!(decoy, decoy_like(&model).unwrap());
        }
    }

    #[test]
    fn the_decoy_costs_what_most_users_hashes_cost() {
        let hash_with = |m_cost: u32| {
            argon2::Argon2::new(
                argon2::Algorithm::Argon2id,
                argon2::Version::V0x13,
                argon2::Params::new(m_cost, 1, 1, None).unwrap(),
            )
            .hash_password(b"pw", &SaltString::from_b64("c2FsdHNhbHRzYWx0").unwrap())
            .unwrap()
            .to_string()
        };
        let user = |hash: &str| ApiUser {
            password_hash: hash.to_string(),
            role: Role::Viewer,
        };
        // Two users share a cost the default does not have; the first by name has another.
        let users: BTreeMap<String, ApiUser> = [
            ("alice", hash_with(4096)),
            ("bob", hash_with(8192)),
            ("carol", hash_with(8192)),
        ]
        .into_iter()
        .map(|(name, hash)| (name.to_string(), user(&hash)))
        .collect();
        let decoy = BuiltinUsers::new(users).decoy.unwrap();
        let params = PasswordHash::new(&decoy).unwrap().params.to_string();
        assert_eq!(params, "m=8192,t=1,p=1", "{decoy}");
        assert!(BuiltinUsers::new(BTreeMap::new()).decoy.is_none());
    }

    // The clock is paused: the waits are exact, however slow the password checks are.
    #[tokio::test(start_paused = true)]
    async fn failed_logins_shut_the_name_out_before_its_password_is_checked() {
        let auth = ApiAuth::new(
            Some("admin"),
            &config(&[("olga", "pw-o", Role::Viewer)], Duration::from_secs(60)),
        );
        let provider = auth.provider();
        for _ in 0..throttle::FREE_FAILURES {
            assert!(matches!(
                auth.login("olga", b"guess").await,
                Err(LoginError::WrongCredentials)
            ));
        }
        let checks = provider.password_checks();
        // Even the right password waits now, and costs no check; so does an unknown name's
        // guess once it failed as often (nothing tells the two apart).
        let refused = auth.login("OLGA", b"pw-o").await.unwrap_err();
        assert!(matches!(refused, LoginError::Throttled { .. }), "{refused}");
        assert_eq!(
            refused.to_string(),
            "too many failed logins for this user name; retry in 1 s"
        );
        assert_eq!(provider.password_checks(), checks);
        for _ in 0..=throttle::FREE_FAILURES {
            let _ = auth.login("mallory", b"guess").await;
        }
        assert!(matches!(
            auth.login("mallory", b"guess").await,
            Err(LoginError::Throttled { .. })
        ));
        // Another user is not held back.
        assert!(auth.login("ann", b"x").await.is_err());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            auth.login("olga", b"pw-o").await.unwrap().role,
            Role::Viewer
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_expire_after_their_lifetime() {
        let auth = ApiAuth::new(
            Some("admin"),
            &config(&[("bob", "pw-b", Role::Viewer)], Duration::from_secs(600)),
        );
        let issued = auth.login("bob", b"pw-b").await.unwrap();
        assert_eq!(issued.expires_in, Duration::from_secs(600));
        let header = bearer(&issued.token);
        tokio::time::advance(Duration::from_secs(599)).await;
        assert_eq!(auth.check(Some(&header)).unwrap().role, Role::Viewer);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(auth.check(Some(&header)), Err(Denied::Expired));
        // Gone once seen expired.
        assert_eq!(auth.check(Some(&header)), Err(Denied::Unknown));
    }

    #[tokio::test]
    async fn a_reload_ends_the_sessions_of_users_removed_or_given_another_role() {
        let ttl = Duration::from_secs(600);
        let auth = ApiAuth::new(
            Some("admin"),
            &config(
                &[
                    ("keep", "k", Role::Viewer),
                    ("demote", "d", Role::Admin),
                    ("remove", "r", Role::Operator),
                ],
                ttl,
            ),
        );
        let mut tokens = Vec::new();
        for (user, password) in [("keep", "k"), ("demote", "d"), ("remove", "r")] {
            tokens.push(bearer(
                &auth.login(user, password.as_bytes()).await.unwrap().token,
            ));
        }
        let mut reloaded = config(&[("demote", "d", Role::Viewer)], ttl);
        let kept = auth.provider().builtin.users["keep"].clone();
        reloaded.users.insert("keep".into(), kept);
        auth.configure(&reloaded);
        assert_eq!(auth.check(Some(&tokens[0])).unwrap().user, "keep");
        assert_eq!(auth.check(Some(&tokens[1])), Err(Denied::Unknown));
        assert_eq!(auth.check(Some(&tokens[2])), Err(Denied::Unknown));
        assert!(auth.login("remove", b"r").await.is_err());
        assert_eq!(auth.login("demote", b"d").await.unwrap().role, Role::Viewer);
    }
}
