//! The door every request passes before its route runs: which scope the route needs, whether the
//! request's API key has it, and whether its caller's rate limit has a token left. Refusals are
//! answered here, before the body is read or anything is queued.
//!
//! The order, and why: public routes (`/healthz`, `/readyz`, and with `--metrics-public` the
//! observability routes) skip all of it, so that probes and scrapers never depend on keys or on a
//! flood elsewhere. Then the key is checked, then the rate limit is spent (in the key's bucket, or
//! in the client address's bucket when there is no valid key, so that guessing keys is limited
//! too), and only then is a 401 or a 403 answered.

use std::net::IpAddr;
use std::sync::Arc;

use super::error::{ApiError, ErrorCode};
use super::App;
use crate::auth::keys::Scope;
use crate::auth::rate::{self, Bucket};
use crate::auth::{self, Caller, Credential, Denied};

/// What the connection tells about its client, fixed for its lifetime.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address: its rate-limit bucket when it sends no valid key.
    pub address: IpAddr,
    /// The subject common name of its verified client certificate, over mutual TLS.
    pub client_cert_cn: Option<Arc<str>>,
}

const INVALID_TOKEN_CHALLENGE: &str = "Bearer realm=\"tallyd\", error=\"invalid_token\"";

/// The `WWW-Authenticate` of a 403, naming the scope the route needs (RFC 6750's insufficient_scope).
fn insufficient_scope(needed: Scope) -> &'static str {
    match needed {
        Scope::Read => "Bearer realm=\"tallyd\", error=\"insufficient_scope\", scope=\"read\"",
        Scope::Write => "Bearer realm=\"tallyd\", error=\"insufficient_scope\", scope=\"write\"",
        Scope::Admin => "Bearer realm=\"tallyd\", error=\"insufficient_scope\", scope=\"admin\"",
    }
}

/// Who the caller is, for metrics: its key's name, or what stood in for one.
#[derive(Debug, Clone)]
pub enum Identity {
    Key(Arc<auth::ApiKey>),
    /// No key needed, none sent.
    Anonymous,
    /// A key was needed and none was sent.
    Missing,
    /// A key was sent that is not valid here.
    Invalid,
}

/// Lets the request in as a caller, or says why not. `needed` is the route's scope.
pub fn admit(
    app: &App,
    peer: &Peer,
    headers: &hyper::HeaderMap,
    needed: Scope,
) -> (Identity, Result<Caller, ApiError>) {
    let keys = app.keys.current();
    let credential = Credential::from_headers(headers);
    let checked = auth::authenticate(&keys, credential, peer.client_cert_cn.as_deref());
    let (identity, bucket) = match &checked {
        Ok(Caller::Key(key)) => (Identity::Key(Arc::clone(key)), Bucket::Key(Arc::clone(&key.name))),
        Ok(Caller::Anonymous) => (Identity::Anonymous, Bucket::Address(peer.address)),
        Err(Denied::Missing) => (Identity::Missing, Bucket::Address(peer.address)),
        Err(Denied::Invalid) => (Identity::Invalid, Bucket::Address(peer.address)),
    };
    if let Some(limiter) = &app.limiter {
        if let Err(wait) = limiter.check(&bucket) {
            let mut error = ApiError::new(
                ErrorCode::RateLimited,
                "too many requests from this caller; nothing was read or changed, retry after the delay",
            );
            error.retry_after = Some(rate::retry_after_seconds(wait));
            return (identity, Err(error));
        }
    }
    let caller = match checked {
        Ok(caller) => caller,
        Err(Denied::Missing) => {
            return (
                identity,
                Err(ApiError::new(
                    ErrorCode::Unauthorized,
                    "this server needs an API key: send Authorization: Bearer <key>",
                )),
            )
        }
        Err(Denied::Invalid) => {
            let mut error = ApiError::new(
                ErrorCode::Unauthorized,
                "the API key is not valid here (malformed, unknown, revoked, or bound to another client certificate)",
            );
            error.www_authenticate = Some(INVALID_TOKEN_CHALLENGE);
            return (identity, Err(error));
        }
    };
    if let Caller::Key(key) = &caller {
        if !key.scope.allows(needed) {
            let mut error = ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "the key {} has scope {}; this route needs {}",
                    key.name,
                    key.scope.as_str(),
                    needed.as_str()
                ),
            );
            error.www_authenticate = Some(insufficient_scope(needed));
            return (identity, Err(error));
        }
    }
    (identity, Ok(caller))
}
