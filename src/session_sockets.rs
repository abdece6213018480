//! A session object's hibernating sockets: people's (tagged `people` and `client:<id>`) and its sandbox's (tagged `sandbox`), what each remembers across hibernation, and sending to them.

use std::collections::BTreeSet;

use nightshift_core::api::PeopleClose;
use nightshift_core::hosted::CloseCode;
use nightshift_core::ids::Identity;
use nightshift_core::wire::{ErrorBody, ServerMessage};
use serde::{Deserialize, Serialize};
use worker::{State, WebSocket, WebSocketPair};

use crate::error::{ApiError, ApiResult};
use crate::platform::random_hex;

/// Tag of every person's socket (broadcasts go to these, never to the sandbox).
const PEOPLE: &str = "people";
/// Tag of the sandbox's socket.
const SANDBOX: &str = "sandbox";

/// The tag of one client's sockets. Prefixed, so no client id or user name can ever equal a
/// reserved tag (`people`, `sandbox`); at most 7 + 128 bytes (the core bounds client ids), so the
/// runtime's 256-byte limit on a tag (which it would answer with a panic) is never reached.
fn client_tag(client: &str) -> String {
    format!("client:{client}")
}

/// What a person's socket remembers across hibernation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub client: String,
    pub conn: String,
    pub identity: Identity,
}

/// What the sandbox's socket remembers across hibernation: the link generation (its token's
/// hash) it was opened for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxAttachment {
    #[serde(default)]
    pub link: Option<String>,
    pub conn: String,
}

/// Whose socket it is.
pub enum Socket {
    Person(Attachment),
    Sandbox(SandboxAttachment),
    Unknown,
}

/// Either kind of attachment, read in one pass. Reading a sandbox's attachment as a person's
/// first (and failing) cost a second structured-clone read and a JS `Error` (with its stack) on
/// every sandbox frame: 16 % of the runtime's samples per single sandbox event (BENCHMARKS.md,
/// "Where a single command's time goes").
#[derive(Deserialize)]
struct AnyAttachment {
    client: Option<String>,
    conn: Option<String>,
    identity: Option<Identity>,
    link: Option<String>,
}

impl AnyAttachment {
    /// What the two-pass read decided: a person's attachment when it has a client, a conn and
    /// an identity; else the sandbox's when it has a conn; else unknown.
    fn socket(self) -> Socket {
        match self {
            AnyAttachment {
                client: Some(client),
                conn: Some(conn),
                identity: Some(identity),
                ..
            } => Socket::Person(Attachment {
                client,
                conn,
                identity,
            }),
            AnyAttachment {
                conn: Some(conn),
                link,
                ..
            } => Socket::Sandbox(SandboxAttachment { link, conn }),
            _ => Socket::Unknown,
        }
    }
}

impl Socket {
    pub fn of(ws: &WebSocket) -> Socket {
        match ws.deserialize_attachment::<AnyAttachment>() {
            Ok(Some(any)) => any.socket(),
            Ok(None) => Socket::Unknown,
            // A field of an unexpected type: the two reads, as before.
            Err(_) => Socket::two_reads(ws),
        }
    }

    fn two_reads(ws: &WebSocket) -> Socket {
        if let Ok(Some(person)) = ws.deserialize_attachment::<Attachment>() {
            return Socket::Person(person);
        }
        match ws.deserialize_attachment::<SandboxAttachment>() {
            Ok(Some(sandbox)) => Socket::Sandbox(sandbox),
            _ => Socket::Unknown,
        }
    }
}

/// An `error` frame (answering the client frame `reference`, if any).
pub fn error_frame(reference: Option<String>, code: &str, message: &str) -> ServerMessage {
    let (code, message) = (code.to_string(), message.to_string());
    let error = ErrorBody { code, message };
    ServerMessage::Error { reference, error }
}

fn send_all(sockets: &[WebSocket], frame: &ServerMessage) {
    // One encoding for every socket.
    if let Ok(text) = serde_json::to_string(frame) {
        for ws in sockets {
            let _ = ws.send_with_str(&text);
        }
    }
}

pub fn send(ws: &WebSocket, frame: &ServerMessage) {
    send_all(std::slice::from_ref(ws), frame);
}

/// The sockets of one session object.
pub struct Sockets<'a>(pub &'a State);

impl Sockets<'_> {
    fn tagged(&self, tag: &str) -> Vec<WebSocket> {
        self.0.get_websockets_with_tag(tag)
    }

    /// One frame to every person.
    pub fn to_people(&self, frame: &ServerMessage) {
        send_all(&self.tagged(PEOPLE), frame);
    }

    /// The clients whose sockets are open.
    pub fn live_clients(&self) -> BTreeSet<String> {
        let people = self.tagged(PEOPLE);
        let attached = people.iter().filter_map(|ws| match Socket::of(ws) {
            Socket::Person(person) => Some(person.client),
            _ => None,
        });
        attached.collect()
    }

    pub fn close_clients(&self, clients: &[String], why: PeopleClose) {
        for client in clients {
            for ws in self.tagged(&client_tag(client)) {
                let _ = ws.close(Some(why.code()), Some(why.reason()));
            }
        }
    }

    /// Accepts a person's socket; an older socket of the same client id is replaced.
    pub fn accept_person(&self, client: &str, identity: &Identity) -> ApiResult<WebSocketPair> {
        let tag = client_tag(client);
        let older = self.tagged(&tag);
        let pair = WebSocketPair::new().map_err(ApiError::from)?;
        self.0
            .accept_websocket_with_tags(&pair.server, &[tag.as_str(), PEOPLE]);
        let attachment = Attachment {
            client: client.to_string(),
            conn: random_hex(8),
            identity: identity.clone(),
        };
        pair.server
            .serialize_attachment(attachment)
            .map_err(ApiError::from)?;
        let replaced = PeopleClose::Replaced;
        for ws in older {
            let _ = ws.close(Some(replaced.code()), Some(replaced.reason()));
        }
        Ok(pair)
    }

    /// A reconnect with the same client id has already replaced this socket.
    pub fn replaced(&self, person: &Attachment) -> bool {
        let sockets = self.tagged(&client_tag(&person.client));
        sockets.iter().any(|other| match Socket::of(other) {
            Socket::Person(other) => other.conn != person.conn,
            _ => false,
        })
    }

    /// Accepts the sandbox's socket for link generation `link`; one live sandbox socket per
    /// session (an older one is replaced).
    pub fn accept_sandbox(&self, link: String) -> ApiResult<WebSocketPair> {
        let older = self.tagged(SANDBOX);
        let pair = WebSocketPair::new().map_err(ApiError::from)?;
        self.0.accept_websocket_with_tags(&pair.server, &[SANDBOX]);
        let attachment = SandboxAttachment {
            link: Some(link),
            conn: random_hex(8),
        };
        pair.server
            .serialize_attachment(attachment)
            .map_err(ApiError::from)?;
        let replaced = CloseCode::Replaced;
        for ws in older {
            let _ = ws.close(Some(replaced.code()), Some(replaced.reason()));
        }
        Ok(pair)
    }

    pub fn to_sandbox(&self, text: &str) {
        for ws in self.tagged(SANDBOX) {
            let _ = ws.send_with_str(text);
        }
    }

    /// Closes the sandbox's sockets (of generation `link` only, when given).
    pub fn close_sandbox(&self, why: CloseCode, link: Option<&str>) {
        for ws in self.tagged(SANDBOX) {
            let generation = match Socket::of(&ws) {
                Socket::Sandbox(sandbox) => sandbox.link,
                _ => None,
            };
            if link.is_none() || generation.as_deref().unwrap_or_default() == link.unwrap_or("") {
                let _ = ws.close(Some(why.code()), Some(why.reason()));
            }
        }
    }

    /// Another socket than `closed` is open for link generation `link` (a reconnect keeps the
    /// sandbox connected); `generation` reads a socket's generation.
    pub fn sandbox_still_open(
        &self,
        closed: &SandboxAttachment,
        link: &str,
        generation: impl Fn(&SandboxAttachment) -> Option<String>,
    ) -> bool {
        self.tagged(SANDBOX).iter().any(|ws| match Socket::of(ws) {
            Socket::Sandbox(other) => {
                other.conn != closed.conn && generation(&other).as_deref() == Some(link)
            }
            _ => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// What the socket is, as a comparable string.
    fn kind(s: Socket) -> String {
        match s {
            Socket::Person(p) => format!("person {} {} {:?}", p.client, p.conn, p.identity),
            Socket::Sandbox(s) => format!("sandbox {:?} {}", s.link, s.conn),
            Socket::Unknown => "unknown".into(),
        }
    }

    /// The two-pass read `Socket::of` did before (person's attachment, else the sandbox's).
    fn two_reads(v: &Value) -> Socket {
        if let Ok(person) = serde_json::from_value::<Attachment>(v.clone()) {
            return Socket::Person(person);
        }
        match serde_json::from_value::<SandboxAttachment>(v.clone()) {
            Ok(sandbox) => Socket::Sandbox(sandbox),
            _ => Socket::Unknown,
        }
    }

    /// The one-pass read, falling back to the two reads when it fails (as `Socket::of` does).
    fn one_read(v: &Value) -> Socket {
        match serde_json::from_value::<AnyAttachment>(v.clone()) {
            Ok(any) => any.socket(),
            Err(_) => two_reads(v),
        }
    }

    #[test]
    fn one_read_decides_as_the_two_reads_did() {
        let ada = json!({"user": "usr_ada", "name": "Ada"});
        let cases = [
            json!({"client": "c1", "conn": "ab12", "identity": ada}),
            json!({"client": "c1", "conn": "ab12", "identity": {"user": "u", "name": "U", "email": "u@x"}}),
            json!({"link": "hash", "conn": "cd34"}),
            json!({"conn": "cd34"}),
            json!({"link": null, "conn": "cd34"}),
            // Partial or odd attachments: whatever the two reads made of them.
            json!({"client": "c1", "conn": "ab12"}),
            json!({"client": "c1", "identity": ada}),
            json!({"identity": ada, "conn": "ab12"}),
            json!({"client": null, "conn": "ab12", "identity": ada}),
            json!({"client": "c1", "conn": "ab12", "identity": {"user": "u"}}),
            json!({"client": "c1", "conn": "ab12", "identity": ada, "link": 7}),
            json!({"link": 7, "conn": "cd34"}),
            json!({"conn": 5}),
            json!({"sandbox": true}),
            json!({}),
        ];
        for case in cases {
            assert_eq!(kind(one_read(&case)), kind(two_reads(&case)), "{case}");
        }
        let person = json!({"client": "c1", "conn": "ab12", "identity": ada});
        assert!(kind(one_read(&person)).starts_with("person c1 ab12"));
        let sandbox = json!({"link": "hash", "conn": "cd34"});
        assert_eq!(kind(one_read(&sandbox)), "sandbox Some(\"hash\") cd34");
    }
}
