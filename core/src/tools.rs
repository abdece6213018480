//! The agent tools' protocol (`spawn_session`, `check_session`): the request a sandbox's supervisor forwards to its session, and the answer of `check_session`; the Worker and the supervisor use these same types.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::background::Status;

/// A request of the sandbox's agent tools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToolRequest {
    Spawn {
        prompt: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        repository: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
    },
    Check {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
}

/// What an agent tool sends the supervisor: a [`ToolRequest`], and for `check_session` how
/// long the supervisor may poll until every child has ended (never forwarded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_seconds: Option<f64>,
    #[serde(flatten)]
    pub request: ToolRequest,
}

impl ToolCall {
    /// How long to poll, in whole seconds, at most `max`.
    pub fn wait(&self, max: u64) -> u64 {
        match self.wait_seconds {
            Some(w) if w.is_finite() && w > 0.0 => (w as u64).min(max),
            _ => 0,
        }
    }
}

/// `GET /background/:id/output`: what an agent did. `branch` and `commit` are there once it
/// ended (null when its result has none); `message` is null while its session has not answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentOutputView {
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub branch: Option<Option<String>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub commit: Option<Option<String>>,
    pub files: Vec<String>,
    pub id: String,
    pub message: Option<String>,
    pub result: Option<Value>,
    pub session: Option<String>,
    pub status: Status,
}

/// A field that may be absent (`None`) or there and null (`Some(None)`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// The answer of the sandbox's `check_session` tool: the output of each agent it asked about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildrenAnswer {
    pub children: Vec<AgentOutputView>,
}

impl ChildrenAnswer {
    /// Every agent asked about has ended (completed, failed or cancelled).
    pub fn all_ended(&self) -> bool {
        self.children.iter().all(|c| c.status.is_terminal())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_tool_call_carries_its_request_and_its_wait() {
        let line = json!({"op": "check", "wait_seconds": 240});
        let call: ToolCall = serde_json::from_value(line).unwrap();
        assert_eq!(call.request, ToolRequest::Check { id: None });
        assert_eq!(call.wait(1800), 240);
        // What the supervisor forwards is the request alone.
        assert_eq!(
            serde_json::to_value(&call.request).unwrap(),
            json!({"op": "check"})
        );
        let spawn = json!({"op": "spawn", "prompt": "fix it", "model": "m"});
        let call: ToolCall = serde_json::from_value(spawn.clone()).unwrap();
        assert_eq!(call.wait(1800), 0);
        assert_eq!(serde_json::to_value(&call.request).unwrap(), spawn);
        let back: ToolRequest =
            serde_json::from_value(serde_json::to_value(&call.request).unwrap()).unwrap();
        assert_eq!(back, call.request);
        // Capped, and a nonsense wait is no wait.
        let long: ToolCall =
            serde_json::from_value(json!({"op": "check", "id": "bg_1", "wait_seconds": 1e9}))
                .unwrap();
        assert_eq!(long.wait(1800), 1800);
        let neg: ToolCall =
            serde_json::from_value(json!({"op": "check", "wait_seconds": -3.5})).unwrap();
        assert_eq!(neg.wait(1800), 0);
    }

    #[test]
    fn an_unknown_tool_field_or_op_is_refused() {
        for bad in [
            json!({"op": "check", "ids": ["x"]}),
            json!({"op": "delete"}),
            json!({"prompt": "no op"}),
        ] {
            assert!(
                serde_json::from_value::<ToolCall>(bad.clone()).is_err(),
                "{bad}"
            );
            assert!(
                serde_json::from_value::<ToolRequest>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn children_have_ended_when_every_one_is_terminal() {
        let view = |status| AgentOutputView {
            branch: None,
            commit: None,
            files: Vec::new(),
            id: "bg_1".into(),
            message: None,
            result: None,
            session: None,
            status,
        };
        let some = ChildrenAnswer {
            children: vec![view(Status::Completed), view(Status::Running)],
        };
        assert!(!some.all_ended());
        let all = ChildrenAnswer {
            children: vec![view(Status::Failed), view(Status::Cancelled)],
        };
        assert!(all.all_ended());
        let text = serde_json::to_string(&all).unwrap();
        assert_eq!(
            serde_json::from_str::<ChildrenAnswer>(&text).ok(),
            Some(all)
        );
    }
}
