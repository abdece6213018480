//! The provider contract's fixtures (`core/tests/fixtures/provider/*.json`, one message each, named `<message>[.<case>].json`): every fixture parses into its `core::provider` type and serialises back to the same JSON value, so the types say exactly what the fixtures say. The Modal provider's tests load the same files (`modal_provider/tests/test_contract_fixtures.py`) and check the Modal app's requests and answers against them.

use std::collections::BTreeSet;
use std::path::PathBuf;

use nightshift_core::provider::{
    Assign, BuildImage, CreateSandbox, Deleted, EgressAnswer, ErrorAnswer, Exec, ExecResult,
    GitStatus, Health, Image, Sandbox, SandboxList, SetEgress, Snapshot, TakeSnapshot,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Every message of the contract, by its fixtures' name: each has at least one fixture.
const MESSAGES: &[&str] = &[
    "create_sandbox",
    "restore_snapshot",
    "assign",
    "set_egress",
    "exec",
    "take_snapshot",
    "build_image",
    "sandbox",
    "sandbox_list",
    "egress_answer",
    "exec_result",
    "git_status",
    "snapshot",
    "deleted",
    "image",
    "error",
    "health",
];

fn fixtures() -> Vec<(String, String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/provider");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a fixture").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a file name")
            .to_string();
        if !name.ends_with(".json") {
            continue;
        }
        let message = name.split('.').next().unwrap_or_default().to_string();
        let text = std::fs::read_to_string(&path).expect("readable");
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        out.push((name, message, value));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The fixture read as `T`, and written back.
fn round_trip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

fn check(message: &str, value: &Value) -> Result<Value, String> {
    match message {
        "create_sandbox" | "restore_snapshot" => round_trip::<CreateSandbox>(value),
        "assign" => round_trip::<Assign>(value),
        "set_egress" => round_trip::<SetEgress>(value),
        "exec" => round_trip::<Exec>(value),
        "take_snapshot" => round_trip::<TakeSnapshot>(value),
        "build_image" => round_trip::<BuildImage>(value),
        "sandbox" => round_trip::<Sandbox>(value),
        "sandbox_list" => round_trip::<SandboxList>(value),
        "egress_answer" => round_trip::<EgressAnswer>(value),
        "exec_result" => round_trip::<ExecResult>(value),
        "git_status" => round_trip::<GitStatus>(value),
        "snapshot" => round_trip::<Snapshot>(value),
        "deleted" => round_trip::<Deleted>(value),
        "image" => round_trip::<Image>(value),
        "error" => round_trip::<ErrorAnswer>(value),
        "health" => round_trip::<Health>(value),
        other => Err(format!(
            "no contract message `{other}`: name the fixture after one of {MESSAGES:?}"
        )),
    }
}

#[test]
fn every_fixture_parses_into_its_type_and_serialises_back_unchanged() {
    let mut problems = Vec::new();
    for (name, message, value) in fixtures() {
        match check(&message, &value) {
            Ok(back) if back == value => {}
            Ok(back) => problems.push(format!("{name}: written back as {back}")),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_message_has_a_fixture() {
    let found: BTreeSet<String> = fixtures().into_iter().map(|(_, m, _)| m).collect();
    let missing: Vec<&&str> = MESSAGES.iter().filter(|m| !found.contains(**m)).collect();
    assert!(missing.is_empty(), "no fixture for {missing:?}");
}

#[test]
fn a_restore_names_no_snapshot() {
    // The snapshot is in the path; the Modal app refuses the field there.
    for (name, message, value) in fixtures() {
        if message == "restore_snapshot" {
            assert!(value.get("snapshot").is_none(), "{name}");
        }
    }
}

#[test]
fn a_changed_fixture_is_caught() {
    // A field the type does not know is refused in a request and dropped from an answer, so
    // either way the fixture would not come back unchanged.
    let mut create: Value =
        serde_json::from_str(include_str!("fixtures/provider/create_sandbox.json"))
            .unwrap_or_default();
    create["colour"] = Value::from("red");
    assert!(check("create_sandbox", &create).is_err());
    let mut sandbox: Value =
        serde_json::from_str(include_str!("fixtures/provider/sandbox.ready.json"))
            .unwrap_or_default();
    sandbox["colour"] = Value::from("red");
    assert_ne!(check("sandbox", &sandbox).ok(), Some(sandbox.clone()));
    sandbox["status"] = Value::from("sleeping");
    assert!(check("sandbox", &sandbox).is_err());
}
