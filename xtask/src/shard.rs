//! Splitting the microVM test binaries across nested hosts, and running one
//! host's share inside it (`xtask run-shard PLAN`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::suite::TestBinary;

/// Seconds a test binary took last time; unknown ones count as this.
const UNKNOWN_SECONDS: f64 = 60.0;

/// Durations of earlier runs, so the shards come out even.
#[derive(Default)]
pub struct Timings(BTreeMap<String, f64>);

impl Timings {
    pub fn load(path: &Path) -> Timings {
        let map = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str::<BTreeMap<String, f64>>(&text).ok())
            .unwrap_or_default();
        Timings(map)
    }

    pub fn record(&mut self, name: &str, elapsed: Duration) {
        self.0.insert(name.to_string(), elapsed.as_secs_f64());
    }

    pub fn save(&self, path: &Path) {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if let Ok(text) = serde_json::to_string_pretty(&self.0) {
            let _ = std::fs::write(path, text);
        }
    }

    fn seconds(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(UNKNOWN_SECONDS)
    }
}

/// Longest first, each to the least loaded host.
pub fn split(binaries: &[TestBinary], hosts: usize, timings: &Timings) -> Vec<Vec<TestBinary>> {
    let mut sorted: Vec<&TestBinary> = binaries.iter().collect();
    sorted.sort_by(|a, b| {
        timings
            .seconds(&b.name)
            .total_cmp(&timings.seconds(&a.name))
    });
    let mut shards: Vec<(f64, Vec<TestBinary>)> = vec![(0.0, Vec::new()); hosts.max(1)];
    for binary in sorted {
        if let Some(least) = shards.iter_mut().min_by(|a, b| a.0.total_cmp(&b.0)) {
            least.0 += timings.seconds(&binary.name);
            least.1.push(binary.clone());
        }
    }
    shards
        .into_iter()
        .map(|(_, s)| s)
        .filter(|s| !s.is_empty())
        .collect()
}

/// What one nested host runs.
pub struct Plan {
    pub binaries: Vec<TestBinary>,
    pub test_args: Vec<OsString>,
}

fn bytes_json(value: &Path) -> Value {
    json!(value.as_os_str().as_bytes())
}

fn json_path(value: &Value) -> Option<PathBuf> {
    let bytes: Vec<u8> = value
        .as_array()?
        .iter()
        .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
        .collect::<Option<_>>()?;
    Some(PathBuf::from(OsString::from_vec(bytes)))
}

impl Plan {
    pub fn save(&self, path: &Path) -> Result<()> {
        let binaries: Vec<Value> = self
            .binaries
            .iter()
            .map(
                |b| json!({"name": b.name, "path": bytes_json(&b.path), "cwd": bytes_json(&b.cwd)}),
            )
            .collect();
        let args: Vec<Value> = self.test_args.iter().map(|a| json!(a.as_bytes())).collect();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(report_path(path));
        std::fs::write(
            path,
            json!({"binaries": binaries, "test_args": args}).to_string(),
        )
        .with_context(|| format!("cannot write {}", path.display()))
    }

    fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value = serde_json::from_str(&text).context("a malformed shard plan")?;
        let binaries = value["binaries"]
            .as_array()
            .context("a shard plan without binaries")?
            .iter()
            .map(|b| {
                Some(TestBinary {
                    name: b["name"].as_str()?.to_string(),
                    path: json_path(&b["path"])?,
                    cwd: json_path(&b["cwd"])?,
                    needs_kvm: true,
                })
            })
            .collect::<Option<Vec<_>>>()
            .context("a malformed binary in the shard plan")?;
        let test_args = value["test_args"]
            .as_array()
            .map(|args| {
                args.iter()
                    .filter_map(|a| json_path(a).map(PathBuf::into_os_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Plan {
            binaries,
            test_args,
        })
    }
}

/// What a host's share came to, written beside its plan.
#[derive(Default)]
pub struct Report {
    pub failed: Vec<String>,
    pub timings: Vec<(String, Duration)>,
}

fn report_path(plan: &Path) -> PathBuf {
    plan.with_extension("report.json")
}

impl Report {
    pub fn load(plan: &Path) -> Report {
        let Some(value) = std::fs::read_to_string(report_path(plan))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        else {
            return Report::default();
        };
        let failed = value["failed"]
            .as_array()
            .map(|f| {
                f.iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let timings = value["seconds"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| {
                        Some((k.clone(), Duration::from_secs_f64(v.as_f64()?.max(0.0))))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Report { failed, timings }
    }
}

/// Inside a nested host: runs each binary of the plan in turn, from its
/// package's directory as cargo does, and writes the report.
pub fn run_plan(plan_path: &Path) -> Result<i32> {
    let plan = Plan::load(plan_path)?;
    let mut failed = Vec::new();
    let mut seconds = serde_json::Map::new();
    for binary in &plan.binaries {
        println!("     Running {} ({})", binary.name, binary.path.display());
        let started = Instant::now();
        let status = Command::new(&binary.path)
            .args(&plan.test_args)
            .current_dir(&binary.cwd)
            .status()
            .with_context(|| format!("cannot run {}", binary.path.display()))?;
        let elapsed = started.elapsed().as_secs_f64();
        println!("     {} took {elapsed:.1} s ({status})", binary.name);
        seconds.insert(binary.name.clone(), json!(elapsed));
        if !status.success() {
            failed.push(binary.name.clone());
        }
    }
    let report = json!({"failed": failed, "seconds": seconds});
    std::fs::write(report_path(plan_path), report.to_string())
        .context("cannot write the shard report")?;
    Ok(if failed.is_empty() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(name: &str) -> TestBinary {
        TestBinary {
            name: name.into(),
            path: PathBuf::from(format!("/t/{name}")),
            cwd: PathBuf::from("/w"),
            needs_kvm: true,
        }
    }

    #[test]
    fn longest_first_to_the_least_loaded_host() {
        let mut timings = Timings::default();
        for (name, s) in [
            ("mcp", 300),
            ("agent", 180),
            ("vm", 60),
            ("snap", 50),
            ("cli", 20),
        ] {
            timings.record(name, Duration::from_secs(s));
        }
        let all: Vec<_> = ["cli", "vm", "mcp", "snap", "agent"]
            .into_iter()
            .map(binary)
            .collect();
        let shards = split(&all, 2, &timings);
        let names: Vec<Vec<&str>> = shards
            .iter()
            .map(|s| s.iter().map(|b| b.name.as_str()).collect())
            .collect();
        assert_eq!(names, [vec!["mcp"], vec!["agent", "vm", "snap", "cli"]]);
        assert_eq!(split(&all, 1, &timings).len(), 1);
    }

    #[test]
    fn plans_survive_a_round_trip() {
        let dir = std::env::temp_dir().join(format!("xtask-plan-{}", std::process::id()));
        let path = dir.join("shard-0.json");
        let plan = Plan {
            binaries: vec![binary("a b")],
            test_args: vec!["guest::".into()],
        };
        plan.save(&path).unwrap();
        let back = Plan::load(&path).unwrap();
        assert_eq!(back.binaries[0].path, PathBuf::from("/t/a b"));
        assert_eq!(back.test_args, vec![OsString::from("guest::")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
