//! Who may call tallyd: API keys with scopes, and per-caller rate limits.
//!
//! * [`keys`]: the key format, its digest, names and scopes, and `tallyd keys create|list|revoke`.
//! * [`KeyRing`]: the keys a running server accepts, swapped whole by [`reload`]'s thread, which
//!   re-reads the `api_keys` table every [`limits::KEY_RELOAD_PERIOD`] (so a revocation takes
//!   effect within a second, without a restart) and writes back when keys were last used.
//! * [`rate`]: token buckets per key name, or per client address for calls without a key.
//!
//! A request's key is looked up by its SHA-256 digest in a hash map: the secret is never compared
//! byte by byte, so the time a lookup takes says nothing about how much of a guess was right.
//! Authentication is on as soon as one key exists in the database (revoked ones count: revoking
//! the last key must not open the server). With no key at all, tallyd answers everyone, as it did
//! before keys existed; `serve` refuses to start that way on a non-loopback address unless
//! `--allow-unauthenticated` says so.

pub mod keys;
pub mod rate;
pub mod reload;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::config::limits;
use keys::{KeyDigest, Scope};

/// One accepted key, as the request handlers see it.
#[derive(Debug)]
pub struct ApiKey {
    /// The key's name: what metrics, logs and idempotency scopes show instead of the key.
    pub name: Arc<str>,
    pub scope: Scope,
    /// When set, the key is accepted only on a mutual-TLS connection whose client certificate has
    /// this subject common name: a leaked key is useless without the matching certificate too.
    pub client_cert_cn: Option<String>,
    /// The idempotency scope of each `POST` route for this key, `"<name>/transaction"` and so on:
    /// two keys never share a stored answer. Interned (see [`intern`]) because the engine keys its
    /// idempotency records by `&'static str`.
    pub idempotency_scopes: IdempotencyScopes,
    /// When a request last carried this key (Unix ms), in memory; written to the table coarsely.
    pub last_used_ms: AtomicI64,
    /// `last_used_at_ms` as last read from or written to the table.
    pub stored_last_used_ms: AtomicI64,
    /// Its `tallyd_api_requests_total` series, registered on first use (after the recorder exists).
    pub counters: OnceLock<crate::telemetry::CallerCounters>,
}

impl ApiKey {
    pub fn counters(&self) -> &crate::telemetry::CallerCounters {
        self.counters
            .get_or_init(|| crate::telemetry::CallerCounters::new(&self.name))
    }
}

/// The interned idempotency scope of each `POST` route for one key.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyScopes {
    pub transaction: &'static str,
    pub transfers: &'static str,
    pub accounts: &'static str,
    /// `POST /transfers/bulk`'s own key (its items' keys are under `transfers`).
    pub transfers_bulk: &'static str,
}

impl IdempotencyScopes {
    fn for_name(name: &str) -> Self {
        Self {
            transaction: intern(format!("{name}/transaction")),
            transfers: intern(format!("{name}/transfers")),
            accounts: intern(format!("{name}/accounts")),
            transfers_bulk: intern(format!("{name}/transfers/bulk")),
        }
    }

    /// The scope of `route`, one of the routes [`crate::domain::Command::scope`] names.
    pub fn of(&self, route: &str) -> &'static str {
        match route {
            "/transfers" => self.transfers,
            "/accounts" => self.accounts,
            "/transfers/bulk" => self.transfers_bulk,
            _ => self.transaction,
        }
    }
}

/// A `&'static str` for `text`, leaked once per distinct text and reused after. Only idempotency
/// scopes go through it; they are bounded by the key names ever created (names are never reused),
/// at most [`limits::KEYS_MAX`] × 4 strings of at most 80 bytes.
fn intern(text: String) -> &'static str {
    static INTERNED: OnceLock<Mutex<std::collections::HashSet<&'static str>>> = OnceLock::new();
    let mut set = INTERNED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(existing) = set.get(text.as_str()) {
        return existing;
    }
    let leaked: &'static str = Box::leak(text.into_boxed_str());
    set.insert(leaked);
    leaked
}

/// The keys in force at one moment.
#[derive(Debug, Default)]
pub struct KeySet {
    /// Unrevoked keys by the SHA-256 digest of the key.
    by_digest: HashMap<KeyDigest, Arc<ApiKey>, ahash::RandomState>,
    /// Keys in the table, revoked ones included: authentication is required while this is non-zero.
    rows: usize,
    /// What the set was built from, to tell whether a re-read changed anything.
    source: Vec<keys::KeyRow>,
}

impl KeySet {
    /// Builds the set from the table's rows, keeping the in-memory use times of `previous`.
    pub fn build(rows: Vec<keys::KeyRow>, previous: &KeySet) -> Self {
        let mut by_digest = HashMap::with_hasher(ahash::RandomState::new());
        for row in &rows {
            if row.revoked_at_ms.is_some() {
                continue;
            }
            let Some(scope) = Scope::parse(&row.scope) else {
                continue;
            };
            let last_used = previous
                .by_name(&row.name)
                .map_or(0, |key| key.last_used_ms.load(Ordering::Relaxed));
            let stored = row.last_used_at_ms.unwrap_or(0);
            by_digest.insert(
                row.key_sha256,
                Arc::new(ApiKey {
                    name: Arc::from(row.name.as_str()),
                    scope,
                    client_cert_cn: row.client_cert_cn.clone(),
                    idempotency_scopes: IdempotencyScopes::for_name(&row.name),
                    last_used_ms: AtomicI64::new(last_used.max(stored)),
                    stored_last_used_ms: AtomicI64::new(stored),
                    counters: OnceLock::new(),
                }),
            );
        }
        Self {
            by_digest,
            rows: rows.len(),
            source: rows,
        }
    }

    /// Whether a request must carry a key.
    pub fn required(&self) -> bool {
        self.rows > 0
    }

    fn by_name(&self, name: &str) -> Option<&Arc<ApiKey>> {
        self.by_digest.values().find(|key| &*key.name == name)
    }

    /// The unrevoked key with this digest.
    pub fn find(&self, digest: &KeyDigest) -> Option<&Arc<ApiKey>> {
        self.by_digest.get(digest)
    }

    /// Whether `rows` (ignoring use times, which change without changing who may call) is what
    /// this set was built from.
    fn same_source(&self, rows: &[keys::KeyRow]) -> bool {
        let strip = |row: &keys::KeyRow| keys::KeyRow {
            last_used_at_ms: None,
            ..row.clone()
        };
        self.source.len() == rows.len() && self.source.iter().zip(rows).all(|(a, b)| strip(a) == strip(b))
    }

    /// Every accepted key.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<ApiKey>> {
        self.by_digest.values()
    }
}

/// The key set a running server accepts, replaced whole on every change.
#[derive(Debug, Default)]
pub struct KeyRing {
    /// A std `RwLock` around an `Arc`: a request holds the read lock for one clone of the `Arc`
    /// (nanoseconds, never across an await), and the reload thread swaps it a few times a second.
    current: RwLock<Arc<KeySet>>,
}

impl KeyRing {
    pub fn new(set: KeySet) -> Self {
        Self {
            current: RwLock::new(Arc::new(set)),
        }
    }

    pub fn current(&self) -> Arc<KeySet> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Installs the set built from `rows`, unless it is the one in force; says whether it changed.
    pub fn update(&self, rows: Vec<keys::KeyRow>) -> bool {
        let current = self.current();
        if current.same_source(&rows) {
            return false;
        }
        let set = KeySet::build(rows, &current);
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(set);
        true
    }
}

/// What the `Authorization` header of a request says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    None,
    Bearer(&'a [u8]),
    /// Another scheme, several headers, or an empty token.
    Malformed,
}

impl<'a> Credential<'a> {
    /// Reads the request's `Authorization` headers.
    pub fn from_headers(headers: &'a hyper::HeaderMap) -> Self {
        let mut values = headers.get_all(hyper::header::AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Credential::None;
        };
        if values.next().is_some() {
            return Credential::Malformed;
        }
        let bytes = value.as_bytes();
        match bytes.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => {
                let token = bytes[7..].trim_ascii();
                if token.is_empty() || token.len() > limits::KEY_TEXT_BYTES_MAX {
                    Credential::Malformed
                } else {
                    Credential::Bearer(token)
                }
            }
            _ => Credential::Malformed,
        }
    }
}

/// Who is calling, once the key (if any) is checked.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No key is required (none exists) and none was sent.
    Anonymous,
    /// A valid key for this connection.
    Key(Arc<ApiKey>),
}

/// Why a request is not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Keys are required and none was sent.
    Missing,
    /// The key is malformed, unknown, revoked, or bound to another client certificate. One answer
    /// for all of them, so that a caller learns nothing about which keys exist.
    Invalid,
}

/// Checks a request's credential against `set`. `client_cn` is the common name of the connection's
/// verified client certificate, if it presented one.
pub fn authenticate(
    set: &KeySet,
    credential: Credential<'_>,
    client_cn: Option<&str>,
) -> Result<Caller, Denied> {
    let token = match credential {
        Credential::None if !set.required() => return Ok(Caller::Anonymous),
        Credential::None => return Err(Denied::Missing),
        Credential::Malformed => return Err(Denied::Invalid),
        Credential::Bearer(token) => token,
    };
    let key = set.find(&keys::digest(token)).ok_or(Denied::Invalid)?;
    if let Some(bound) = &key.client_cert_cn {
        if client_cn != Some(bound.as_str()) {
            return Err(Denied::Invalid);
        }
    }
    key.last_used_ms.store(crate::unix_ms_now(), Ordering::Relaxed);
    Ok(Caller::Key(Arc::clone(key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, scope: &str, key: &str) -> keys::KeyRow {
        keys::KeyRow {
            name: name.into(),
            scope: scope.into(),
            key_sha256: keys::digest(key.as_bytes()),
            key_prefix: "tly_".into(),
            client_cert_cn: None,
            created_at_ms: 1,
            last_used_at_ms: None,
            revoked_at_ms: None,
        }
    }

    #[test]
    fn no_key_in_the_table_lets_everyone_in_and_one_key_shuts_the_door() {
        let open = KeySet::default();
        assert!(matches!(
            authenticate(&open, Credential::None, None),
            Ok(Caller::Anonymous)
        ));
        let set = KeySet::build(vec![row("a", "read", "tly_secret")], &open);
        assert_eq!(
            authenticate(&set, Credential::None, None).unwrap_err(),
            Denied::Missing
        );
        assert_eq!(
            authenticate(&set, Credential::Bearer(b"tly_other"), None).unwrap_err(),
            Denied::Invalid
        );
        let Ok(Caller::Key(key)) = authenticate(&set, Credential::Bearer(b"tly_secret"), None) else {
            panic!("the key is accepted");
        };
        assert_eq!(&*key.name, "a");
        assert_eq!(key.idempotency_scopes.of("/transfers"), "a/transfers");
    }

    #[test]
    fn a_revoked_key_is_refused_and_still_keeps_authentication_on() {
        let mut revoked = row("a", "write", "tly_secret");
        revoked.revoked_at_ms = Some(5);
        let set = KeySet::build(vec![revoked], &KeySet::default());
        assert!(set.required());
        assert_eq!(
            authenticate(&set, Credential::Bearer(b"tly_secret"), None).unwrap_err(),
            Denied::Invalid
        );
        assert_eq!(
            authenticate(&set, Credential::None, None).unwrap_err(),
            Denied::Missing
        );
    }

    #[test]
    fn a_key_bound_to_a_certificate_needs_that_certificate() {
        let mut bound = row("a", "write", "tly_secret");
        bound.client_cert_cn = Some("checkout".into());
        let set = KeySet::build(vec![bound], &KeySet::default());
        let token = Credential::Bearer(b"tly_secret");
        assert_eq!(authenticate(&set, token, None).unwrap_err(), Denied::Invalid);
        assert_eq!(
            authenticate(&set, token, Some("other")).unwrap_err(),
            Denied::Invalid
        );
        assert!(authenticate(&set, token, Some("checkout")).is_ok());
    }

    #[test]
    fn the_authorization_header_is_read_strictly() {
        let parse = |values: &[&str]| {
            let mut headers = hyper::HeaderMap::new();
            for value in values {
                headers.append(hyper::header::AUTHORIZATION, value.parse().unwrap());
            }
            match Credential::from_headers(&headers) {
                Credential::Bearer(token) => Some(String::from_utf8(token.to_vec()).unwrap()),
                Credential::None => None,
                Credential::Malformed => Some("malformed".into()),
            }
        };
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&["Bearer tly_x"]).as_deref(), Some("tly_x"));
        assert_eq!(parse(&["bearer  tly_x "]).as_deref(), Some("tly_x"));
        for bad in [
            &["Basic dXNlcjpwYXNz"][..],
            &["Bearer "],
            &["Bearer a", "Bearer b"],
            &["tly_x"],
        ] {
            assert_eq!(parse(bad).as_deref(), Some("malformed"), "{bad:?}");
        }
    }

    #[test]
    fn an_unchanged_table_keeps_the_set_in_force() {
        let ring = KeyRing::new(KeySet::default());
        assert!(ring.update(vec![row("a", "read", "k")]));
        let mut used = row("a", "read", "k");
        used.last_used_at_ms = Some(9);
        assert!(
            !ring.update(vec![used.clone()]),
            "a use time alone changes nothing"
        );
        used.revoked_at_ms = Some(10);
        assert!(ring.update(vec![used]));
        assert!(ring.current().find(&keys::digest(b"k")).is_none());
    }
}
