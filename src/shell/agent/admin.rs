//! The admin socket: a unix stream socket (mode 0600) where `mirrorctl` (and scripts)
//! send one JSON object per line and get one JSON object per line back.
//!
//! Requests (`"command"` selects the kind):
//!
//! ```text
//! {"command":"status"}
//! {"command":"activate","mirror":"db"}              {"command":"activate","mirror":"db","forced":true}
//! {"command":"deactivate","mirror":"db"}
//! {"command":"rebuild-full","mirror":"db","from":"alpha"}
//! {"command":"rebuild-pause","mirror":"db"}          {"command":"rebuild-resume","mirror":"db"}
//! {"command":"forced-permit","mirror":"db"}
//! {"command":"resolve-discard-local","mirror":"db"}
//! {"command":"break","mirror":"db"}
//! {"command":"rebuild","mirror":"db"}                 (lift a break; copy what is dirty)
//! {"command":"verify","mirror":"db"}
//! ```
//!
//! Commands that change state are logged with who asked: the uid (and user name, from
//! /etc/passwd) and pid of the client process, from the socket's peer credentials
//! (SO_PEERCRED), or "unknown" if the kernel does not give them.
//!
//! Responses: `{"ok":true,"message":"..."}` (status adds `"status":{...}`, see
//! `status::NodeStatus`) or `{"ok":false,"error":"..."}`. Activate and deactivate answer
//! once the new role is durable. The protocol is parsed by pure functions (tested
//! below); the server and the blocking client used by `mirrorctl` are thin.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use crate::shell::agent::status::NodeStatus;
use crate::shell::agent::{ADMIN_CONNECTIONS_MAX, ADMIN_REQUEST_BYTES_MAX, Agent};

/// One admin request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// A struct variant (not a unit one) so that unknown fields are refused too.
    Status {},
    Activate {
        mirror: String,
        /// forced-permit: activate a disk whose up-to-dateness cannot be proven.
        #[serde(default)]
        forced: bool,
    },
    Deactivate {
        mirror: String,
    },
    /// Copy everything from `from` (which must be the node receiving the request).
    RebuildFull {
        mirror: String,
        from: String,
    },
    RebuildPause {
        mirror: String,
    },
    RebuildResume {
        mirror: String,
    },
    /// Make this side writable although it cannot be proven up to date (a new
    /// generation marked forced). `activate` with `forced` does the same.
    ForcedPermit {
        mirror: String,
    },
    /// After a split brain: this side gives up its changes at the next connect.
    ResolveDiscardLocal {
        mirror: String,
    },
    /// Close the replication link and stop dialling/accepting until `rebuild`.
    Break {
        mirror: String,
    },
    /// Lift a break (reconnect: the normal connect path resyncs differentially); when
    /// connected with dirty regions (after a verify), copy them to the peer.
    Rebuild {
        mirror: String,
    },
    /// Compare both sides region by region (hashes only cross the wire).
    Verify {
        mirror: String,
    },
}

/// Who sent an admin request: the client process's credentials (SO_PEERCRED).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    pub user: Option<String>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.uid, &self.user) {
            (None, _) => write!(f, "unknown")?,
            (Some(uid), Some(user)) => write!(f, "{user} (uid {uid}")?,
            (Some(uid), None) => write!(f, "uid {uid} (no user name")?,
        }
        if self.uid.is_some() {
            match self.pid {
                Some(pid) => write!(f, ", pid {pid})")?,
                None => write!(f, ")")?,
            }
        }
        Ok(())
    }
}

impl Caller {
    fn of(stream: &tokio::net::UnixStream) -> Caller {
        match stream.peer_cred() {
            Ok(cred) => Caller {
                uid: Some(cred.uid()),
                pid: cred.pid(),
                user: user_name(cred.uid()),
            },
            Err(_) => Caller::default(),
        }
    }
}

/// The user name of `uid` from /etc/passwd (no NSS lookup: it could block the agent's
/// only thread on a network directory).
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    user_name_in(&passwd, uid)
}

fn user_name_in(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let id: u32 = fields.next()?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_string())
    })
}

/// Now as UTC text (RFC 3339, seconds), for "who did what when" log lines and status.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_text(secs)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
pub fn utc_text(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rest = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// One admin response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
}

impl Response {
    pub fn ok(message: String) -> Response {
        Response {
            ok: true,
            message: Some(message),
            error: None,
            status: None,
        }
    }

    pub fn error(error: String) -> Response {
        Response {
            ok: false,
            message: None,
            error: Some(error),
            status: None,
        }
    }

    fn from_result(result: Result<String, String>) -> Response {
        match result {
            Ok(message) => Response::ok(message),
            Err(error) => Response::error(error),
        }
    }
}

/// Parses one request line. The error says what was wrong, for the client.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let line = line.trim();
    if line.is_empty() {
        return Err("empty request".into());
    }
    serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
}

/// Encodes a request or response as one line (no embedded newline: JSON escapes them).
pub fn to_line<T: Serialize>(value: &T) -> String {
    let mut line = serde_json::to_string(value).expect("admin messages serialise");
    line.push('\n');
    line
}

/// Serves the admin socket for the agent.
#[derive(Debug)]
pub struct AdminServer {
    agent: Rc<Agent>,
}

impl AdminServer {
    pub fn new(agent: Rc<Agent>) -> AdminServer {
        AdminServer { agent }
    }

    /// Serves until the task is aborted. While the agent stops, status keeps working
    /// and every other request is refused.
    pub async fn serve(self, listener: std::os::unix::net::UnixListener) {
        let listener = match UnixListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                warn!(%error, "admin socket unusable");
                return;
            }
        };
        let server = Rc::new(self);
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        if connections.len() >= ADMIN_CONNECTIONS_MAX {
                            debug!("too many admin connections; closing one");
                            continue;
                        }
                        connections.spawn_local(server.clone().connection(stream));
                    }
                    Err(error) => warn!(%error, "admin accept failed"),
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }

    async fn connection(self: Rc<Self>, mut stream: tokio::net::UnixStream) {
        let caller = Caller::of(&stream);
        let mut input: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(end) = input.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = input.drain(..=end).collect();
                let response = match std::str::from_utf8(&line) {
                    Ok(text) => match parse_request(text) {
                        Ok(request) => self.handle(request, &caller).await,
                        Err(error) => Response::error(error),
                    },
                    Err(_) => Response::error("bad request: not UTF-8".into()),
                };
                if stream
                    .write_all(to_line(&response).as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if input.len() > ADMIN_REQUEST_BYTES_MAX {
                let response = Response::error(format!(
                    "request longer than {ADMIN_REQUEST_BYTES_MAX} bytes"
                ));
                let _ = stream.write_all(to_line(&response).as_bytes()).await;
                return;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => input.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn handle(&self, request: Request, caller: &Caller) -> Response {
        let agent = &self.agent;
        if !matches!(request, Request::Status {}) {
            info!(?request, by = %caller, "admin request");
            if *agent.stopping.borrow() {
                return Response::error("the agent is shutting down".into());
            }
        }
        match request {
            Request::Status {} => {
                let mut response = Response::ok("status".into());
                response.status = Some(NodeStatus {
                    node: agent.node_name.clone(),
                    node_id: agent.node_id,
                    peer: agent.peer_name.clone(),
                    pid: std::process::id(),
                    uptime_ms: agent.clock.now_ms(),
                    mirrors: agent.mirrors.iter().map(|m| m.status()).collect(),
                });
                response
            }
            Request::Activate {
                mirror,
                forced: false,
            } => match agent.mirror(&mirror) {
                Ok(m) => Response::from_result(m.activate(false).await),
                Err(error) => Response::error(error),
            },
            Request::Activate {
                mirror,
                forced: true,
            }
            | Request::ForcedPermit { mirror } => match agent.mirror(&mirror) {
                Ok(m) => Response::from_result(m.forced_permit(caller).await),
                Err(error) => Response::error(error),
            },
            Request::ResolveDiscardLocal { mirror } => match agent.mirror(&mirror) {
                Ok(m) => Response::from_result(m.resolve_discard_local(caller)),
                Err(error) => Response::error(error),
            },
            Request::Break { mirror } => match agent.mirror(&mirror) {
                Ok(m) => Response::from_result(m.break_link(caller)),
                Err(error) => Response::error(error),
            },
            Request::Rebuild { mirror } => match agent.mirror(&mirror) {
                Ok(m) => Response::from_result(m.rebuild(caller)),
                Err(error) => Response::error(error),
            },
            Request::Verify { mirror } => match agent.mirror(&mirror) {
                Ok(m) => Response::from_result(m.verify(caller)),
                Err(error) => Response::error(error),
            },
            Request::Deactivate { mirror } => match agent.mirror(&mirror) {
                Ok(m) => Response::from_result(m.deactivate().await),
                Err(error) => Response::error(error),
            },
            Request::RebuildFull { mirror, from } => {
                if from != agent.node_name {
                    return Response::error(format!(
                        "this is node {}; a full rebuild is started on its source: run `mirrorctl rebuild {mirror} --full --from {from}` against {from}'s agent",
                        agent.node_name
                    ));
                }
                match agent.mirror(&mirror) {
                    Ok(m) => Response::from_result(m.rebuild_full()),
                    Err(error) => Response::error(error),
                }
            }
            Request::RebuildPause { mirror } => match agent.mirror(&mirror) {
                Ok(m) => Response::from_result(m.set_resync_paused(true)),
                Err(error) => Response::error(error),
            },
            Request::RebuildResume { mirror } => match agent.mirror(&mirror) {
                Ok(m) => Response::from_result(m.set_resync_paused(false)),
                Err(error) => Response::error(error),
            },
        }
    }
}

/// Sends one request to the agent listening on `socket` and waits (at most `timeout`)
/// for its answer. Used by `mirrorctl`.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the agent at {}: {e} (is `mirrordisk agent` running on this node?)",
            socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(to_line(request).as_bytes())
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("{}: no answer from the agent: {e}", socket.display()))?;
    if line.is_empty() {
        return Err(format!(
            "{}: the agent closed the connection",
            socket.display()
        ));
    }
    serde_json::from_str(&line).map_err(|e| format!("{}: bad answer: {e}", socket.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_round_trips() {
        let requests = [
            Request::Status {},
            Request::Activate {
                mirror: "db".into(),
                forced: true,
            },
            Request::Deactivate {
                mirror: "db".into(),
            },
            Request::RebuildFull {
                mirror: "db".into(),
                from: "alpha".into(),
            },
            Request::RebuildPause {
                mirror: "db".into(),
            },
            Request::RebuildResume {
                mirror: "db".into(),
            },
            Request::ForcedPermit {
                mirror: "db".into(),
            },
            Request::ResolveDiscardLocal {
                mirror: "db".into(),
            },
            Request::Break {
                mirror: "db".into(),
            },
            Request::Rebuild {
                mirror: "db".into(),
            },
            Request::Verify {
                mirror: "db".into(),
            },
        ];
        for request in requests {
            let line = to_line(&request);
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            assert_eq!(parse_request(&line).unwrap(), request);
        }
    }

    #[test]
    fn the_wire_form_is_stable() {
        assert_eq!(
            parse_request(r#"{"command":"activate","mirror":"db"}"#).unwrap(),
            Request::Activate {
                mirror: "db".into(),
                forced: false
            }
        );
        assert_eq!(to_line(&Request::Status {}), "{\"command\":\"status\"}\n");
        assert_eq!(
            to_line(&Request::RebuildFull {
                mirror: "db".into(),
                from: "a".into()
            }),
            "{\"command\":\"rebuild-full\",\"mirror\":\"db\",\"from\":\"a\"}\n"
        );
    }

    #[test]
    fn new_commands_have_stable_names() {
        assert_eq!(
            to_line(&Request::ForcedPermit {
                mirror: "db".into()
            }),
            "{\"command\":\"forced-permit\",\"mirror\":\"db\"}\n"
        );
        assert_eq!(
            parse_request(r#"{"command":"resolve-discard-local","mirror":"db"}"#).unwrap(),
            Request::ResolveDiscardLocal {
                mirror: "db".into()
            }
        );
        assert_eq!(
            parse_request(r#"{"command":"break","mirror":"db"}"#).unwrap(),
            Request::Break {
                mirror: "db".into()
            }
        );
        assert_eq!(
            parse_request(r#"{"command":"rebuild","mirror":"db"}"#).unwrap(),
            Request::Rebuild {
                mirror: "db".into()
            }
        );
        assert_eq!(
            parse_request(r#"{"command":"verify","mirror":"db"}"#).unwrap(),
            Request::Verify {
                mirror: "db".into()
            }
        );
    }

    #[test]
    fn callers_read_well() {
        assert_eq!(Caller::default().to_string(), "unknown");
        let root = Caller {
            uid: Some(0),
            pid: Some(42),
            user: Some("root".into()),
        };
        assert_eq!(root.to_string(), "root (uid 0, pid 42)");
        let anon = Caller {
            uid: Some(1234),
            pid: None,
            user: None,
        };
        assert_eq!(anon.to_string(), "uid 1234 (no user name)");
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\nbad line\n";
        assert_eq!(user_name_in(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(user_name_in(passwd, 0).as_deref(), Some("root"));
        assert_eq!(user_name_in(passwd, 7), None);
    }

    #[test]
    fn utc_text_is_rfc3339() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_text(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_text(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc_text(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn bad_requests_are_explained() {
        assert_eq!(parse_request("  \n").unwrap_err(), "empty request");
        let e = parse_request(r#"{"command":"explode"}"#).unwrap_err();
        assert!(e.contains("explode"), "{e}");
        let e = parse_request(r#"{"command":"activate"}"#).unwrap_err();
        assert!(e.contains("mirror"), "{e}");
        let e = parse_request(r#"{"command":"status","extra":1}"#).unwrap_err();
        assert!(e.contains("extra"), "{e}");
        assert!(parse_request("not json").is_err());
    }

    #[test]
    fn responses_round_trip() {
        let line = to_line(&Response::error("no".into()));
        assert_eq!(line, "{\"ok\":false,\"error\":\"no\"}\n");
        let back: Response = serde_json::from_str(&line).unwrap();
        assert!(!back.ok);
        assert_eq!(back.error.as_deref(), Some("no"));
    }
}
