//! One configuration layer for both binaries (cortex and neuron): a TOML
//! file, then `PREFIX_…` environment overrides, merged by `figment` and
//! deserialised into the binary's own config type.
//!
//! - A missing file means the type's defaults (plus whatever the caller
//!   supplies as `base`, e.g. the neuron's default model list).
//! - An environment variable `PREFIX_A__B` overrides key `a.b`; its value
//!   is read as a TOML-like value (`700`, `true`, `"text"`, `[1, 2]`,
//!   `[{name = "a"}]`), plain text otherwise. Variables the binary reads as
//!   flags (`CORTEX_CONFIG`, `NEURON_LOG`, …) are named in `not_keys` and
//!   skipped. Non-UTF-8 variables never panic: figment reads `vars_os`.
//! - Every error names where the bad value came from: the file with the
//!   line and the key, or the environment variable and the key.

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Where a binary's configuration comes from.
#[derive(Debug, Clone, Copy)]
pub struct Layer {
    /// Environment prefix with its underscore: `CORTEX_`, `NEURON_`.
    pub prefix: &'static str,
    /// Variables under the prefix that are not config keys (without the
    /// prefix, any case): read by the binary's flags.
    pub not_keys: &'static [&'static str],
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: line {line}, key `{key}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
    #[error("invalid environment override {var}: key `{key}`: {message}")]
    Env {
        var: String,
        key: String,
        message: String,
    },
}

/// The text of `path`: empty when it does not exist.
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

impl Layer {
    /// Builds `T` from `base` (serialised defaults the file may override;
    /// `None` for none beyond `T`'s own), the file text `text` (shown as
    /// `path` in errors) and the process environment (non-UTF-8 variables
    /// are skipped).
    pub fn load<T: DeserializeOwned>(
        &self,
        base: Option<impl Serialize>,
        text: &str,
        path: &str,
    ) -> Result<T, ConfigError> {
        self.load_with_env(base, text, path, utf8_env(std::env::vars_os()))
    }

    /// As [`Layer::load`] with the environment given (for tests).
    pub fn load_with_env<T: DeserializeOwned>(
        &self,
        base: Option<impl Serialize>,
        text: &str,
        path: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<T, ConfigError> {
        // The file alone first: a syntax error carries its line.
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(ConfigError::Invalid {
                path: path.into(),
                line: line_of(text, e.span()),
                key: "-".into(),
                message: e.message().to_string(),
            });
        }
        let mut fig = Figment::new();
        if let Some(base) = base {
            fig = fig.merge(Serialized::defaults(base));
        }
        fig = fig.merge(Toml::string(text));
        // The file's own mistakes are reported against the file, before any
        // override can hide or cause them.
        if let Err(e) = fig.extract::<T>() {
            return Err(self.explain(e, text, path));
        }
        let current = fig
            .data()
            .ok()
            .and_then(|mut m| m.remove(&Profile::Default))
            .unwrap_or_default();
        let env = EnvList::new(*self, env, current);
        fig.merge(env)
            .extract::<T>()
            .map_err(|e| self.explain(e, text, path))
    }

    /// Names the source of a figment error: an environment variable, or
    /// the file with the line of the key.
    fn explain(&self, e: figment::Error, text: &str, path: &str) -> ConfigError {
        let mut segments = e.path.clone();
        if let figment::error::Kind::UnknownField(field, _) = &e.kind {
            segments.push(field.clone());
        }
        let key = if segments.is_empty() {
            "-".to_string()
        } else {
            segments.join(".")
        };
        let message = e.kind.to_string();
        let from_env = e
            .metadata
            .as_ref()
            .is_some_and(|m| m.name.contains("environment"));
        if from_env {
            let var = format!(
                "{}{}",
                self.prefix,
                segments
                    .iter()
                    .map(|p| p.to_ascii_uppercase())
                    .collect::<Vec<_>>()
                    .join("__")
            );
            return ConfigError::Env { var, key, message };
        }
        ConfigError::Invalid {
            path: path.into(),
            line: find_key_line(text, &key),
            key,
            message,
        }
    }
}

/// The UTF-8 variables of `vars` (from `std::env::vars_os()`); others are
/// skipped with a warning on stderr (they cannot be config values).
pub fn utf8_env(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Vec<(String, String)> {
    vars.into_iter()
        .filter_map(|(k, v)| match (k.into_string(), v.into_string()) {
            (Ok(k), Ok(v)) => Some((k, v)),
            (Ok(k), Err(_)) => {
                eprintln!("warning: environment variable {k} is not UTF-8; ignored");
                None
            }
            _ => None,
        })
        .collect()
}

/// The `PREFIX_…` variables of an environment as a figment provider:
/// `PREFIX_A__B=v` is key `a.b` with `v` read as a figment value. Errors in
/// these values name the variable. A numeric segment indexes an array of
/// the file (`NEURON_MODELS__0__MAX_QUEUE_DEPTH=7` changes that field of
/// the first `[[models]]` and keeps the rest of it).
struct EnvList {
    layer: Layer,
    dict: Dict,
}

impl EnvList {
    /// `current`: the configuration before the environment (to edit arrays in).
    fn new(layer: Layer, env: impl IntoIterator<Item = (String, String)>, current: Dict) -> Self {
        let mut vars: Vec<(String, Value)> = env
            .into_iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(layer.prefix)?;
                if layer.not_keys.iter().any(|n| rest.eq_ignore_ascii_case(n)) {
                    return None;
                }
                let key = rest.to_ascii_lowercase().replace("__", ".");
                if key.split('.').any(str::is_empty) {
                    return None;
                }
                let value: Value = v.parse().unwrap_or_else(|e| match e {});
                Some((key, value))
            })
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut working = current;
        let mut dict = Dict::new();
        for (key, value) in vars {
            let path: Vec<&str> = key.split('.').collect();
            if path.iter().any(|s| s.parse::<usize>().is_ok()) {
                // Edit the whole top-level value, then override it whole.
                let Some(mut top) = working.get(path[0]).cloned() else {
                    continue;
                };
                if set_path(&mut top, &path[1..], value) {
                    working.insert(path[0].to_string(), top.clone());
                    dict.insert(path[0].to_string(), top);
                }
                continue;
            }
            if let Value::Dict(_, nested) = figment::util::nest(&key, value) {
                merge_into(&mut working, nested.clone());
                merge_into(&mut dict, nested);
            }
        }
        EnvList { layer, dict }
    }
}

/// Sets `new` at `path` (dictionary keys and array indexes) inside `v`;
/// false when the path does not exist.
fn set_path(v: &mut Value, path: &[&str], new: Value) -> bool {
    let Some((first, rest)) = path.split_first() else {
        *v = new;
        return true;
    };
    match v {
        Value::Array(_, items) => {
            let Ok(i) = first.parse::<usize>() else {
                return false;
            };
            // The index just past the end appends an entry.
            if i == items.len() {
                items.push(Value::from(Dict::new()));
            }
            match items.get_mut(i) {
                Some(item) => set_path(item, rest, new),
                None => false,
            }
        }
        Value::Dict(_, d) => {
            if rest.is_empty() {
                d.insert(first.to_string(), new);
                return true;
            }
            match d.get_mut(*first) {
                Some(inner) => set_path(inner, rest, new),
                None => false,
            }
        }
        _ => false,
    }
}

impl Provider for EnvList {
    fn metadata(&self) -> Metadata {
        let prefix = self.layer.prefix;
        Metadata::named(format!("`{prefix}` environment variable(s)")).interpolater(
            move |_, keys| {
                let keys: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
                format!("{prefix}{}", keys.join("__"))
            },
        )
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// Merges `from` into `into`, dictionaries key by key, other values replaced.
fn merge_into(into: &mut Dict, from: Dict) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Dict(_, a)), Value::Dict(_, b)) => merge_into(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> usize {
    match span {
        Some(r) => text[..r.start.min(text.len())].matches('\n').count() + 1,
        None => 0,
    }
}

/// Best-effort line of `a.b.key` in the file: the last segment at a line
/// start (`key = …`), or its table header; 0 when not found.
pub fn find_key_line(text: &str, key: &str) -> usize {
    let segments: Vec<&str> = key
        .split('.')
        .filter(|s| s.parse::<usize>().is_err())
        .collect();
    let Some(last) = segments.last() else {
        return 0;
    };
    let at_key = text.lines().position(|l| {
        let t = l.trim_start();
        t.strip_prefix(last)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    });
    let at_table = || {
        text.lines().position(|l| {
            let t = l.trim();
            t == format!("[{key}]") || t == format!("[[{}]]", segments.join("."))
        })
    };
    at_key.or_else(at_table).map(|i| i + 1).unwrap_or(0)
}

#[cfg(test)]
// figment::Jail's closures return figment::Error, which is large.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Conf {
        listen: String,
        poll: Poll,
        neurons: Vec<Neuron>,
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Poll {
        interval_ms: u64,
        enabled: bool,
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Neuron {
        name: String,
        endpoint: String,
    }

    impl Default for Conf {
        fn default() -> Self {
            Conf {
                listen: "127.0.0.1:1".into(),
                poll: Poll::default(),
                neurons: vec![],
            }
        }
    }

    impl Default for Poll {
        fn default() -> Self {
            Poll {
                interval_ms: 1000,
                enabled: true,
            }
        }
    }

    const LAYER: Layer = Layer {
        prefix: "TESTCONF_",
        not_keys: &["CONFIG", "LOG"],
    };

    fn load(text: &str) -> Result<Conf, ConfigError> {
        LAYER.load(None::<Conf>, text, "/etc/t.toml")
    }

    #[test]
    fn file_then_environment() {
        figment::Jail::expect_with(|jail| {
            assert_eq!(load("").unwrap(), Conf::default());
            jail.set_env("TESTCONF_POLL__INTERVAL_MS", "250");
            jail.set_env("TESTCONF_LISTEN", "0.0.0.0:9000");
            jail.set_env("TESTCONF_CONFIG", "/x.toml");
            jail.set_env("TESTCONF_LOG", "debug");
            jail.set_env(
                "TESTCONF_NEURONS",
                r#"[{name = "a", endpoint = "http://10.0.0.5:13131"}]"#,
            );
            let c = load("[poll]\ninterval_ms = 500\nenabled = false\n").unwrap();
            assert_eq!(c.poll.interval_ms, 250, "the environment wins");
            assert!(!c.poll.enabled, "the file's other keys stay");
            assert_eq!(c.listen, "0.0.0.0:9000");
            assert_eq!(c.neurons.len(), 1);
            assert_eq!(c.neurons[0].endpoint, "http://10.0.0.5:13131");
            Ok(())
        });
    }

    #[test]
    fn numeric_segments_edit_array_items() {
        let text = "[[neurons]]\nname = \"a\"\nendpoint = \"http://x:1\"\n[[neurons]]\nname = \"b\"\nendpoint = \"http://y:1\"\n";
        let env = vec![(
            "TESTCONF_NEURONS__1__ENDPOINT".to_string(),
            "http://z:2".to_string(),
        )];
        let c: Conf = LAYER.load_with_env(None::<()>, text, "t", env).unwrap();
        assert_eq!(c.neurons[0].endpoint, "http://x:1");
        assert_eq!(c.neurons[1].name, "b");
        assert_eq!(c.neurons[1].endpoint, "http://z:2");
    }

    #[test]
    fn file_errors_name_file_line_and_key() {
        let e = load("listen = \"x\"\n\n[poll]\ninterval_ms = \"fast\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/etc/t.toml"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
        assert!(msg.contains("poll.interval_ms"), "{msg}");
        let e = load("[poll]\nbogus = 1\n").unwrap_err().to_string();
        assert!(e.contains("line 1") || e.contains("line 2"), "{e}");
        assert!(e.contains("bogus"), "{e}");
        let e = load("[poll\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn environment_errors_name_the_variable() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TESTCONF_POLL__INTERVAL_MS", "soon");
            let e = load("").unwrap_err().to_string();
            assert!(e.contains("TESTCONF_POLL__INTERVAL_MS"), "{e}");
            assert!(e.contains("poll.interval_ms"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn non_utf8_variables_do_not_panic() {
        figment::Jail::expect_with(|_| {
            use std::os::unix::ffi::OsStrExt;
            let bad = std::ffi::OsStr::from_bytes(b"\xff\xfe");
            // SAFETY: Jail serialises tests that touch the environment.
            unsafe { std::env::set_var("TESTCONF_JUNK_\u{e9}", bad) };
            unsafe { std::env::set_var(bad, "x") };
            let r = load("");
            unsafe { std::env::remove_var("TESTCONF_JUNK_\u{e9}") };
            unsafe { std::env::remove_var(bad) };
            // Skipped (with a warning), not a panic.
            assert_eq!(r.unwrap(), Conf::default());
            Ok(())
        });
    }
}
