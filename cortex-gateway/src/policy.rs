//! The fleet policy in force: `[[models]]` and the alias table, replaced
//! whole on reload (`SIGHUP`, `POST /admin/reload`) so that a request reads
//! one consistent version through one `Arc`.

use crate::config::{Config, ModelPolicy};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Default)]
pub struct Policy {
    /// By model id.
    pub models: HashMap<String, ModelPolicy>,
    /// Client-facing names to model ids: `[aliases]` plus every
    /// `[[models]] aliases` entry.
    pub aliases: BTreeMap<String, String>,
    /// Returned for models without an entry.
    default: ModelPolicy,
}

impl Policy {
    pub fn from_config(config: &Config) -> Policy {
        let mut aliases = config.aliases.clone();
        for m in &config.models {
            for a in &m.aliases {
                aliases.insert(a.clone(), m.id.clone());
            }
        }
        Policy {
            models: config
                .models
                .iter()
                .map(|m| (m.id.clone(), m.clone()))
                .collect(),
            aliases,
            default: ModelPolicy::default(),
        }
    }

    /// The policy of `model` (the defaults when it has no entry).
    pub fn of(&self, model: &str) -> &ModelPolicy {
        self.models.get(model).unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_defaults() {
        let c = Config::from_toml(
            "[aliases]\nfast = \"a\"\n\n[[models]]\nid = \"b\"\naliases = [\"big\"]\nmin_replicas = 1\nmax_replicas = 3\n",
            "c",
        )
        .unwrap();
        let p = Policy::from_config(&c);
        assert_eq!(p.aliases["fast"], "a");
        assert_eq!(p.aliases["big"], "b");
        assert_eq!(p.of("b").max_replicas, 3);
        assert_eq!(p.of("b").scale_up_after_secs, 10);
        assert_eq!(p.of("zzz").max_replicas, 1);
        assert_eq!(p.of("zzz").min_replicas, 0);
    }

    #[test]
    fn invalid_policies_name_the_key() {
        for (text, key) in [
            (
                "[[models]]\nid = \"a\"\nmin_replicas = 2\nmax_replicas = 1\n",
                "models.max_replicas",
            ),
            (
                "[[models]]\nid = \"a\"\n\n[[models]]\nid = \"a\"\n",
                "models.id",
            ),
            ("[[models]]\nmin_replicas = 1\n", "models.id"),
            ("[[models]]\nid = \"a\"\nbogus = 1\n", "bogus"),
        ] {
            let e = Config::from_toml(text, "c").unwrap_err().to_string();
            assert!(e.contains(key), "{key} in {e}");
        }
    }
}
