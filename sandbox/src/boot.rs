//! The private protocol between the local provider and the supervisor it starts: the secrets line on the supervisor's standard input, the supervisor's state file (`state/supervisor.json`) and its `POST /assign` exchange. Both ends use these types.

use std::collections::BTreeMap;

use nightshift_core::provider::SupervisorSpec;
use serde::{Deserialize, Serialize};

/// The one JSON line the provider writes to the supervisor's standard input after start
/// (secrets never enter an image, a snapshot or the process environment). Every field is
/// optional on reading: an unreadable line is the empty one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSecrets {
    /// Where to dial the session, when the sandbox is made for one (null for a pooled one).
    #[serde(default)]
    pub supervisor: Option<SupervisorSpec>,
    /// Environment for the supervisor beyond its own (model keys when no model proxy).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The secret the provider presents to the supervisor's local API (empty: none).
    #[serde(default)]
    pub api_secret: String,
    /// The token this sandbox presents to the model proxy (in place of any model key).
    #[serde(default)]
    pub model_token: Option<String>,
    /// OpenCode providers reached through the model proxy.
    #[serde(default)]
    pub model_vendors: Vec<String>,
}

impl BootSecrets {
    /// The line as written to standard input (with its newline).
    pub fn line(&self) -> String {
        // Strings, maps and lists only: encoding cannot fail.
        format!("{}\n", serde_json::to_string(self).unwrap_or_default())
    }

    /// Reads the line; one that is not these secrets reads as none.
    pub fn parse(line: &str) -> BootSecrets {
        serde_json::from_str(line.trim()).unwrap_or_default()
    }
}

/// `state/supervisor.json` in the sandbox's folder: the port of the supervisor's local API,
/// and whether the sandbox is ready. Written by the supervisor, read by the provider (without
/// following links: the file is the sandbox's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorState {
    pub port: u16,
    #[serde(default)]
    pub ready: bool,
}

impl SupervisorState {
    /// The file's bytes.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The file read back; `None` when it is not one (being written, or planted).
    pub fn decode(bytes: &[u8]) -> Option<SupervisorState> {
        serde_json::from_slice(bytes).ok()
    }
}

/// `POST /assign` to the supervisor: where the session link goes, for a pooled sandbox (at
/// start it comes from [`BootSecrets::supervisor`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    pub session_id: String,
    pub control_url: String,
    pub sandbox_token: String,
}

/// The supervisor's answer to an accepted `POST /assign` (a refusal is an
/// [`nightshift_core::provider::ErrorAnswer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignAnswer {
    pub assigned: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_secrets_line_is_the_json_it_replaced_and_reads_back() {
        let secrets = BootSecrets {
            supervisor: Some(SupervisorSpec {
                control_url: "http://127.0.0.1:8787".into(),
                sandbox_token: "tok".into(),
            }),
            env: [("ANTHROPIC_API_KEY".to_string(), "k".to_string())].into(),
            api_secret: "0123456789abcdef".into(),
            model_token: Some("mt".into()),
            model_vendors: vec!["anthropic".into()],
        };
        let old = json!({"supervisor": {"control_url": "http://127.0.0.1:8787", "sandbox_token": "tok"},
            "env": {"ANTHROPIC_API_KEY": "k"}, "api_secret": "0123456789abcdef",
            "model_token": "mt", "model_vendors": ["anthropic"]});
        let line = secrets.line();
        assert!(line.ends_with('\n'));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&line).unwrap(),
            old
        );
        assert_eq!(BootSecrets::parse(&line), secrets);
        // A pooled sandbox: no supervisor spec, no model proxy.
        let pooled = BootSecrets::default();
        let old = json!({"supervisor": null, "env": {}, "api_secret": "",
            "model_token": null, "model_vendors": []});
        assert_eq!(serde_json::to_value(&pooled).unwrap(), old);
        assert_eq!(BootSecrets::parse(&pooled.line()), pooled);
        // Missing fields are empty; a line that is not JSON is no secrets.
        assert_eq!(
            BootSecrets::parse(r#"{"env": {"A": "b"}}"#)
                .env
                .get("A")
                .map(String::as_str),
            Some("b")
        );
        assert_eq!(BootSecrets::parse("not json"), BootSecrets::default());
    }

    #[test]
    fn the_state_file_is_the_json_it_replaced_and_reads_back() {
        let st = SupervisorState {
            port: 40123,
            ready: true,
        };
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&st.encode()).unwrap(),
            json!({"port": 40123, "ready": true})
        );
        assert_eq!(SupervisorState::decode(st.encode().as_bytes()), Some(st));
        assert_eq!(SupervisorState::decode(b"{\"port\": 70000}"), None);
        assert_eq!(SupervisorState::decode(b"{\"po"), None);
    }

    #[test]
    fn an_assignment_and_its_answer_round_trip() {
        let a = Assignment {
            session_id: "ses_1".into(),
            control_url: "http://x".into(),
            sandbox_token: "t".into(),
        };
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(
            v,
            json!({"session_id": "ses_1", "control_url": "http://x", "sandbox_token": "t"})
        );
        assert_eq!(serde_json::from_value::<Assignment>(v).ok(), Some(a));
        let ok = AssignAnswer { assigned: true };
        assert_eq!(serde_json::to_value(ok).unwrap(), json!({"assigned": true}));
        assert_eq!(
            serde_json::from_value::<AssignAnswer>(json!({"assigned": true})).ok(),
            Some(ok)
        );
    }
}
