//! cortex's own HTTP/1.1 server (`front.rs`) over raw TCP: pipelining,
//! chunked request bodies, `Expect: 100-continue`, HTTP/1.0, `HEAD`, the
//! head and body limits, malformed requests and the keep-alive timeout.
//! Responses are read with httparse and cortex's chunked decoder, bytes as
//! they arrive, so framing mistakes fail here.

mod common;
use bytes::BytesMut;
use common::*;
use cortex_gateway::h1::{Chunked, Step};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&self.body));
        })
    }
}

async fn read(s: &mut TcpStream, buf: &mut BytesMut) -> usize {
    tokio::time::timeout(Duration::from_secs(10), s.read_buf(buf))
        .await
        .expect("cortex answers within 10 s")
        .expect("read")
}

/// Reads one response from `s` (bytes beyond it stay in `buf`). A body
/// with neither length nor chunking runs to the end of the connection.
async fn read_answer(s: &mut TcpStream, buf: &mut BytesMut, head_request: bool) -> Answer {
    let (status, headers, used) = loop {
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut hs);
        if let httparse::Status::Complete(n) = r.parse(buf).expect("a valid response head") {
            let headers: Vec<(String, String)> = r
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            break (r.code.unwrap(), headers, n);
        }
        assert!(read(s, buf).await > 0, "connection closed inside a head");
    };
    let _ = buf.split_to(used);
    let mut a = Answer {
        status,
        headers,
        body: Vec::new(),
    };
    if head_request || status == 100 || status == 204 {
        return a;
    }
    if let Some(len) = a.header("content-length") {
        let len: usize = len.parse().unwrap();
        while buf.len() < len {
            assert!(read(s, buf).await > 0, "connection closed inside a body");
        }
        a.body = buf.split_to(len).to_vec();
    } else if a.header("transfer-encoding") == Some("chunked") {
        let mut dec = Chunked::new(4096);
        loop {
            match dec.step(buf).expect("valid chunked framing") {
                Step::Data(d) => a.body.extend_from_slice(&d),
                Step::End => break,
                Step::NeedMore => {
                    assert!(
                        read(s, buf).await > 0,
                        "connection closed inside a chunked body"
                    )
                }
            }
        }
    } else {
        while read(s, buf).await > 0 {}
        a.body = buf.split().to_vec();
    }
    a
}

fn chat_request(stream: bool, extra_headers: &str) -> String {
    let body = chat_body("m", stream).to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: cortex\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let (a, h) = one_neuron(|_| {}).await;
    let mut s = TcpStream::connect(h.cortex.addr).await.unwrap();
    // Three requests in one write: plain chat, streamed chat, a GET.
    let all = format!(
        "{}{}GET /health HTTP/1.1\r\nHost: cortex\r\n\r\n",
        chat_request(false, "X-Request-Id: first\r\n"),
        chat_request(true, "")
    );
    s.write_all(all.as_bytes()).await.unwrap();
    let mut buf = BytesMut::new();
    let one = read_answer(&mut s, &mut buf, false).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.header("x-request-id"), Some("first"));
    assert_eq!(one.header("x-helexa-node"), Some("node-a"));
    assert!(one.header("date").is_some());
    assert_eq!(one.json()["object"], "chat.completion");
    let two = read_answer(&mut s, &mut buf, false).await;
    assert_eq!(two.status, 200);
    assert_eq!(two.header("content-type"), Some("text/event-stream"));
    assert_ne!(two.header("x-request-id"), Some("first"));
    let text = String::from_utf8(two.body).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let three = read_answer(&mut s, &mut buf, false).await;
    assert_eq!(three.status, 200);
    assert!(buf.is_empty(), "nothing after the third answer");
    assert_eq!(a.recorded().v1_count, 2);
    // Still open for more.
    s.write_all(chat_request(false, "").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut s, &mut buf, false).await.status, 200);
}

#[tokio::test]
async fn chunked_request_bodies_with_expect_continue_are_read() {
    let (a, h) = one_neuron(|_| {}).await;
    let mut s = TcpStream::connect(h.cortex.addr).await.unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: cortex\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = BytesMut::new();
    let cont = read_answer(&mut s, &mut buf, false).await;
    assert_eq!(cont.status, 100, "cortex asks for the body");
    let body = chat_body("m", false).to_string();
    let (x, y) = body.split_at(10);
    for piece in [x, y] {
        s.write_all(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let ans = read_answer(&mut s, &mut buf, false).await;
    assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
    assert_eq!(a.recorded().v1_count, 1);
    let seen = a.recorded().requests[0].json();
    assert_eq!(seen["messages"][0]["content"], "hello world");
}

#[tokio::test]
async fn http_1_0_clients_get_a_stream_delimited_by_the_close() {
    let (_a, h) = one_neuron(|_| {}).await;
    let mut s = TcpStream::connect(h.cortex.addr).await.unwrap();
    let req = chat_request(true, "").replacen("HTTP/1.1", "HTTP/1.0", 1);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = BytesMut::new();
    let ans = read_answer(&mut s, &mut buf, false).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.header("transfer-encoding"), None, "no chunking for 1.0");
    assert_eq!(ans.header("connection"), Some("close"));
    let text = String::from_utf8(ans.body).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // With keep-alive and a known length, 1.0 keeps the connection.
    let mut s = TcpStream::connect(h.cortex.addr).await.unwrap();
    let req = chat_request(false, "Connection: keep-alive\r\n").replacen("HTTP/1.1", "HTTP/1.0", 1);
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = BytesMut::new();
    for _ in 0..2 {
        let ans = read_answer(&mut s, &mut buf, false).await;
        assert_eq!(ans.status, 200);
        assert_eq!(ans.header("connection"), Some("keep-alive"));
    }
}

#[tokio::test]
async fn bad_requests_get_envelopes_and_limits_hold() {
    let (a, h) = one_neuron(|c| c.gateway.max_header_bytes = 2048).await;
    let addr = h.cortex.addr;
    let exchange = |raw: Vec<u8>, head: bool| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&raw).await.unwrap();
        let mut buf = BytesMut::new();
        read_answer(&mut s, &mut buf, head).await
    };

    let ans = exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false).await;
    let length = ans.header("content-length").unwrap().to_string();
    let ans = exchange(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), true).await;
    assert_eq!(ans.status, 200);
    assert_eq!(
        ans.header("content-length"),
        Some(length.as_str()),
        "HEAD keeps the length"
    );

    let big = format!(
        "GET /health HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4096)
    );
    let ans = exchange(big.into_bytes(), false).await;
    assert_eq!(ans.status, 431);
    assert_eq!(ans.json()["error"]["code"], "request_too_large");
    assert_eq!(ans.header("connection"), Some("close"));

    let ans = exchange(b"GET /he alth HTTP/1.1\r\n\r\n".to_vec(), false).await;
    assert_eq!(ans.status, 400);
    assert_eq!(ans.json()["error"]["code"], "invalid_request");

    let both = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}".to_vec();
    let ans = exchange(both, false).await;
    assert_eq!(ans.status, 400);
    assert!(ans.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Transfer-Encoding"));

    let ans = exchange(
        b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        false,
    )
    .await;
    assert_eq!(ans.status, 400);

    assert_eq!(
        a.recorded().v1_count,
        0,
        "no bad request reached the neuron"
    );
    assert_eq!(h.chat("m", false).await.status(), 200, "cortex lives on");
}

#[tokio::test]
async fn an_over_limit_body_is_refused_before_it_is_read() {
    let (a, h) = one_neuron(|c| c.gateway.max_body_bytes = 1000).await;
    let mut s = TcpStream::connect(h.cortex.addr).await.unwrap();
    // Announces 10 MB, sends only the head and a little: the answer comes
    // anyway, without waiting for the rest.
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{\"model\":")
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    let ans = read_answer(&mut s, &mut buf, false).await;
    assert_eq!(ans.status, 413);
    assert_eq!(ans.json()["error"]["code"], "request_too_large");
    assert_eq!(a.recorded().v1_count, 0);
    let text = h.metrics().await;
    assert!(
        text.contains(r#"cortex_requests_total{key="-",model="-",node="-",status="413"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn idle_connections_close_after_the_keepalive_timeout() {
    let (_a, h) = one_neuron(|c| c.gateway.keepalive_timeout_ms = 300).await;
    let mut s = TcpStream::connect(h.cortex.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = BytesMut::new();
    assert_eq!(read_answer(&mut s, &mut buf, false).await.status, 200);
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed, not answered");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    // A head that never completes is cut off by client_timeout_ms too.
    let (_b, h) = one_neuron(|c| c.gateway.client_timeout_ms = 300).await;
    let mut s = TcpStream::connect(h.cortex.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_given_up_and_frees_the_upstream() {
    let (a, h) = one_neuron(|c| c.gateway.client_timeout_ms = 300).await;
    // A long stream (≈ 24 MB) that fills every socket buffer on the way.
    let piece = "x".repeat(4096);
    a.set(|bh| bh.chunks = (0..6000).map(|_| piece.clone()).collect());
    let mut s = TcpStream::connect(h.cortex.addr).await.unwrap();
    s.write_all(chat_request(true, "").as_bytes())
        .await
        .unwrap();
    // Read nothing. cortex's write blocks, times out, and the stream's
    // upstream request is dropped.
    wait_until("upstream closed early", 15, || async {
        a.recorded().closed_early == 1
    })
    .await;
    assert_eq!(a.recorded().completed, 0);
    assert_eq!(h.chat("m", false).await.status(), 200, "cortex lives on");
}

/// Each framing rule that closes a request-smuggling gap, over raw TCP: the
/// answer is 400 (or 501 for a transfer coding cortex does not implement),
/// the connection is closed after it, and the bytes that a lenient reader
/// would have taken for a second request are never served.
#[tokio::test]
async fn strict_framing_refuses_desync_patterns_and_closes() {
    let (a, h) = one_neuron(|_| {}).await;
    let addr = h.cortex.addr;
    let smuggled = "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "Content-Length with a sign",
            format!("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: +5\r\n\r\n{{}}   {smuggled}"),
            400,
        ),
        (
            "Content-Length with trailing non-ASCII whitespace",
            format!("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\u{a0}\r\n\r\n{{}}{smuggled}"),
            400,
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            format!("POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "a chunk-size line without digits",
            format!("POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "a chunk-size line with only an extension",
            format!("POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n;x\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "a chunk size over 64 bits",
            format!("POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000002\r\n{{}}\r\n0\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "a bare LF in a chunk extension",
            format!("POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2;a\nb\r\n{{}}\r\n0\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "gzip before chunked",
            format!("POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n{smuggled}"),
            501,
        ),
        (
            "chunked twice",
            format!("POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n{smuggled}"),
            400,
        ),
    ];
    for (what, raw, status) in cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut buf = BytesMut::new();
        let ans = read_answer(&mut s, &mut buf, false).await;
        assert_eq!(ans.status, status, "{what}");
        assert_eq!(ans.header("connection"), Some("close"), "{what}");
        assert!(ans.json()["error"]["message"].is_string(), "{what}");
        // Nothing more comes: the smuggled request is not answered.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "{what}: the connection is closed");
        assert!(
            buf.is_empty() && rest.is_empty(),
            "{what}: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    assert_eq!(
        a.recorded().v1_count,
        0,
        "no refused request reached the neuron"
    );
    wait_until("every refused connection is counted", 10, || async {
        h.metrics()
            .await
            .contains(r#"cortex_connections_closed_total{end="refused"} 9"#)
    })
    .await;
    // What already worked still works: trailers, extensions, 100-continue.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let body = serde_json::to_string(&chat_body("m", false)).unwrap();
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=\"q\"\r\n{body}\r\n0\r\nx-trailer: 1\r\n\r\n",
        body.len()
    );
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut buf = BytesMut::new();
    let ans = read_answer(&mut s, &mut buf, false).await;
    assert_eq!(ans.status, 200);
}

/// `gateway.max_connections`: the connection over the cap is not served
/// until one closes; open and closed connections are counted by how they
/// ended.
#[tokio::test]
async fn connections_over_the_cap_wait_and_ends_are_counted() {
    // No harness request goes to the API listener (its keep-alive
    // connection would hold a slot): only this test's connections count.
    let a = helexa_testkit::MockNeuron::start("a", vec![]).await;
    let mut cfg = config(&[("node-a", &a)]);
    cfg.gateway.max_connections = 2;
    cfg.gateway.workers = 1;
    let h = start(cfg).await;
    let addr = h.cortex.addr;
    let get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut c1 = TcpStream::connect(addr).await.unwrap();
    let mut c2 = TcpStream::connect(addr).await.unwrap();
    for c in [&mut c1, &mut c2] {
        c.write_all(get).await.unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(read_answer(c, &mut buf, false).await.status, 200);
    }
    // A third connects (the kernel's backlog takes it) but is not served.
    let mut c3 = TcpStream::connect(addr).await.unwrap();
    c3.write_all(get).await.unwrap();
    let mut buf3 = BytesMut::new();
    let early = tokio::time::timeout(Duration::from_millis(500), c3.read_buf(&mut buf3)).await;
    assert!(early.is_err(), "served over the cap");
    // One closes cleanly: the third is served.
    drop(c1);
    let ans = read_answer(&mut c3, &mut buf3, false).await;
    assert_eq!(ans.status, 200);
    // A request cut off mid-head counts as cut.
    c2.write_all(b"GET /health HTTP/1.1\r\nHo").await.unwrap();
    drop(c2);
    wait_until("the ends are counted", 10, || async {
        let m = h.metrics().await;
        m.contains(r#"cortex_connections_closed_total{end="clean"} 1"#)
            && m.contains(r#"cortex_connections_closed_total{end="cut"} 1"#)
            && m.contains("cortex_connections_open 1")
    })
    .await;
}
