//! The `cortex` binary: config errors stop start-up with file, line and key;
//! flags and env overrides apply; SIGHUP reloads without ending it;
//! SIGTERM drains and exits.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn invalid_config_names_file_line_and_key() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    write!(
        f,
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n[poll]\ninterval_ms = \"soon\"\n"
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cortex"))
        .arg("--config")
        .arg(f.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&f.path().display().to_string()), "{err}");
    assert!(err.contains("line 5"), "{err}");
    assert!(err.contains("poll.interval_ms"), "{err}");
}

#[test]
fn runs_with_missing_config_and_stops_on_sigterm() {
    let port = free_port();
    let mport = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cortex"))
        .arg("--config")
        .arg("/nonexistent/cortex.toml")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .env(
            "CORTEX_GATEWAY__METRICS_LISTEN",
            format!("127.0.0.1:{mport}"),
        )
        .env("CORTEX_POLL__INTERVAL_MS", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut up = false;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", mport)).is_ok()
        {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up, "cortex did not listen on the flag/env addresses");
    // SIGHUP reloads (here: a missing file, so the defaults again); it
    // never ends the process, as the signal's default action would.
    for _ in 0..3 {
        unsafe {
            libc::kill(child.id() as i32, libc::SIGHUP);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(child.try_wait().unwrap().is_none(), "cortex died on SIGHUP");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "cortex ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
