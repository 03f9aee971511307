//! Writes a tiny random-weight checkpoint (`helexa_testkit::tiny_arch`) to a
//! directory, for `scripts/gen-arch-fixtures` to run through transformers:
//!
//!   cargo run -p helexa-testkit --example write_tiny_arch -- \
//!       gemma2|gemma3|phi3|qwen3_moe WINDOW|none QUERY_SCALAR|none DIR [longrope]

use helexa_testkit::tiny_arch::{Kind, TinyArch};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (longrope, args) = match args.split_last() {
        Some((last, rest)) if last == "longrope" => (true, rest),
        _ => (false, args.as_slice()),
    };
    let [kind, window, scalar, dir] = args else {
        eprintln!("usage: write_tiny_arch KIND WINDOW|none QUERY_SCALAR|none DIR [longrope]");
        std::process::exit(2);
    };
    let kind = match kind.as_str() {
        "gemma2" => Kind::Gemma2,
        "gemma3" => Kind::Gemma3,
        "phi3" => Kind::Phi3,
        "qwen3_moe" => Kind::Qwen3Moe,
        other => {
            eprintln!("unknown kind {other}");
            std::process::exit(2);
        }
    };
    let opt = |s: &str| (s != "none").then(|| s.parse::<usize>().expect("a number or none"));
    let tiny = TinyArch {
        window: opt(window),
        query_scalar: opt(scalar),
        longrope,
        ..TinyArch::new(kind)
    };
    let dir = std::path::Path::new(dir);
    std::fs::create_dir_all(dir).expect("create the directory");
    tiny.write(dir).expect("write the checkpoint");
}
