//! `meshserve canary`: changes a running mesh's traffic split without restarting Envoy. It
//! edits the filter configuration `meshserve up` wrote, checks it with the filters' own
//! parser, and replaces the extension config file Envoy watches in one rename, so every
//! Envoy worker switches to the new split between two requests.

use std::path::Path;

use serde_json::Value;

use crate::render::{FILTER_CONFIG_FILE, ROUTER_ECDS_FILE, check, write_atomically};

/// Held (an advisory lock, `flock`) while a change reads and rewrites the configuration.
pub const LOCK_FILE: &str = "canary.lock";

/// The change to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Give the canary this share of traffic.
    Percent(i64),
    /// Make the canary the default revision, with all the traffic.
    Promote,
    /// Send no traffic to the canary (it stays reachable by pinning).
    Rollback,
}

/// Applies `change` to the canary (the first, or the one named) of InferenceService `isvc`
/// in the state directory; returns the new split, for the user.
pub fn apply(
    state: &Path,
    isvc: &str,
    canary: Option<&str>,
    change: &Change,
) -> Result<String, String> {
    // One change at a time, across processes (the console and `meshserve canary`): each
    // reads the files the other may be rewriting.
    let lock_path = state.join(LOCK_FILE);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            format!(
                "{}: {e} (is `meshserve up` running with --state-dir {}?)",
                lock_path.display(),
                state.display()
            )
        })?;
    lock.lock()
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    let config_path = state.join(FILTER_CONFIG_FILE);
    let ecds_path = state.join(ROUTER_ECDS_FILE);
    let read = |path: &Path| -> Result<Value, String> {
        let text = std::fs::read(path).map_err(|e| {
            format!(
                "{}: {e} (is `meshserve up` running with --state-dir {}?)",
                path.display(),
                state.display()
            )
        })?;
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut config = read(&config_path)?;
    let mut ecds = read(&ecds_path)?;
    let services = config
        .get_mut("services")
        .and_then(Value::as_array_mut)
        .ok_or("the filter configuration has no services")?;
    let service = services
        .iter_mut()
        .find(|s| s["name"] == isvc)
        .ok_or_else(|| format!("no InferenceService '{isvc}' in {}", config_path.display()))?;
    let predictor = service
        .get_mut("predictor")
        .and_then(Value::as_object_mut)
        .ok_or("the service has no predictor")?;
    let canaries = predictor
        .get_mut("canaries")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| format!("InferenceService '{isvc}' has no canary"))?;
    let index = match canary {
        Some(name) => canaries
            .iter()
            .position(|c| c["name"] == name)
            .ok_or_else(|| format!("InferenceService '{isvc}' has no canary '{name}'"))?,
        None if !canaries.is_empty() => 0,
        None => return Err(format!("InferenceService '{isvc}' has no canary")),
    };
    match change {
        Change::Percent(p) => canaries[index]["percent"] = Value::from(*p),
        Change::Rollback => canaries[index]["percent"] = Value::from(0),
        Change::Promote => {
            let mut promoted = canaries.remove(index);
            if let Some(map) = promoted.as_object_mut() {
                map.remove("percent");
            }
            predictor.insert("default".into(), promoted);
        }
    }
    check(&config)?;
    // `meshserve up` keeps each revision's state (cold, waking, warm) beside the config.
    let states = std::fs::read(state.join(crate::render::STATES_FILE))
        .ok()
        .and_then(|text| serde_json::from_slice::<Value>(&text).ok())
        .unwrap_or(Value::Null);
    let summary = split(&config, isvc, &states[isvc]);
    let configuration = ecds
        .pointer_mut("/resources/0/typed_config/config/configuration/value")
        .ok_or_else(|| format!("{} is not a router extension config", ecds_path.display()))?;
    *configuration = Value::from(config.to_string());
    // The ECDS file is what Envoy watches: write it last, so filter.json is never behind it.
    write_atomically(&config_path, &config)
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    write_atomically(&ecds_path, &ecds).map_err(|e| format!("{}: {e}", ecds_path.display()))?;
    Ok(summary)
}

/// `isvc: <revision> <percent>% [(<state>)], ...`, with each revision's state where `states`
/// (the InferenceService's entry of [`crate::render::STATES_FILE`]) has it.
fn split(config: &Value, isvc: &str, states: &Value) -> String {
    let entry = |revision: &Value, percent: String| {
        let name = revision["name"].as_str().unwrap_or("?");
        match states[name].as_str() {
            Some(state) => format!("{name} {percent}% ({state})"),
            None => format!("{name} {percent}%"),
        }
    };
    let Some(service) = config["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == isvc))
    else {
        return String::new();
    };
    let canaries = service["predictor"]["canaries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let canary_total: i64 = canaries.iter().filter_map(|c| c["percent"].as_i64()).sum();
    let mut parts = vec![entry(
        &service["predictor"]["default"],
        (100 - canary_total).to_string(),
    )];
    parts.extend(canaries.iter().map(|c| entry(c, c["percent"].to_string())));
    format!("{isvc}: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::{filter_config, router_ecds};

    fn state() -> tempfile::TempDir {
        let isvc = crate::isvc::sample();
        let dir = tempfile::tempdir().unwrap();
        let config = filter_config(
            &[(&isvc, vec!["digits".into()])],
            &crate::render::Naming::Local,
        )
        .unwrap();
        write_atomically(&dir.path().join(FILTER_CONFIG_FILE), &config).unwrap();
        write_atomically(
            &dir.path().join(ROUTER_ECDS_FILE),
            &router_ecds(&config, Path::new("/x.wasm")),
        )
        .unwrap();
        dir
    }

    #[test]
    fn percent_promote_and_rollback() {
        let dir = state();
        assert_eq!(
            apply(dir.path(), "digits", None, &Change::Percent(50)).unwrap(),
            "digits: v1 50%, v2 50%"
        );
        let ecds: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(ROUTER_ECDS_FILE)).unwrap())
                .unwrap();
        let embedded: Value = serde_json::from_str(
            ecds.pointer("/resources/0/typed_config/config/configuration/value")
                .unwrap()
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            embedded["services"][0]["predictor"]["canaries"][0]["percent"],
            50
        );
        assert_eq!(
            apply(dir.path(), "digits", None, &Change::Rollback).unwrap(),
            "digits: v1 100%, v2 0%"
        );
        write_atomically(
            &dir.path().join(crate::render::STATES_FILE),
            &serde_json::json!({"digits": {"v1": "warm", "v2": "cold"}}),
        )
        .unwrap();
        assert_eq!(
            apply(dir.path(), "digits", None, &Change::Percent(10)).unwrap(),
            "digits: v1 90% (warm), v2 10% (cold)"
        );
        assert_eq!(
            apply(dir.path(), "digits", Some("v2"), &Change::Promote).unwrap(),
            "digits: v2 100% (cold)"
        );
    }

    #[test]
    fn concurrent_changes_never_lose_the_files() {
        let dir = state();
        std::thread::scope(|scope| {
            for p in 0..8 {
                let path = dir.path();
                scope.spawn(move || {
                    for _ in 0..10 {
                        apply(path, "digits", None, &Change::Percent(p * 10)).unwrap();
                    }
                });
            }
        });
        let config: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(FILTER_CONFIG_FILE)).unwrap())
                .unwrap();
        let percent = config["services"][0]["predictor"]["canaries"][0]["percent"]
            .as_i64()
            .unwrap();
        assert!((0..80).step_by(10).any(|p| p == percent), "{percent}");
        assert!(check(&config).is_ok());
    }

    #[test]
    fn bad_changes_leave_the_files_alone() {
        let dir = state();
        let before = std::fs::read(dir.path().join(ROUTER_ECDS_FILE)).unwrap();
        assert!(
            apply(dir.path(), "digits", None, &Change::Percent(101))
                .unwrap_err()
                .contains("not between 0 and 100")
        );
        assert!(
            apply(dir.path(), "nope", None, &Change::Percent(1))
                .unwrap_err()
                .contains("no InferenceService 'nope'")
        );
        assert!(
            apply(dir.path(), "digits", Some("v9"), &Change::Promote)
                .unwrap_err()
                .contains("no canary 'v9'")
        );
        assert_eq!(
            std::fs::read(dir.path().join(ROUTER_ECDS_FILE)).unwrap(),
            before
        );
    }
}
