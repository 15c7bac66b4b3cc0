//! Keeping a call's secrets out of the agent's log.
//!
//! The secrets of a call are the strings of its envelope's `auth` and `credentials`, and the
//! secret fields of a refresh request the agent sends through a connector. They are redacted
//! from whatever a connector writes that the agent logs: an executable's stderr (one call, so
//! that call's [`Secrets`]), and a native connector's log callbacks and worker stderr, which
//! belong to no one call (so the [`RecentSecrets`] of the connector's recent calls).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher as _;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use zeroize::Zeroizing;

/// How many distinct secret-bearing envelope parts a connector's [`RecentSecrets`] keeps. The
/// parts of calls still running are never forgotten, whatever their age (see [`InUse`]): with
/// more than this many in use, it holds more.
const REMEMBERED: usize = 1024;

/// Strings shorter than this are labels ("oauth", "Bearer"), not secrets; redacting them would
/// only garble the log.
const MIN_SECRET_LEN: usize = 6;

/// Where an envelope's secret-bearing parts are: the byte ranges of its `auth`, `credentials`
/// and `request` values. The dispatcher records them as it renders an envelope, so finding a
/// call's secrets never means parsing its envelope again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretSpans {
    /// The `auth` value.
    pub auth: Option<Range<usize>>,
    /// The `credentials` value.
    pub credentials: Option<Range<usize>>,
    /// The `request` value (secret only in a refresh request).
    pub request: Option<Range<usize>>,
}

impl SecretSpans {
    /// The spans of an envelope someone else rendered, by parsing it (none if it is not a JSON
    /// object).
    pub fn find(envelope: &[u8]) -> Self {
        /// The parts that hold secrets; everything else is skipped unparsed.
        #[derive(Deserialize)]
        struct Parts<'a> {
            #[serde(borrow, default)]
            auth: Option<&'a RawValue>,
            #[serde(borrow, default)]
            credentials: Option<&'a RawValue>,
            #[serde(borrow, default)]
            request: Option<&'a RawValue>,
        }
        let Ok(parts) = serde_json::from_slice::<Parts<'_>>(envelope) else {
            return Self::default();
        };
        // The raw values borrow from `envelope`: their offsets are where they start in it.
        let span = |raw: Option<&RawValue>| {
            raw.map(|raw| {
                let start = raw.get().as_ptr() as usize - envelope.as_ptr() as usize;
                start..start + raw.get().len()
            })
        };
        Self {
            auth: span(parts.auth),
            credentials: span(parts.credentials),
            request: span(parts.request),
        }
    }

    /// The secret-bearing parts of `envelope` these spans name, with what kind each is.
    fn parts<'e>(&self, envelope: &'e [u8]) -> impl Iterator<Item = (&'e [u8], Part)> + use<'e> {
        let part = |span: &Option<Range<usize>>, kind| {
            span.clone()
                .and_then(|span| envelope.get(span))
                .map(|json| (json, kind))
        };
        [
            part(&self.auth, Part::Credentials),
            part(&self.credentials, Part::Credentials),
            part(&self.request, Part::Request),
        ]
        .into_iter()
        .flatten()
    }
}

/// The secret fields of a `refresh_access_token` request (the agent's own refresh through a
/// connector carries them in `request`).
#[derive(Deserialize)]
struct RequestSecrets {
    #[serde(default)]
    refresh_token: Option<Value>,
    #[serde(default)]
    client_secret: Option<Value>,
    #[serde(default)]
    access_token: Option<Value>,
    #[serde(default)]
    password: Option<Value>,
}

/// The secrets of one call's envelope. Zeroized when dropped.
#[derive(Default)]
pub struct Secrets(Vec<Zeroizing<String>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} redacted)", self.0.len())
    }
}

impl Secrets {
    /// The secrets in the parts of `envelope` that `spans` name.
    pub fn of_envelope(envelope: &[u8], spans: &SecretSpans) -> Self {
        let mut out = Vec::new();
        for (json, part) in spans.parts(envelope) {
            secrets_in(json, part, &mut out);
        }
        Self(out)
    }

    /// `text` with every one of these secrets replaced by `[redacted]`.
    pub fn redact(&self, text: &str) -> String {
        redact(text, self.0.iter().map(|s| s.as_str()))
    }

    /// The last `keep` bytes of `text`, redacted (see the free function `redact_tail`).
    pub fn redact_tail(&self, text: &str, keep: usize) -> String {
        redact_tail(text, self.0.iter().map(|s| s.as_str()), keep)
    }

    /// The length of the longest secret: a tail captured with this much more than it keeps
    /// holds the whole of any secret its cut would split.
    pub fn longest(&self) -> usize {
        self.0.iter().map(|s| s.len()).max().unwrap_or(0)
    }
}

/// Which part of an envelope a piece of JSON is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// `auth` or `credentials`: every string in it is a secret.
    Credentials,
    /// `request`: only the fields of a refresh request are.
    Request,
}

/// Appends the secrets in `json`, one part of an envelope.
fn secrets_in(json: &[u8], part: Part, out: &mut Vec<Zeroizing<String>>) {
    fn collect(value: &Value, out: &mut Vec<Zeroizing<String>>) {
        match value {
            Value::String(s) if s.len() >= MIN_SECRET_LEN => out.push(Zeroizing::new(s.clone())),
            Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
            Value::Object(map) => map.values().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    // The parsed copies cannot be zeroized (serde_json::Value); they live only for this
    // function.
    match part {
        Part::Credentials => {
            if let Ok(value) = serde_json::from_slice::<Value>(json) {
                collect(&value, out);
            }
        }
        Part::Request => {
            if let Ok(request) = serde_json::from_slice::<RequestSecrets>(json) {
                for value in [
                    request.refresh_token,
                    request.client_secret,
                    request.access_token,
                    request.password,
                ]
                .iter()
                .flatten()
                {
                    collect(value, out);
                }
            }
        }
    }
}

/// `text` with every occurrence of each of `secrets` replaced by `[redacted]`; where two overlap
/// or touch they are replaced as one, so no piece of either is left.
pub fn redact<'a>(text: &str, secrets: impl Iterator<Item = &'a str>) -> String {
    redact_tail(text, secrets, usize::MAX)
}

/// The end of `text`, at most `keep` bytes of it plus the whole of a secret the cut would split,
/// with each of `secrets` replaced by `[redacted]`. The secrets are found in all of `text`
/// before it is cut, so a cut never leaves a piece of one behind; where two overlap or touch (a
/// secret containing another, or one repeated) they are replaced as one.
fn redact_tail<'a>(text: &str, secrets: impl Iterator<Item = &'a str>, keep: usize) -> String {
    let mut found: Vec<(usize, usize)> = Vec::new();
    for secret in secrets.filter(|s| !s.is_empty()) {
        // Every occurrence, overlapping ones too: in "aaaaaaab" the secret "aaaaaa" is at 0
        // and at 1, and a search that resumed after the first (as `match_indices` does) would
        // leave the last "a" of the second in the log.
        let mut from = 0;
        while let Some(at) = text[from..].find(secret) {
            let start = from + at;
            found.push((start, start + secret.len()));
            from = start + text[start..].chars().next().map_or(1, char::len_utf8);
        }
    }
    found.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(found.len());
    for (start, end) in found {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut cut = text.len().saturating_sub(keep);
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    if let Some(&(start, _)) = merged
        .iter()
        .find(|(start, end)| *start < cut && cut < *end)
    {
        cut = start;
    }
    let mut out = String::with_capacity(text.len() - cut);
    let mut at = cut;
    for (start, end) in merged.into_iter().filter(|(_, end)| *end > cut) {
        out.push_str(&text[at..start]);
        out.push_str("[redacted]");
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

/// One remembered part of an envelope: its JSON text, by which it is compared and hashed (a
/// call repeating a known part costs a lookup), and the secrets in it, parsed once when it is
/// first seen (a line to redact costs a search per secret, not a parse per part).
#[derive(Clone)]
struct Remembered {
    json: Arc<Zeroizing<Vec<u8>>>,
    secrets: Arc<[Zeroizing<String>]>,
    /// How many running calls use this part (their [`InUse`]): it is not forgotten while one
    /// does. Raised under the [`Recent`] lock, lowered without it: a count read as 0 under the
    /// lock stays 0 until the lock is released.
    in_use: Arc<AtomicUsize>,
}

impl PartialEq for Remembered {
    fn eq(&self, other: &Self) -> bool {
        self.json.as_slice() == other.json.as_slice()
    }
}

impl Eq for Remembered {}

impl std::hash::Hash for Remembered {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.json.as_slice().hash(state);
    }
}

impl std::borrow::Borrow<[u8]> for Remembered {
    fn borrow(&self) -> &[u8] {
        self.json.as_slice()
    }
}

#[derive(Default)]
struct Recent {
    known: HashSet<Remembered>,
    /// Oldest first, to forget the oldest when full.
    order: VecDeque<Remembered>,
    /// How many remembered secrets begin with each [`MIN_SECRET_LEN`]-byte prefix, by its
    /// keyed hash: a line none of whose windows of that length is here holds no secret, which
    /// costs a hash per byte of the line rather than a search per secret.
    prefixes: HashMap<u64, usize>,
    /// Random keys per process, so the table says nothing of the prefixes without them.
    hasher: std::hash::RandomState,
    /// How many secrets are remembered, all parts together.
    secret_count: usize,
}

impl Recent {
    fn prefix(&self, bytes: &[u8]) -> u64 {
        self.hasher.hash_one(&bytes[..MIN_SECRET_LEN])
    }

    fn add(&mut self, remembered: Remembered) {
        for secret in remembered.secrets.iter() {
            *self
                .prefixes
                .entry(self.prefix(secret.as_bytes()))
                .or_default() += 1;
        }
        self.secret_count += remembered.secrets.len();
        self.known.insert(remembered.clone());
        self.order.push_back(remembered);
    }

    /// Forgets the oldest parts no running call uses until there is room for one more. Parts
    /// in use go to the back: a call that runs for hours while thousands of other tenants'
    /// calls come and go still has its secrets redacted from what the connector logs for it.
    fn make_room(&mut self) {
        let mut kept = 0;
        while self.order.len() >= REMEMBERED && kept < self.order.len() {
            let Some(oldest) = self.order.pop_front() else {
                return;
            };
            if oldest.in_use.load(Ordering::Acquire) > 0 {
                self.order.push_back(oldest);
                kept += 1;
            } else {
                self.forget(&oldest);
            }
        }
    }

    fn forget(&mut self, oldest: &Remembered) {
        self.known.remove(oldest);
        self.secret_count -= oldest.secrets.len();
        for secret in oldest.secrets.iter() {
            let prefix = self.prefix(secret.as_bytes());
            if let Some(count) = self.prefixes.get_mut(&prefix) {
                *count -= 1;
                if *count == 0 {
                    self.prefixes.remove(&prefix);
                }
            }
        }
    }

    /// Whether a remembered secret may be in `text` (a prefix of one is). With few secrets,
    /// searching for each costs less than hashing every window of the line (about 90 ns a
    /// secret against 20 ns a byte for a line of 200 bytes, BENCHMARKS.md): then it says yes.
    fn may_hold_a_secret(&self, text: &str) -> bool {
        if self.secret_count * 4 <= text.len() {
            return self.secret_count > 0;
        }
        text.as_bytes()
            .windows(MIN_SECRET_LEN)
            .any(|w| self.prefixes.contains_key(&self.prefix(w)))
    }
}

/// The parts of a running call's envelope, which its connector's [`RecentSecrets`] keeps until
/// this is dropped (when the call has returned).
#[must_use = "the call's secrets are kept only while this lives"]
#[derive(Debug, Default)]
pub struct InUse {
    /// One per part an envelope can have (auth, credentials, request).
    parts: [Option<Arc<AtomicUsize>>; 3],
}

impl Drop for InUse {
    fn drop(&mut self) {
        for count in self.parts.iter().flatten() {
            count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The secrets of a connector's recent calls, to redact from what it writes outside any one
/// call's answer (a native plugin's log callbacks, its worker's stderr). Bounded: the oldest
/// are forgotten (and zeroized) first.
///
/// Each call costs a scan of its envelope and a set lookup; a part not seen before is parsed
/// for its secrets once, which is rare (calls mostly repeat the same tenants' parts). A line
/// to redact then costs a substring search per remembered secret.
#[derive(Default)]
pub struct RecentSecrets {
    recent: Mutex<Recent>,
}

impl std::fmt::Debug for RecentSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecentSecrets")
    }
}

impl RecentSecrets {
    /// Remembers the secrets of a call of `capability` about to run with `envelope`, whose
    /// secret-bearing parts `spans` names, and keeps them while the call holds the answer.
    /// Only a refresh through the connector (`refresh_access_token`) has secrets in its
    /// request.
    pub fn remember(&self, capability: &str, envelope: &[u8], spans: &SecretSpans) -> InUse {
        let refresh = capability == "refresh_access_token";
        let mut in_use = InUse::default();
        let mut recent = self.lock();
        for ((json, part), slot) in spans.parts(envelope).zip(&mut in_use.parts) {
            // `null`, `{}`, `[]`: nothing in it.
            if (part == Part::Request && !refresh) || json.len() < MIN_SECRET_LEN {
                continue;
            }
            let count = match recent.known.get(json) {
                Some(known) => known.in_use.clone(),
                None => {
                    recent.make_room();
                    let mut secrets = Vec::new();
                    secrets_in(json, part, &mut secrets);
                    let count = Arc::new(AtomicUsize::new(0));
                    recent.add(Remembered {
                        json: Arc::new(Zeroizing::new(json.to_vec())),
                        secrets: secrets.into(),
                        in_use: count.clone(),
                    });
                    count
                }
            };
            count.fetch_add(1, Ordering::AcqRel);
            *slot = Some(count);
        }
        in_use
    }

    /// `text` with every remembered secret replaced by `[redacted]`.
    pub fn redact(&self, text: &str) -> String {
        let parts: Vec<Arc<[Zeroizing<String>]>> = {
            let recent = self.lock();
            // Most lines: no secret, found without a search per secret.
            if !recent.may_hold_a_secret(text) {
                return text.to_owned();
            }
            // Taken out of the lock: the search must not hold up the calls that remember.
            recent
                .order
                .iter()
                .filter(|r| !r.secrets.is_empty())
                .map(|r| r.secrets.clone())
                .collect()
        };
        redact(
            text,
            parts.iter().flat_map(|p| p.iter().map(|s| s.as_str())),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recent> {
        // Nothing under this lock panics short of running out of memory, which aborts: keep
        // using it rather than stop redacting.
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The secrets of an envelope, found by parsing it.
    fn secrets_of(envelope: &[u8]) -> Secrets {
        Secrets::of_envelope(envelope, &SecretSpans::find(envelope))
    }

    /// Remembers the secrets of a call that ends at once.
    fn remember(recent: &RecentSecrets, capability: &str, envelope: &[u8]) {
        drop(recent.remember(capability, envelope, &SecretSpans::find(envelope)));
    }

    /// What redaction must give, computed the plain way: every byte of every occurrence of a
    /// secret (overlapping ones too) is covered; the cut moves up to a character boundary, and
    /// back to the start of a covered run it would split; each run of covered bytes becomes one
    /// `[redacted]`.
    fn redacted_by_model(text: &str, secrets: &[String], keep: usize) -> String {
        let bytes = text.as_bytes();
        let mut covered = vec![false; bytes.len()];
        for secret in secrets.iter().map(String::as_bytes) {
            for at in 0..bytes.len() {
                if bytes[at..].starts_with(secret) {
                    covered[at..at + secret.len()].fill(true);
                }
            }
        }
        let mut cut = bytes.len().saturating_sub(keep);
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        while cut > 0 && cut < bytes.len() && covered[cut - 1] && covered[cut] {
            cut -= 1;
        }
        let mut out = String::new();
        let mut at = cut;
        while at < bytes.len() {
            let run_end = (at..bytes.len())
                .find(|&i| covered[i] != covered[at])
                .unwrap_or(bytes.len());
            if covered[at] {
                out.push_str("[redacted]");
            } else {
                out.push_str(&text[at..run_end]);
            }
            at = run_end;
        }
        out
    }

    /// Text over a small alphabet (so that secrets recur, overlap and repeat themselves, and a
    /// two-byte character makes cuts land inside one), and secrets: pieces of the text and
    /// strings over the same alphabet, at least [`MIN_SECRET_LEN`] characters.
    fn text_and_secrets() -> impl proptest::strategy::Strategy<Value = (String, Vec<String>)> {
        use proptest::prelude::*;
        let alphabet = || prop::sample::select(vec!['a', 'b', 'é']);
        let text = prop::collection::vec(alphabet(), 0..160);
        let own = prop::collection::vec(prop::collection::vec(alphabet(), 6..12), 0..3);
        let pieces = prop::collection::vec((any::<prop::sample::Index>(), 6usize..20), 0..3);
        (text, own, pieces).prop_map(|(text, own, pieces)| {
            let mut secrets: Vec<String> = own.into_iter().map(String::from_iter).collect();
            for (start, len) in pieces {
                if text.len() >= len {
                    let start = start.index(text.len() - len + 1);
                    secrets.push(text[start..start + len].iter().collect());
                }
            }
            (text.into_iter().collect(), secrets)
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn redaction_covers_every_occurrence_of_every_secret(
            (text, secrets) in text_and_secrets(),
            keep in proptest::prop_oneof![0usize..200, proptest::strategy::Just(usize::MAX)],
        ) {
            let got = redact_tail(&text, secrets.iter().map(String::as_str), keep);
            proptest::prop_assert_eq!(got, redacted_by_model(&text, &secrets, keep));
        }

        #[test]
        fn recent_secrets_redact_what_they_remember_whatever_the_line(
            (text, secrets) in text_and_secrets(),
            others in 0usize..64,
        ) {
            let recent = RecentSecrets::default();
            // Secrets that are in no line (another alphabet): with many, a line is first
            // checked for their prefixes rather than searched for each.
            for i in 0..others {
                remember(&recent, "c", format!(r#"{{"auth":{{"k":"other-secret-{i}"}}}}"#).as_bytes());
            }
            for secret in &secrets {
                let envelope = serde_json::json!({"auth": {"oauth": {"access_token": secret}}});
                remember(&recent, "c", envelope.to_string().as_bytes());
            }
            proptest::prop_assert_eq!(recent.redact(&text), redacted_by_model(&text, &secrets, usize::MAX));
        }
    }

    #[test]
    fn spans_found_by_parsing_name_the_secret_parts() {
        let envelope = br#"{"request":{"n":1}, "auth" : {"a":"b"},"credentials":[],"page":null}"#;
        let spans = SecretSpans::find(envelope);
        let text = |span: Option<Range<usize>>| span.map(|s| &envelope[s]);
        assert_eq!(text(spans.auth.clone()), Some(&br#"{"a":"b"}"#[..]));
        assert_eq!(text(spans.credentials.clone()), Some(&b"[]"[..]));
        assert_eq!(text(spans.request.clone()), Some(&br#"{"n":1}"#[..]));
        assert_eq!(SecretSpans::find(b"not json"), SecretSpans::default());
    }

    #[test]
    fn the_secrets_of_auth_credentials_and_a_refresh_request_are_redacted() {
        let envelope = br#"{"request":{"refresh_token":"RT-canary-1","client_secret":"CS-canary-4","count":3,"note":"visible-text"},
            "settings":{"domain":"example.test"},
            "auth":{"oauth":{"access_token":"AT-canary-2"}},
            "credentials":[{"id":"c1","basic":{"username":"admin","password":"PW-canary-3"}}]}"#;
        let text = "got AT-canary-2, RT-canary-1, CS-canary-4 and PW-canary-3 for admin at example.test: visible-text";
        assert_eq!(
            secrets_of(envelope).redact(text),
            "got [redacted], [redacted], [redacted] and [redacted] for admin at example.test: visible-text"
        );
    }

    #[test]
    fn text_without_secrets_and_envelopes_that_are_not_json_are_left_alone() {
        assert_eq!(
            secrets_of(b"not json").redact("no secrets here"),
            "no secrets here"
        );
        let envelope = br#"{"auth":{"oauth":{"access_token":"abcdef"}}}"#;
        assert_eq!(
            secrets_of(envelope).redact("nothing to hide"),
            "nothing to hide"
        );
    }

    #[test]
    fn a_secret_containing_another_is_replaced_whole() {
        let envelope = br#"{"auth":{"a":"secret-1","b":"secret-12345"}}"#;
        assert_eq!(
            secrets_of(envelope).redact("x secret-12345 y secret-1 z"),
            "x [redacted] y [redacted] z"
        );
    }

    #[test]
    fn a_cut_never_leaves_a_piece_of_a_secret_behind() {
        let envelope = br#"{"auth":{"oauth":{"access_token":"token-0123456789"}}}"#;
        let secrets = secrets_of(envelope);
        assert_eq!(secrets.longest(), "token-0123456789".len());
        // A cut inside a secret moves back to its start, and it is redacted whole.
        assert_eq!(
            secrets.redact_tail("head token-0123456789 tail", 10),
            "[redacted] tail"
        );
        assert_eq!(
            secrets.redact_tail("head token-0123456789 tail", 5),
            " tail"
        );
        // A stream captured with `longest()` bytes more than it keeps: its capture cut
        // splits a secret, and the piece at the front is never in what is kept.
        let stream = "line one token-0123456789\n".repeat(5);
        for keep in 0..stream.len() {
            let capture_from = stream.len().saturating_sub(keep + secrets.longest());
            let tail = secrets.redact_tail(&stream[capture_from..], keep);
            for piece in "token-0123456789".as_bytes().windows(4) {
                let piece = std::str::from_utf8(piece).unwrap();
                assert!(
                    !tail.contains(piece),
                    "{piece:?} left in {tail:?} (keep {keep})"
                );
            }
        }
    }

    #[test]
    fn overlapping_secrets_are_replaced_as_one() {
        let envelope = br#"{"auth":{"a":"abc-123-def","b":"def-456-ghi"}}"#;
        assert_eq!(
            secrets_of(envelope).redact("x abc-123-def-456-ghi y"),
            "x [redacted] y"
        );
    }

    #[test]
    fn recent_secrets_cover_earlier_calls_and_forget_the_oldest_when_full() {
        let recent = RecentSecrets::default();
        let envelope = |token: &str| {
            format!(r#"{{"auth":{{"oauth":{{"access_token":"{token}"}}}}}}"#).into_bytes()
        };
        remember(&recent, "validate_credentials", &envelope("first-token"));
        remember(&recent, "validate_credentials", &envelope("second-token"));
        remember(&recent, "validate_credentials", &envelope("first-token"));
        assert_eq!(
            recent.redact("plugin said first-token then second-token"),
            "plugin said [redacted] then [redacted]"
        );
        // A refresh through the connector: its request's secret fields, not its other strings;
        // another capability's request is not a secret.
        remember(
            &recent,
            "refresh_access_token",
            br#"{"request":{"credential_id":"oauth-main","refresh_token":"refresh-canary"}}"#,
        );
        remember(
            &recent,
            "list_accounts",
            br#"{"request":{"filter":"visible-filter","password":"not-a-tenant-secret"}}"#,
        );
        assert_eq!(
            recent.redact("oauth-main refresh-canary visible-filter not-a-tenant-secret"),
            "oauth-main [redacted] visible-filter not-a-tenant-secret"
        );
        for i in 0..REMEMBERED {
            remember(
                &recent,
                "validate_credentials",
                &envelope(&format!("later-token-{i}")),
            );
        }
        assert_eq!(
            recent.redact("first-token later-token-0 later-token-1023"),
            "first-token [redacted] [redacted]",
            "the oldest secret is forgotten once {REMEMBERED} newer ones are remembered"
        );
    }

    #[test]
    fn a_running_calls_secrets_are_kept_however_many_calls_come_and_go_meanwhile() {
        let recent = RecentSecrets::default();
        let envelope = |token: &str| {
            format!(r#"{{"auth":{{"oauth":{{"access_token":"{token}"}}}}}}"#).into_bytes()
        };
        let running = |token: &str| {
            let envelope = envelope(token);
            recent.remember("list_accounts", &envelope, &SecretSpans::find(&envelope))
        };
        let long_call = running("long-call-token");
        // A part first seen by an ended call, then used by one still running, is kept too.
        remember(&recent, "c", &envelope("shared-token"));
        let second_call = running("shared-token");
        for i in 0..2 * REMEMBERED {
            remember(&recent, "c", &envelope(&format!("filler-{i:05}")));
        }
        assert_eq!(
            recent.redact("long-call-token shared-token filler-00000 filler-02047"),
            "[redacted] [redacted] filler-00000 [redacted]",
            "the running calls' secrets outlive {} newer parts; the others are bounded",
            2 * REMEMBERED
        );
        assert_eq!(recent.lock().order.len(), REMEMBERED);
        // Ended, they are forgotten in their turn like any other.
        drop((long_call, second_call));
        for i in 0..REMEMBERED {
            remember(&recent, "c", &envelope(&format!("later-{i:05}")));
        }
        assert_eq!(
            recent.redact("long-call-token shared-token later-01023"),
            "long-call-token shared-token [redacted]"
        );
        assert_eq!(recent.lock().order.len(), REMEMBERED);
    }

    #[test]
    fn a_secret_sharing_its_prefix_with_a_forgotten_one_is_still_found_anywhere_in_a_line() {
        let recent = RecentSecrets::default();
        let envelope =
            |token: &str| format!(r#"{{"auth":{{"oauth":{{"access_token":"{token}"}}}}}}"#);
        remember(&recent, "c", envelope("shared-first").as_bytes());
        remember(&recent, "c", envelope("shared-second").as_bytes());
        remember(&recent, "c", envelope("ab\\u00e9cd").as_bytes());
        for i in 0..REMEMBERED - 2 {
            remember(&recent, "c", envelope(&format!("filler-{i:04}")).as_bytes());
        }
        // "shared-first" is forgotten; "shared-second", with the same first bytes, is not.
        assert_eq!(
            recent.redact("shared-second"),
            "[redacted]",
            "a whole line, and the same prefix as a forgotten secret"
        );
        assert_eq!(
            recent.redact("shared-first x shared-second"),
            "shared-first x [redacted]"
        );
        assert_eq!(
            recent.redact("tail abécd"),
            "tail [redacted]",
            "multi-byte, at the end"
        );
        assert_eq!(
            recent.redact("no secret here at all"),
            "no secret here at all"
        );
        assert_eq!(recent.redact("short"), "short");
    }
}
