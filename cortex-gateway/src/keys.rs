//! Client API keys and their limits (`[auth] require_keys`, `[[keys]]`;
//! docs/protocol.md §7).
//!
//! A key is presented as `Authorization: Bearer <key>` or `x-api-key:
//! <key>`. cortex keeps only each key's SHA-256 and compares digests in
//! constant time (`subtle`), scanning every configured key so the time
//! taken does not depend on which one matched. Key material is never
//! logged: logs and metrics carry the key's configured `name`.
//!
//! Each key may be limited to models (globs over ids and aliases), requests
//! per minute (`rpm`), tokens per minute (`tpm`, prompt + completion) and
//! open requests (`max_concurrent`). Rates are token buckets refilled
//! continuously (a full minute's allowance may be spent at once, then it
//! comes back at rate/60 per second); their state is shared by every API
//! worker behind a short mutex. Token limits take the prompt's estimate at
//! admission and settle from the answer's `usage` when it ends
//! ([`Permit::settle`]); a request refused before reaching a model gives
//! its estimate back.
//!
//! Without `require_keys`, a request with no key, or with a key that
//! matches none, is served anonymously (so clients that always send some
//! key keep working); a request with a configured key gets that key's
//! limits either way.

use crate::config::{Config, KeyConfig};
use helexa_api::error::{ApiError, ErrorCode};
use http::HeaderValue;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// The key table in force; replaced whole on reload (`SIGHUP`), keeping
/// the live limit state of keys whose settings did not change.
#[derive(Debug, Default)]
pub struct KeyTable {
    current: std::sync::RwLock<Arc<Keys>>,
    /// Whether any key is configured: the per-request check when none is.
    enabled: std::sync::atomic::AtomicBool,
}

impl KeyTable {
    pub fn new(keys: Keys) -> Self {
        KeyTable {
            enabled: std::sync::atomic::AtomicBool::new(keys.enabled()),
            current: std::sync::RwLock::new(Arc::new(keys)),
        }
    }

    /// Whether any key is configured.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// The table in force.
    pub fn get(&self) -> Arc<Keys> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `new` in force. A key whose name, digest, models and limits are
    /// unchanged keeps its live state (buckets, open requests).
    pub fn replace(&self, mut new: Keys) {
        let old = self.get();
        for k in new.keys.iter_mut() {
            if let Some(o) = old.keys.iter().find(|o| o.same_settings(k)) {
                *k = o.clone();
            }
        }
        let enabled = new.enabled();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        self.enabled.store(enabled, Ordering::Release);
    }
}

/// The configured keys.
#[derive(Debug, Default)]
pub struct Keys {
    require: bool,
    keys: Vec<Arc<Key>>,
}

/// One configured key and its live limit state.
#[derive(Debug)]
pub struct Key {
    /// The configured name: in logs and the `key` metric label.
    pub name: String,
    digest: [u8; 32],
    models: Vec<glob::Pattern>,
    rpm: u64,
    tpm: u64,
    max_concurrent: u32,
    open: AtomicU32,
    buckets: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    /// Requests that may start now (≤ rpm).
    requests: f64,
    /// Tokens that may be spent now (≤ tpm; below 0 after an answer used
    /// more than was left).
    tokens: f64,
    at: Instant,
}

/// Why a keyed request was refused (`reason` in
/// `cortex_key_rejections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unauthenticated,
    Model,
    Rpm,
    Tpm,
    Concurrency,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::Model => "model",
            Refusal::Rpm => "rpm",
            Refusal::Tpm => "tpm",
            Refusal::Concurrency => "concurrency",
        }
    }
}

/// OpenAI's `x-ratelimit-*` header fields for one answer.
pub type RateHeaders = Vec<(&'static str, HeaderValue)>;

/// A request [`Key::admit`] refused: why, the `429` to answer, and the
/// rate headers as they stand.
#[derive(Debug)]
pub struct Refused {
    pub why: Refusal,
    pub error: ApiError,
    pub headers: RateHeaders,
}

/// An admitted request of a key: counts as open while it lives.
#[derive(Debug)]
pub struct Permit {
    key: Arc<Key>,
    /// Prompt tokens taken from the `tpm` bucket at admission.
    estimate: u64,
    settled: bool,
    /// The rate headers as of admission.
    pub headers: RateHeaders,
}

/// SHA-256 of `key`, as the digest `key_sha256` holds in hex.
pub fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

fn parse_hex_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Keys {
    /// Builds the key table from `config`, reading `key_env` variables
    /// through `env`. Errors name the config key and what is wrong (never
    /// the key itself).
    pub fn from_config(
        config: &Config,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Keys, (String, String)> {
        let mut keys: Vec<Arc<Key>> = Vec::with_capacity(config.keys.len());
        for (i, k) in config.keys.iter().enumerate() {
            let at = |field: &str| format!("keys[{i}].{field}");
            if k.name.trim().is_empty() {
                return Err((at("name"), "a key needs a non-empty name".into()));
            }
            if keys.iter().any(|o| o.name == k.name) {
                return Err((at("name"), format!("duplicate key name `{}`", k.name)));
            }
            let digest = key_digest(k, &env).map_err(|(f, m)| (at(f), m))?;
            if keys.iter().any(|o| bool::from(o.digest.ct_eq(&digest))) {
                return Err((
                    at("key_sha256"),
                    format!("key `{}` has the same key as another entry", k.name),
                ));
            }
            let mut models = Vec::with_capacity(k.models.len());
            for m in &k.models {
                models.push(glob::Pattern::new(m).map_err(|e| {
                    (
                        at("models"),
                        format!("`{m}` is not a valid glob pattern: {e}"),
                    )
                })?);
            }
            keys.push(Arc::new(Key {
                name: k.name.clone(),
                digest,
                models,
                rpm: k.rpm,
                tpm: k.tpm,
                max_concurrent: k.max_concurrent,
                open: AtomicU32::new(0),
                buckets: Mutex::new(Buckets {
                    requests: k.rpm as f64,
                    tokens: k.tpm as f64,
                    at: Instant::now(),
                }),
            }));
        }
        if config.auth.require_keys && keys.is_empty() {
            return Err((
                "auth.require_keys".into(),
                "is true but no [[keys]] are configured: every request would be refused".into(),
            ));
        }
        Ok(Keys {
            require: config.auth.require_keys,
            keys,
        })
    }

    /// Whether any key is configured (else every request is anonymous and
    /// none of this module's work is done).
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The key a request presents: `Ok(None)` for an anonymous request
    /// (allowed only without `require_keys`), `Err(401)` otherwise.
    pub fn identify(
        &self,
        authorization: Option<&HeaderValue>,
        x_api_key: Option<&HeaderValue>,
    ) -> Result<Option<Arc<Key>>, ApiError> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let presented = authorization
            .and_then(|v| bearer_token(v.as_bytes()))
            .or_else(|| x_api_key.map(|v| v.as_bytes().trim_ascii()))
            .filter(|k| !k.is_empty());
        let Some(presented) = presented else {
            return if self.require {
                Err(unauthenticated(
                    "no API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`",
                ))
            } else {
                Ok(None)
            };
        };
        let d = digest(presented);
        // Every key is compared, in constant time, whatever matches.
        let mut found = 0u32; // index + 1
        for (i, k) in self.keys.iter().enumerate() {
            let hit = k.digest.ct_eq(&d);
            found = u32::conditional_select(&found, &(i as u32 + 1), hit);
        }
        match found {
            0 if self.require => Err(unauthenticated("invalid API key")),
            0 => Ok(None),
            n => Ok(Some(self.keys[n as usize - 1].clone())),
        }
    }
}

fn key_digest(
    k: &KeyConfig,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<[u8; 32], (&'static str, String)> {
    match (&k.key_sha256, &k.key_env) {
        (Some(hex), None) => parse_hex_digest(hex).ok_or((
            "key_sha256",
            "must be 64 hex digits (the SHA-256 of the key: `printf %s \"$KEY\" | sha256sum`)"
                .into(),
        )),
        (None, Some(var)) => match env(var) {
            Some(v) if !v.is_empty() => Ok(digest(v.as_bytes())),
            _ => Err((
                "key_env",
                format!("environment variable `{var}` is not set or empty"),
            )),
        },
        (Some(_), Some(_)) => Err(("key_env", "give key_sha256 or key_env, not both".into())),
        (None, None) => Err(("key_sha256", "a key needs key_sha256 or key_env".into())),
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer_token(v: &[u8]) -> Option<&[u8]> {
    let v = v.trim_ascii();
    if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
        Some(v[7..].trim_ascii())
    } else {
        None
    }
}

fn unauthenticated(message: &str) -> ApiError {
    ApiError::new(ErrorCode::InvalidApiKey, message)
}

impl Key {
    fn same_settings(&self, other: &Key) -> bool {
        self.name == other.name
            && bool::from(self.digest.ct_eq(&other.digest))
            && self.models == other.models
            && (self.rpm, self.tpm, self.max_concurrent)
                == (other.rpm, other.tpm, other.max_concurrent)
    }

    /// Whether this key may use a model requested as `requested` (an id or
    /// an alias) that resolved to `resolved`.
    pub fn allows(&self, requested: &str, resolved: &str) -> bool {
        self.models.is_empty()
            || self
                .models
                .iter()
                .any(|p| p.matches(requested) || p.matches(resolved))
    }

    /// Whether this key may see `model` in `/v1/models`.
    pub fn may_list(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|p| p.matches(model))
    }

    /// `403 model_not_allowed` for `requested`.
    pub fn not_allowed(&self, requested: &str) -> ApiError {
        ApiError::new(
            ErrorCode::ModelNotAllowed,
            format!("this API key may not use the model `{requested}`"),
        )
        .with_param("model")
    }

    fn refill(&self, b: &mut Buckets, now: Instant) {
        let secs = now.saturating_duration_since(b.at).as_secs_f64();
        b.at = now;
        if self.rpm > 0 {
            b.requests = (b.requests + secs * self.rpm as f64 / 60.0).min(self.rpm as f64);
        }
        if self.tpm > 0 {
            b.tokens = (b.tokens + secs * self.tpm as f64 / 60.0).min(self.tpm as f64);
        }
    }

    fn headers(&self, b: &Buckets) -> RateHeaders {
        let mut h = Vec::with_capacity(6);
        let mut put = |name: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.push((name, v));
            }
        };
        if self.rpm > 0 {
            put("x-ratelimit-limit-requests", self.rpm.to_string());
            put(
                "x-ratelimit-remaining-requests",
                (b.requests.max(0.0).floor() as u64).to_string(),
            );
            put(
                "x-ratelimit-reset-requests",
                reset_text(self.rpm as f64 - b.requests, self.rpm),
            );
        }
        if self.tpm > 0 {
            put("x-ratelimit-limit-tokens", self.tpm.to_string());
            put(
                "x-ratelimit-remaining-tokens",
                (b.tokens.max(0.0).floor() as u64).to_string(),
            );
            put(
                "x-ratelimit-reset-tokens",
                reset_text(self.tpm as f64 - b.tokens, self.tpm),
            );
        }
        h
    }

    /// The rate headers now, without taking anything (for answers refused
    /// before admission).
    pub fn peek_headers(&self) -> RateHeaders {
        if self.rpm == 0 && self.tpm == 0 {
            return Vec::new();
        }
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut b, Instant::now());
        self.headers(&b)
    }

    /// Admits one request whose prompt is estimated at `prompt_tokens`:
    /// takes a request from `rpm`, the estimate from `tpm` and a slot of
    /// `max_concurrent`, or refuses with `429` and `Retry-After`.
    pub fn admit(self: &Arc<Self>, prompt_tokens: u64) -> Result<Permit, Box<Refused>> {
        if self.max_concurrent > 0 {
            let was = self.open.fetch_add(1, Ordering::AcqRel);
            if was >= self.max_concurrent {
                self.open.fetch_sub(1, Ordering::AcqRel);
                let e = ApiError::new(
                    ErrorCode::RateLimitExceeded,
                    format!(
                        "this API key already has {} requests open (max_concurrent)",
                        self.max_concurrent
                    ),
                )
                .with_retry_after(1);
                return Err(Box::new(Refused {
                    why: Refusal::Concurrency,
                    error: e,
                    headers: self.peek_headers(),
                }));
            }
        } else {
            self.open.fetch_add(1, Ordering::AcqRel);
        }
        let release = || {
            self.open.fetch_sub(1, Ordering::AcqRel);
        };
        if self.rpm == 0 && self.tpm == 0 {
            return Ok(Permit {
                key: self.clone(),
                estimate: 0,
                settled: false,
                headers: Vec::new(),
            });
        }
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut b, Instant::now());
        // Never more than a full bucket of tokens is needed, so a prompt
        // larger than the whole allowance can still run (leaving debt).
        let needed = (prompt_tokens as f64).min(self.tpm as f64).max(1.0);
        // The first limit short of what this request needs: which, the
        // per-minute rate, what is missing, the unit.
        let short = if self.rpm > 0 && b.requests < 1.0 {
            Some((Refusal::Rpm, self.rpm, 1.0 - b.requests, "requests"))
        } else if self.tpm > 0 && b.tokens < needed {
            Some((Refusal::Tpm, self.tpm, needed - b.tokens, "tokens"))
        } else {
            None
        };
        if let Some((why, per_minute, missing, unit)) = short {
            let headers = self.headers(&b);
            drop(b);
            release();
            let error = ApiError::new(
                ErrorCode::RateLimitExceeded,
                format!("this API key is over its limit of {per_minute} {unit} per minute"),
            )
            .with_retry_after(whole_seconds(missing * 60.0 / per_minute as f64));
            return Err(Box::new(Refused {
                why,
                error,
                headers,
            }));
        }
        if self.rpm > 0 {
            b.requests -= 1.0;
        }
        let estimate = if self.tpm > 0 { prompt_tokens } else { 0 };
        b.tokens -= estimate as f64;
        let headers = self.headers(&b);
        Ok(Permit {
            key: self.clone(),
            estimate,
            settled: false,
            headers,
        })
    }

    /// Whether this key has a `tpm` limit (its streams need `usage`).
    pub fn limits_tokens(&self) -> bool {
        self.tpm > 0
    }

    /// Requests of this key open now.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }
}

impl Permit {
    pub fn key(&self) -> &Arc<Key> {
        &self.key
    }

    /// The answer ended: charge what it used (`usage` as (prompt,
    /// completion) tokens) in place of the admission estimate; without
    /// usage the estimate stands.
    pub fn settle(mut self, usage: Option<(u64, u64)>) {
        self.settled = true;
        if self.key.tpm == 0 {
            return;
        }
        let Some((prompt, completion)) = usage else {
            return;
        };
        let used = prompt.saturating_add(completion) as f64;
        let mut b = self.key.buckets.lock().unwrap_or_else(|e| e.into_inner());
        b.tokens -= used - self.estimate as f64;
        // Debt is bounded by one minute's allowance: a key is never locked
        // out for longer than a minute by one answer.
        b.tokens = b.tokens.max(-(self.key.tpm as f64));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.key.open.fetch_sub(1, Ordering::AcqRel);
        if !self.settled && self.estimate > 0 {
            // Refused before any model saw it: the estimate goes back.
            let mut b = self.key.buckets.lock().unwrap_or_else(|e| e.into_inner());
            b.tokens = (b.tokens + self.estimate as f64).min(self.key.tpm as f64);
        }
    }
}

/// Whole seconds for `Retry-After`, at least 1.
fn whole_seconds(secs: f64) -> u64 {
    (secs.ceil() as u64).max(1)
}

/// OpenAI's reset format (`"20ms"`, `"1s"`, `"6m0s"`) for the time until
/// `missing` units of a bucket of `per_minute` are back.
fn reset_text(missing: f64, per_minute: u64) -> String {
    let secs = (missing.max(0.0) * 60.0 / per_minute as f64).max(0.0);
    let d = Duration::from_secs_f64(secs);
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        let s = secs.ceil() as u64;
        if s >= 60 {
            format!("{}m{}s", s / 60, s % 60)
        } else {
            format!("{s}s")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        Config::from_toml(toml, "t").unwrap()
    }

    fn hex(key: &str) -> String {
        digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn keys(extra: &str) -> Keys {
        let text = format!(
            "[auth]\nrequire_keys = true\n[[keys]]\nname = \"a\"\nkey_sha256 = \"{}\"\n{extra}\n[[keys]]\nname = \"b\"\nkey_env = \"B_KEY\"\nmodels = [\"smollm2-*\"]\n",
            hex("sk-a")
        );
        Keys::from_config(&config(&text), |v| (v == "B_KEY").then(|| "sk-b".into())).unwrap()
    }

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn keys_are_found_by_either_header_and_unknown_ones_refused() {
        let k = keys("");
        let a = k.identify(Some(&hv("Bearer sk-a")), None).unwrap().unwrap();
        assert_eq!(a.name, "a");
        let b = k.identify(None, Some(&hv("sk-b"))).unwrap().unwrap();
        assert_eq!(b.name, "b");
        let b = k
            .identify(Some(&hv("bearer  sk-b ")), None)
            .unwrap()
            .unwrap();
        assert_eq!(b.name, "b");
        for (auth, x) in [
            (Some("Bearer sk-c"), None),
            (None, None),
            (Some("Basic c2stYQ=="), None),
            (Some("Bearer "), None),
            (None, Some("")),
        ] {
            let e = k
                .identify(auth.map(hv).as_ref(), x.map(hv).as_ref())
                .unwrap_err();
            assert_eq!(e.status().as_u16(), 401, "{auth:?} {x:?}");
            assert_eq!(e.code.as_str(), "invalid_api_key");
        }
    }

    #[test]
    fn without_require_keys_unknown_and_missing_keys_are_anonymous() {
        let text = format!(
            "[[keys]]\nname = \"a\"\nkey_sha256 = \"{}\"\nrpm = 1\n",
            hex("sk-a")
        );
        let k = Keys::from_config(&config(&text), |_| None).unwrap();
        assert!(k.identify(None, None).unwrap().is_none());
        assert!(k
            .identify(Some(&hv("Bearer sk-none")), None)
            .unwrap()
            .is_none());
        assert_eq!(
            k.identify(Some(&hv("Bearer sk-a")), None)
                .unwrap()
                .unwrap()
                .name,
            "a"
        );
        // No keys at all: nothing is checked.
        let none = Keys::from_config(&config(""), |_| None).unwrap();
        assert!(!none.enabled());
        assert!(none
            .identify(Some(&hv("Bearer x")), None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_key_config_names_the_key() {
        let bad = |text: &str| Keys::from_config(&config(text), |_| None).err().unwrap();
        assert_eq!(
            bad("[[keys]]\nname = \"a\"\nkey_sha256 = \"abc\"\n").0,
            "keys[0].key_sha256"
        );
        assert_eq!(
            bad("[[keys]]\nname = \"a\"\nkey_env = \"NOPE\"\n").0,
            "keys[0].key_env"
        );
        assert_eq!(bad("[[keys]]\nname = \"a\"\n").0, "keys[0].key_sha256");
        let h = hex("k");
        assert_eq!(
            bad(&format!("[[keys]]\nname = \"a\"\nkey_sha256 = \"{h}\"\n[[keys]]\nname = \"a\"\nkey_sha256 = \"{}\"\n", hex("j"))).0,
            "keys[1].name"
        );
        assert_eq!(
            bad(&format!("[[keys]]\nname = \"a\"\nkey_sha256 = \"{h}\"\n[[keys]]\nname = \"b\"\nkey_sha256 = \"{h}\"\n")).0,
            "keys[1].key_sha256"
        );
        assert_eq!(
            bad(&format!(
                "[[keys]]\nname = \"a\"\nkey_sha256 = \"{h}\"\nmodels = [\"[\"]\n"
            ))
            .0,
            "keys[0].models"
        );
        assert_eq!(bad("[auth]\nrequire_keys = true\n").0, "auth.require_keys");
    }

    #[test]
    fn model_globs_match_ids_and_aliases() {
        let k = keys("");
        let b = k.identify(None, Some(&hv("sk-b"))).unwrap().unwrap();
        assert!(b.allows("smollm2-135m", "smollm2-135m"));
        assert!(
            b.allows("default", "smollm2-135m"),
            "alias resolving to an allowed id"
        );
        assert!(!b.allows("qwen3-8b", "qwen3-8b"));
        assert!(b.may_list("smollm2-x") && !b.may_list("qwen3"));
        let a = k.identify(Some(&hv("Bearer sk-a")), None).unwrap().unwrap();
        assert!(a.allows("anything", "anything"), "no models = all");
        assert_eq!(b.not_allowed("qwen3-8b").status().as_u16(), 403);
    }

    #[test]
    fn rpm_is_a_bucket_of_rpm_requests() {
        let k = keys("rpm = 3");
        let a = k.identify(Some(&hv("Bearer sk-a")), None).unwrap().unwrap();
        let p1 = a.admit(0).unwrap();
        let get = |h: &RateHeaders, n: &str| {
            h.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(
            get(&p1.headers, "x-ratelimit-limit-requests").as_deref(),
            Some("3")
        );
        assert_eq!(
            get(&p1.headers, "x-ratelimit-remaining-requests").as_deref(),
            Some("2")
        );
        assert!(
            get(&p1.headers, "x-ratelimit-limit-tokens").is_none(),
            "no tpm, no token headers"
        );
        let _p2 = a.admit(0).unwrap();
        let _p3 = a.admit(0).unwrap();
        let Refused {
            why,
            error: e,
            headers: h,
        } = *a.admit(0).unwrap_err();
        assert_eq!(why, Refusal::Rpm);
        assert_eq!(e.status().as_u16(), 429);
        assert_eq!(e.code.as_str(), "rate_limit_exceeded");
        // One request comes back every 20 s.
        assert_eq!(e.retry_after, Some(20));
        assert_eq!(
            get(&h, "x-ratelimit-remaining-requests").as_deref(),
            Some("0")
        );
        assert_eq!(
            get(&h, "x-ratelimit-reset-requests").as_deref(),
            Some("1m0s")
        );
    }

    #[test]
    fn tpm_takes_the_estimate_then_settles_from_usage() {
        let k = keys("tpm = 100");
        let a = k.identify(Some(&hv("Bearer sk-a")), None).unwrap().unwrap();
        let p = a.admit(30).unwrap();
        let tokens = |a: &Key| a.buckets.lock().unwrap().tokens;
        assert!((tokens(&a) - 70.0).abs() < 0.1);
        // Used 20 prompt + 50 completion: 40 more than the estimate.
        p.settle(Some((20, 50)));
        assert!((tokens(&a) - 30.0).abs() < 0.1, "{}", tokens(&a));
        // A refused request gives its estimate back.
        let p = a.admit(25).unwrap();
        drop(p);
        assert!((tokens(&a) - 30.0).abs() < 0.1);
        // Over what is left: 429 with a wait for the missing tokens.
        let Refused {
            why,
            error: e,
            headers: h,
        } = *a.admit(60).unwrap_err();
        assert_eq!(why, Refusal::Tpm);
        assert_eq!(e.retry_after, Some(18)); // 30 tokens at 100/min
        assert!(h.iter().any(|(n, _)| *n == "x-ratelimit-remaining-tokens"));
        // A prompt larger than the whole allowance waits for a full bucket.
        let why = a.admit(1000).unwrap_err().why;
        assert_eq!(why, Refusal::Tpm);
    }

    #[test]
    fn max_concurrent_counts_open_permits() {
        let k = keys("max_concurrent = 2");
        let a = k.identify(Some(&hv("Bearer sk-a")), None).unwrap().unwrap();
        let p1 = a.admit(0).unwrap();
        let p2 = a.admit(0).unwrap();
        assert_eq!(a.open(), 2);
        let Refused { why, error: e, .. } = *a.admit(0).unwrap_err();
        assert_eq!(why, Refusal::Concurrency);
        assert_eq!(e.retry_after, Some(1));
        assert_eq!(a.open(), 2, "a refusal holds no slot");
        drop(p1);
        let _p3 = a.admit(0).unwrap();
        drop(p2);
        assert_eq!(a.open(), 1);
    }

    #[test]
    fn reset_text_is_openai_shaped() {
        assert_eq!(reset_text(0.0, 60), "0ms");
        assert_eq!(reset_text(0.5, 60), "500ms");
        assert_eq!(reset_text(1.0, 60), "1s");
        assert_eq!(reset_text(60.0, 60), "1m0s");
        assert_eq!(reset_text(90.0, 60), "1m30s");
    }
}
