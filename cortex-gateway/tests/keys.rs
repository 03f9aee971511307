//! Client API keys and limits (docs/protocol.md §7) through real HTTP:
//! 401 without or with a wrong key, both key headers, 403 for a model the
//! key may not use, `/v1/models` filtered per key, 429 with `Retry-After`
//! for rpm, tpm (settled from the answer's usage, streamed or not) and
//! max_concurrent, the `x-ratelimit-*` headers, and the `key` label.

mod common;
use common::*;
use cortex_gateway::keys::digest;
use helexa_testkit::{MockModel, MockNeuron};
use serde_json::json;
use std::time::{Duration, Instant};

fn hex(key: &str) -> String {
    digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn key(name: &str, secret: &str) -> cortex_gateway::config::KeyConfig {
    cortex_gateway::config::KeyConfig {
        name: name.into(),
        key_sha256: Some(hex(secret)),
        key_env: None,
        models: Vec::new(),
        rpm: 0,
        tpm: 0,
        max_concurrent: 0,
    }
}

/// Two models `m` and `other` on one mock neuron, behind a cortex with keys.
async fn keyed(tune: impl FnOnce(&mut cortex_gateway::Config)) -> (MockNeuron, Harness) {
    let a = MockNeuron::start(
        "a",
        vec![MockModel::loaded("m", 0), MockModel::loaded("other", 0)],
    )
    .await;
    let mut cfg = config(&[("node-a", &a)]);
    cfg.auth.require_keys = true;
    tune(&mut cfg);
    let h = start(cfg).await;
    (a, h)
}

async fn chat_with(
    h: &Harness,
    auth: Option<(&str, &str)>,
    model: &str,
    stream: bool,
) -> reqwest::Response {
    let mut req = h
        .client
        .post(h.url("/v1/chat/completions"))
        .json(&chat_body(model, stream));
    if let Some((name, value)) = auth {
        req = req.header(name, value);
    }
    req.send().await.unwrap()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn requests_need_a_known_key_in_either_header() {
    let (_a, h) = keyed(|c| c.keys = vec![key("team", "sk-team")]).await;
    // Public routes stay public.
    for path in ["/health", "/version"] {
        let r = h.client.get(h.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = h.client.get(h.url("/ready")).send().await.unwrap();
    assert_ne!(r.status(), 401);
    let r = h.client.get(&h.metrics_url).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let r = chat_with(&h, None, "m", false).await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("retry-after").is_none(), "401 is permanent");
    let e = envelope(r).await;
    assert_eq!(e["code"], "invalid_api_key");
    assert_eq!(e["type"], "invalid_request_error");
    let r = chat_with(&h, Some(("authorization", "Bearer sk-wrong")), "m", false).await;
    assert_eq!(r.status(), 401);
    let r = h.client.get(h.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401, "/v1/models needs a key too");

    wait_loaded(&h, "m", "sk-team").await;
    let r = chat_with(&h, Some(("authorization", "Bearer sk-team")), "m", false).await;
    assert_eq!(r.status(), 200);
    let r = chat_with(&h, Some(("x-api-key", "sk-team")), "m", true).await;
    assert_eq!(r.status(), 200);
    let events = sse_data(r).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    // A request is counted when its relay ends, which for a stream can be
    // just after the client has read `[DONE]`.
    let want = r#"cortex_requests_total{key="team",model="m",node="node-a",status="200"} 2"#;
    let mut m = h.metrics().await;
    for _ in 0..100 {
        if m.contains(want) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        m = h.metrics().await;
    }
    assert!(m.contains(want), "{m}");
    assert!(
        m.contains(r#"cortex_key_rejections_total{key="-",reason="unauthenticated"} 3"#),
        "{m}"
    );
    // The key itself never appears in the exposition.
    assert!(!m.contains("sk-team"));
}

#[tokio::test]
async fn keys_are_limited_to_their_models_in_requests_and_listings() {
    let (_a, h) = keyed(|c| {
        let mut k = key("narrow", "sk-n");
        k.models = vec!["m*".into()];
        c.keys = vec![k, key("wide", "sk-w")];
        c.aliases.insert("fast".into(), "m".into());
    })
    .await;
    wait_loaded(&h, "other", "sk-w").await;
    let auth = Some(("authorization", "Bearer sk-n"));
    let r = chat_with(&h, auth, "other", false).await;
    assert_eq!(r.status(), 403);
    let e = envelope(r).await;
    assert_eq!(e["code"], "model_not_allowed");
    assert_eq!(e["param"], "model");
    assert_eq!(chat_with(&h, auth, "m", false).await.status(), 200);
    // An alias resolving to an allowed id is allowed.
    assert_eq!(chat_with(&h, auth, "fast", false).await.status(), 200);

    let list = |secret: &'static str| {
        let h = &h;
        async move {
            let v: serde_json::Value = models_as(h, secret).await.json().await.unwrap();
            let mut ids: Vec<String> = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(list("sk-n").await, vec!["fast", "m"]);
    assert_eq!(list("sk-w").await, vec!["fast", "m", "other"]);
    let m = h.metrics().await;
    assert!(
        m.contains(r#"cortex_key_rejections_total{key="narrow",reason="model"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn rpm_refuses_with_retry_after_and_ratelimit_headers() {
    let (_a, h) = keyed(|c| {
        let mut k = key("slow", "sk-s");
        k.rpm = 2;
        c.keys = vec![k];
    })
    .await;
    wait_loaded(&h, "m", "sk-s").await;
    let auth = Some(("authorization", "Bearer sk-s"));
    let r = chat_with(&h, auth, "m", false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("2"));
    // (Listing models does not count against rpm.)
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("1"));
    assert!(header(&r, "x-ratelimit-reset-requests").is_some());
    assert!(
        header(&r, "x-ratelimit-limit-tokens").is_none(),
        "no tpm set"
    );
    let r = chat_with(&h, auth, "m", true).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("0"));
    let _ = sse_data(r).await;
    let r = chat_with(&h, auth, "m", false).await;
    assert_eq!(r.status(), 429);
    // One request comes back every 30 s.
    let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!((28..=30).contains(&retry), "{retry}");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("0"));
    let e = envelope(r).await;
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert_eq!(e["type"], "rate_limit_error");
}

#[tokio::test]
async fn tpm_counts_prompt_at_admission_and_settles_from_usage() {
    let (a, h) = keyed(|c| {
        let mut k = key("tok", "sk-t");
        k.tpm = 1000;
        c.keys = vec![k];
    })
    .await;
    wait_loaded(&h, "m", "sk-t").await;
    // The mock reports prompt_tokens = body bytes / 4 and 4 completion
    // tokens; a long prompt spends most of the minute's allowance.
    let body = json!({"model": "m", "max_tokens": 4,
        "messages": [{"role": "user", "content": "x".repeat(3000)}]});
    let since_sent = Instant::now();
    let r = h
        .client
        .post(h.url("/v1/chat/completions"))
        .bearer_auth("sk-t")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("1000"));
    let admitted: u64 = header(&r, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        admitted < 260,
        "about 750 estimated tokens taken: {admitted}"
    );
    let v: serde_json::Value = r.json().await.unwrap();
    let used = v["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used > 750, "{v}");
    // Settled from usage: what is left now is 1000 - used, plus what the
    // bucket refilled since the request.
    let r = models_as(&h, "sk-t").await;
    let left: i64 = header(&r, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        charged(1000 - left, used as i64, 1000, since_sent),
        "left {left}, used {used}"
    );
    // A second long prompt does not fit what is left: 429.
    let r = h
        .client
        .post(h.url("/v1/chat/completions"))
        .bearer_auth("sk-t")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(header(&r, "retry-after").is_some());
    assert_eq!(
        a.recorded().v1_count,
        1,
        "the refused request never reached the neuron"
    );
    let m = h.metrics().await;
    assert!(
        m.contains(r#"cortex_key_rejections_total{key="tok",reason="tpm"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn max_concurrent_holds_across_streams_and_frees_at_their_end() {
    let (a, h) = keyed(|c| {
        let mut k = key("one", "sk-1");
        k.max_concurrent = 1;
        c.keys = vec![k];
        c.gateway.workers = 2;
    })
    .await;
    wait_loaded(&h, "m", "sk-1").await;
    a.set(|b| b.chunk_delay = Duration::from_millis(300));
    let auth = Some(("authorization", "Bearer sk-1"));
    let first = chat_with(&h, auth, "m", true).await;
    assert_eq!(first.status(), 200);
    // While the first stream runs, a second (on another connection, maybe
    // another worker) is refused.
    let r = chat_with(&h, auth, "m", false).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), Some("1"));
    let _ = sse_data(first).await;
    wait_until("the slot is free again", 10, || async {
        chat_with(&h, auth, "m", false).await.status() == 200
    })
    .await;
}

#[tokio::test]
async fn without_require_keys_anonymous_requests_pass_and_keys_keep_their_limits() {
    let (_a, h) = keyed(|c| {
        c.auth.require_keys = false;
        let mut k = key("limited", "sk-l");
        k.rpm = 1;
        c.keys = vec![k];
    })
    .await;
    h.wait_replicas("m", 1).await;
    assert_eq!(chat_with(&h, None, "m", false).await.status(), 200);
    let dummy = Some(("authorization", "Bearer sk-no-key-needed"));
    assert_eq!(chat_with(&h, dummy, "m", false).await.status(), 200);
    let auth = Some(("authorization", "Bearer sk-l"));
    assert_eq!(chat_with(&h, auth, "m", false).await.status(), 200);
    assert_eq!(chat_with(&h, auth, "m", false).await.status(), 429);
}

/// `GET /v1/models` with key `secret`.
async fn models_as(h: &Harness, secret: &str) -> reqwest::Response {
    h.client
        .get(h.url("/v1/models"))
        .bearer_auth(secret)
        .send()
        .await
        .unwrap()
}

/// Waits until `model` has a loaded replica, asking with key `secret`.
async fn wait_loaded(h: &Harness, model: &str, secret: &str) {
    wait_until(&format!("{model} is loaded"), 20, || async {
        let v: serde_json::Value = models_as(h, secret).await.json().await.unwrap();
        v["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == model && m["replicas"] == 1))
    })
    .await
}

/// `SIGHUP`'s reload: new keys take effect, a key whose settings did not
/// change keeps its limit state, and an invalid file keeps the running
/// keys and names its line and key.
#[tokio::test]
async fn reload_swaps_keys_and_keeps_the_old_ones_on_a_bad_file() {
    let a = MockNeuron::start("a", vec![MockModel::loaded("m", 0)]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cortex.toml");
    let write = |keys: &str| {
        let text = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n[poll]\ninterval_ms = 50\n[auth]\nrequire_keys = true\n[[neurons]]\nname = \"node-a\"\nendpoint = \"{}\"\n{keys}",
            a.url()
        );
        std::fs::write(&path, text).unwrap();
    };
    let key_a = format!(
        "[[keys]]\nname = \"a\"\nkey_sha256 = \"{}\"\nrpm = 2\n",
        hex("sk-a")
    );
    let key_b = format!("[[keys]]\nname = \"b\"\nkey_sha256 = \"{}\"\n", hex("sk-b"));
    write(&key_a);
    let h = start(cortex_gateway::Config::load(&path).unwrap()).await;
    wait_loaded(&h, "m", "sk-a").await;
    let auth_a = Some(("authorization", "Bearer sk-a"));
    let auth_b = Some(("authorization", "Bearer sk-b"));
    assert_eq!(chat_with(&h, auth_a, "m", false).await.status(), 200);
    assert_eq!(chat_with(&h, auth_b, "m", false).await.status(), 401);

    write(&format!("{key_a}{key_b}"));
    let gw = &h.cortex.gateway;
    assert!(cortex_gateway::reload::reload(gw, &path).is_ok());
    assert_eq!(chat_with(&h, auth_b, "m", false).await.status(), 200);
    // Key a kept its bucket: its second request of the minute passes, the
    // third is over rpm = 2.
    assert_eq!(chat_with(&h, auth_a, "m", false).await.status(), 200);
    assert_eq!(chat_with(&h, auth_a, "m", false).await.status(), 429);

    write(&format!("{key_b}rpm = \"lots\"\n"));
    let e = cortex_gateway::reload::reload(gw, &path).unwrap_err();
    assert!(
        e.contains("keys") && e.contains("rpm") && e.contains("line"),
        "{e}"
    );
    assert_eq!(
        chat_with(&h, auth_b, "m", false).await.status(),
        200,
        "the running keys stay"
    );
}

/// A `tpm` key's stream settles from `usage` even when the client did not
/// ask for it: cortex asks the neuron for it and keeps the usage-only
/// event from the client; a client that asked gets it as usual.
#[tokio::test]
async fn tpm_streams_settle_from_usage_the_client_did_not_ask_for() {
    let (a, h) = keyed(|c| {
        let mut k = key("tok", "sk-t");
        k.tpm = 100_000;
        c.keys = vec![k];
    })
    .await;
    wait_loaded(&h, "m", "sk-t").await;
    let remaining = || async {
        let r = models_as(&h, "sk-t").await;
        header(&r, "x-ratelimit-remaining-tokens")
            .unwrap()
            .parse::<i64>()
            .unwrap()
    };
    let since_before = Instant::now();
    let before = remaining().await;
    let r = chat_with(&h, Some(("authorization", "Bearer sk-t")), "m", true).await;
    assert_eq!(r.status(), 200);
    let events = sse_data(r).await;
    assert!(
        events.iter().all(|e| !e.contains("\"usage\":{")),
        "the client did not ask for usage: {events:?}"
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let sent = a.recorded().requests.last().unwrap().json();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    // Settled: the mock's usage (prompt = body bytes / 4, 4 completion
    // tokens) was charged, not just the admission estimate.
    // The relay settles just after the client reads [DONE].
    let used = sent.to_string().len() as i64 / 4 + 4;
    wait_until("the stream is charged what it used", 10, || async {
        charged(before - remaining().await, used, 100_000, since_before)
    })
    .await;

    let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hello world"}]});
    let r = h
        .client
        .post(h.url("/v1/chat/completions"))
        .bearer_auth("sk-t")
        .json(&body)
        .send()
        .await
        .unwrap();
    let events = sse_data(r).await;
    assert!(
        events.iter().any(|e| e.contains("\"usage\":{")),
        "asked for, usage is passed on: {events:?}"
    );
}
