//! The LDAP auth provider (`[api.ldap]`): a user's password is checked by binding as the user,
//! and the user's role is that of the groups they are in.
//!
//! Per login: connect (`ldaps://`, or `ldap://` with StartTLS; plain only with
//! `allow_insecure`), find the user's DN (from the `user_dn` template, or by a search as the
//! service account), bind as that DN with the password, then search `group_base` for the groups
//! naming the DN, as the service account if there is one. The highest role whose groups include
//! one of them is the user's.
//!
//! What the user types is escaped where it goes: RFC 4514 in a DN, RFC 4515 in a filter, so a
//! name like `*` or `x)(uid=*` finds nobody. An empty password is refused before any bind:
//! LDAP treats a simple bind with an empty password as an anonymous bind, which succeeds.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use ldap3::{dn_escape, ldap_escape, Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use zeroize::Zeroizing;

use super::{AuthProvider, LoginError, Role};
use crate::config::{LdapConfig, LdapUsers};

/// LDAP's result code for a wrong password (or an unknown DN).
const INVALID_CREDENTIALS: u32 = 49;

/// A DN as compared with the configured groups: lower case, no blanks around `,` and `=`.
/// (Enough for the DNs a directory returns and an admin copies from it; not a full RFC 4514
/// canonicalisation.)
pub fn normalize_dn(dn: &str) -> String {
    dn.split(',')
        .map(|rdn| rdn.split('=').map(str::trim).collect::<Vec<_>>().join("="))
        .collect::<Vec<_>>()
        .join(",")
        .to_lowercase()
}

/// The provider for one `[api.ldap]`.
#[derive(Clone)]
pub struct LdapDirectory {
    config: LdapConfig,
    /// TLS settings (trust store with `ca_file`), made once; or why they cannot be made, which
    /// every login and `doctor` then report.
    tls: Result<Arc<rustls::ClientConfig>, String>,
}

impl std::fmt::Debug for LdapDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapDirectory")
            .field("url", &self.config.url)
            .finish_non_exhaustive()
    }
}

/// What went wrong talking to the directory (not the user's fault).
fn unavailable(detail: impl std::fmt::Display) -> LoginError {
    LoginError::Unavailable {
        provider: "LDAP",
        detail: detail.to_string(),
    }
}

impl LdapDirectory {
    /// The provider for `config`. A `ca_file` that cannot be used is logged now and makes every
    /// directory login fail with its reason.
    pub fn new(config: LdapConfig) -> Self {
        let ca = config
            .ca_file
            .as_deref()
            .map(|path| ("api.ldap.ca_file", path));
        let tls = crate::tunnel::transport::client_config(ca, &[])
            .map(Arc::new)
            .map_err(|e| e.to_string());
        if let Err(e) = &tls {
            tracing::error!("the LDAP auth provider cannot be used: {e}");
        }
        Self { config, tls }
    }

    /// Its settings.
    pub fn config(&self) -> &LdapConfig {
        &self.config
    }

    async fn connect(&self) -> Result<Ldap, LoginError> {
        let tls = self.tls.clone().map_err(unavailable)?;
        let settings = LdapConnSettings::new()
            .set_conn_timeout(self.config.timeout)
            .set_starttls(self.config.starttls)
            .set_config(tls);
        let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &self.config.url)
            .await
            .map_err(|e| unavailable(format!("cannot connect to {}: {e}", self.config.url)))?;
        ldap3::drive!(conn);
        ldap.with_timeout(self.config.timeout);
        Ok(ldap)
    }

    /// The service account and its password (read from its file now: it may be rotated),
    /// if there is one.
    async fn service_account(&self) -> Result<Option<ServiceAccount<'_>>, LoginError> {
        let LdapUsers::Search {
            bind: Some((dn, file)),
            ..
        } = &self.config.users
        else {
            return Ok(None);
        };
        let password = tokio::fs::read_to_string(file).await.map_err(|e| {
            unavailable(format!(
                "cannot read api.ldap.bind_password_file {}: {e}",
                file.display()
            ))
        })?;
        let mut password = Zeroizing::new(password);
        let kept = password.trim_end_matches(['\r', '\n']).len();
        password.truncate(kept);
        Ok(Some(ServiceAccount { dn, password }))
    }

    /// Binds as the service account, if there is one.
    async fn bind_service(
        &self,
        ldap: &mut Ldap,
        account: Option<&ServiceAccount<'_>>,
    ) -> Result<(), LoginError> {
        let Some(ServiceAccount { dn, password }) = account else {
            return Ok(());
        };
        let result = ldap
            .with_timeout(self.config.timeout)
            .simple_bind(dn, password)
            .await
            .map_err(unavailable)?;
        if result.rc != 0 {
            return Err(unavailable(format!(
                "the directory refused the service account {dn} (api.ldap.bind_dn): {}",
                result
            )));
        }
        Ok(())
    }

    /// The user's DN: from the template, or the one entry the search finds (`None`: no such
    /// user, or more than one).
    async fn user_dn(
        &self,
        ldap: &mut Ldap,
        account: Option<&ServiceAccount<'_>>,
        user: &str,
    ) -> Result<Option<String>, LoginError> {
        match &self.config.users {
            LdapUsers::Template(template) => Ok(Some(template.replace("{user}", &dn_escape(user)))),
            LdapUsers::Search { base, filter, .. } => {
                self.bind_service(ldap, account).await?;
                let filter = filter.replace("{user}", &ldap_escape(user));
                let (entries, _) = ldap
                    .with_timeout(self.config.timeout)
                    .search(base, Scope::Subtree, &filter, vec!["1.1"])
                    .await
                    .and_then(ldap3::SearchResult::success)
                    .map_err(|e| unavailable(format!("searching {base} for {filter}: {e}")))?;
                if entries.len() > 1 {
                    tracing::warn!(
                        user = ?user,
                        matches = entries.len(),
                        "LDAP login refused: api.ldap.user_filter matches more than one entry"
                    );
                    return Ok(None);
                }
                Ok(entries
                    .into_iter()
                    .next()
                    .map(|entry| SearchEntry::construct(entry).dn))
            }
        }
    }

    /// For `doctor`: connects (with TLS as configured) and, where there is a service account,
    /// binds as it and reads `user_base` and `group_base`. What it found, or what failed.
    pub async fn probe(&self) -> Result<String, String> {
        let describe = |e: LoginError| match e {
            LoginError::Unavailable { detail, .. } => detail,
            other => other.to_string(),
        };
        let run = async {
            let mut ldap = self.connect().await.map_err(describe)?;
            let LdapUsers::Search { base, bind, .. } = &self.config.users else {
                let _ = ldap.unbind().await;
                return Ok(format!(
                    "{} answers; users bind by user_dn, and read their own groups",
                    self.config.url
                ));
            };
            let account = self.service_account().await.map_err(describe)?;
            self.bind_service(&mut ldap, account.as_ref())
                .await
                .map_err(describe)?;
            for (key, dn) in [("user_base", base), ("group_base", &self.config.group_base)] {
                ldap.with_timeout(self.config.timeout)
                    .search(dn, Scope::Base, "(objectClass=*)", vec!["1.1"])
                    .await
                    .and_then(ldap3::SearchResult::success)
                    .map_err(|e| format!("cannot read api.ldap.{key} {dn}: {e}"))?;
            }
            let _ = ldap.unbind().await;
            let who = bind
                .as_ref()
                .map_or("anonymously".to_string(), |(dn, _)| format!("as {dn}"));
            Ok(format!(
                "{} answers; bound {who}; user_base and group_base readable",
                self.config.url
            ))
        };
        match tokio::time::timeout(self.config.timeout * 4, run).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "{} did not answer within {:?}",
                self.config.url,
                self.config.timeout * 4
            )),
        }
    }

    async fn login(&self, user: &str, password: &[u8]) -> Result<Role, LoginError> {
        // An empty password would be an anonymous bind, which succeeds.
        if user.is_empty() || password.is_empty() {
            return Err(LoginError::WrongCredentials);
        }
        let Ok(password) = std::str::from_utf8(password) else {
            return Err(LoginError::WrongCredentials);
        };
        let account = self.service_account().await?;
        let mut ldap = self.connect().await?;
        let Some(dn) = self.user_dn(&mut ldap, account.as_ref(), user).await? else {
            return Err(LoginError::WrongCredentials);
        };
        let bound = ldap
            .with_timeout(self.config.timeout)
            .simple_bind(&dn, password)
            .await
            .map_err(unavailable)?;
        match bound.rc {
            0 => {}
            INVALID_CREDENTIALS => return Err(LoginError::WrongCredentials),
            _ => return Err(unavailable(format!("binding as {dn}: {bound}"))),
        }
        // Groups are read as the service account where there is one (a user may not be
        // allowed to read them).
        let reader = account.as_ref().map_or(dn.as_str(), |a| a.dn).to_string();
        self.bind_service(&mut ldap, account.as_ref()).await?;
        let base = &self.config.group_base;
        let filter = self.config.group_filter.replace("{dn}", &ldap_escape(&dn));
        let (entries, _) = ldap
            .with_timeout(self.config.timeout)
            .search(base, Scope::Subtree, &filter, vec!["1.1"])
            .await
            .and_then(ldap3::SearchResult::success)
            .map_err(|e| {
                unavailable(format!(
                    "searching {base} for the user's groups as {reader}: {e} (may it read \
                     api.ldap.group_base? a service account, bind_dn, reads them for every user)"
                ))
            })?;
        let _ = ldap.unbind().await;
        let groups: Vec<String> = entries
            .into_iter()
            .map(|entry| normalize_dn(&SearchEntry::construct(entry).dn))
            .collect();
        let role = self
            .config
            .role_groups
            .iter()
            .filter(|(_, wanted)| wanted.iter().any(|g| groups.contains(g)))
            .map(|(role, _)| *role)
            .max();
        role.ok_or_else(|| LoginError::NoRole {
            user: user.to_string(),
        })
    }
}

/// The account that searches for users and reads their groups.
struct ServiceAccount<'a> {
    dn: &'a str,
    password: Zeroizing<String>,
}

impl AuthProvider for LdapDirectory {
    fn name(&self) -> &'static str {
        "LDAP"
    }

    fn authenticate<'a>(
        &'a self,
        user: &'a str,
        password: &'a [u8],
    ) -> BoxFuture<'a, Result<Role, LoginError>> {
        Box::pin(async move {
            let deadline = self.config.timeout * 4;
            // In a task of its own: the LDAP client's parser panics on some malformed answers,
            // and a directory's bad answer must be a refused login, not a lost API connection.
            let directory = self.clone();
            let (user, password) = (user.to_string(), Zeroizing::new(password.to_vec()));
            let mut task = tokio::spawn(async move { directory.login(&user, &password).await });
            match tokio::time::timeout(deadline, &mut task).await {
                Err(_) => {
                    // Not left running: the caller's permit (one of the few password checks at
                    // once) ends here, and so must the login.
                    task.abort();
                    Err(unavailable(format!(
                        "no answer within {deadline:?} (4 × api.ldap.timeout_secs)"
                    )))
                }
                Ok(Err(e)) => Err(unavailable(format!(
                    "the directory's answer broke the client: {e}"
                ))),
                Ok(Ok(result)) => result,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_are_compared_without_case_or_blanks() {
        assert_eq!(
            normalize_dn("CN=Lumos Admins, OU=Groups ,DC=Example,DC=com"),
            "cn=lumos admins,ou=groups,dc=example,dc=com"
        );
    }

    /// A `ca_file` that `check-config` accepted but that cannot be used when the provider is
    /// made (replaced or emptied since): every directory login says why, and nothing connects.
    #[tokio::test]
    async fn an_unusable_ca_file_makes_every_login_unavailable_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ldap-ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let directory = LdapDirectory::new(LdapConfig {
            // Nothing listens there; a connection attempt would fail with another reason.
            url: "ldaps://127.0.0.1:1".into(),
            starttls: false,
            ca_file: Some(ca),
            allow_insecure: false,
            users: LdapUsers::Template("uid={user},ou=people,dc=example,dc=org".into()),
            group_base: "ou=groups,dc=example,dc=org".into(),
            group_filter: "(member={dn})".into(),
            role_groups: vec![],
            timeout: std::time::Duration::from_secs(5),
        });
        for user in ["alice", "bob"] {
            match directory.authenticate(user, b"a password").await {
                Err(LoginError::Unavailable { provider, detail }) => {
                    assert_eq!(provider, "LDAP");
                    assert!(detail.contains("api.ldap.ca_file"), "{detail}");
                    assert!(!detail.contains("cannot connect"), "{detail}");
                }
                other => panic!("expected the directory to be unavailable, got {other:?}"),
            }
        }
    }

    #[test]
    fn what_a_user_types_is_escaped_where_it_goes() {
        // RFC 4515 in a filter, RFC 4514 in a DN: no wildcard, no added clause, no added RDN.
        assert_eq!(ldap_escape("x)(uid=*"), "x\\29\\28uid=\\2a");
        assert_eq!(dn_escape("a,ou=admins"), "a\\2cou\\3dadmins");
    }
}
