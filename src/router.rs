//! The stanza router (RFC 6120 §8, §10; RFC 6121 §8.5): checks stanza shape, stamps
//! `from`, and hands each stanza to exactly one place: the controller's own
//! handlers (disco, ping), a component such as the broker, or a platform's
//! sessions. Unclaimed requests get `service-unavailable`; errors and results are
//! never answered. It does nothing else: no policy, no storage.

use crate::disco::{self, Identity};
use crate::error::{StanzaError, StreamCondition, StreamError};
use crate::jid::{BareJid, Jid};
use crate::ns;
use crate::session::{SessionHandle, Sessions};
use crate::xml::Element;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// A service at its own address below the domain (the broker at `broker.<domain>`).
pub trait Component: Send + Sync {
    /// Handles a stanza addressed to the component, sent by `session` (its `from`
    /// already stamped). Replies and notifications go out through the sessions.
    fn handle(&self, session: &Arc<SessionHandle>, stanza: Element);

    /// A session became available (initial presence) or unavailable (presence
    /// unavailable, or the session ended). Offline delivery hangs on this.
    fn presence(&self, session: &Arc<SessionHandle>, available: bool);
}

/// XEP-0050 ad-hoc commands at the domain (XEP-0133 service administration).
pub trait Commands: Send + Sync {
    /// Handles an `<iq type='set'><command/></iq>` to the domain; answers the session itself.
    fn execute(&self, session: &Arc<SessionHandle>, iq: Element);
}

/// Routes stanzas of bound sessions.
pub struct Router {
    domain: BareJid,
    sessions: Arc<Sessions>,
    /// Component JIDs known to the grid (listed in disco#items even before they start).
    services: Vec<(BareJid, String)>,
    components: RwLock<HashMap<BareJid, Arc<dyn Component>>>,
    commands: RwLock<Option<Arc<dyn Commands>>>,
}

/// Features the controller itself implements, advertised in disco#info on the domain.
const SERVER_FEATURES: &[&str] = &[ns::DISCO_INFO, ns::DISCO_ITEMS, ns::PING, ns::COMMANDS];

impl Router {
    /// `services`: JID and human name of each service below the domain.
    pub fn new(domain: BareJid, sessions: Arc<Sessions>, services: Vec<(BareJid, String)>) -> Self {
        Router { domain, sessions, services, components: RwLock::new(HashMap::new()), commands: RwLock::new(None) }
    }

    /// Plugs a component in at `jid`.
    pub fn register(&self, jid: BareJid, component: Arc<dyn Component>) {
        self.components.write().unwrap_or_else(|p| p.into_inner()).insert(jid, component);
    }

    /// Plugs in the domain's ad-hoc commands.
    pub fn set_commands(&self, commands: Arc<dyn Commands>) {
        *self.commands.write().unwrap_or_else(|p| p.into_inner()) = Some(commands);
    }

    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    pub fn domain(&self) -> &BareJid {
        &self.domain
    }

    /// Routes one stanza sent by `session`. A returned error ends that stream.
    pub fn route(&self, session: &Arc<SessionHandle>, mut stanza: Element) -> Result<(), StreamError> {
        if stanza.ns != ns::CLIENT || !matches!(stanza.name.as_str(), "message" | "presence" | "iq") {
            return Err(StreamError::with_text(
                StreamCondition::UnsupportedStanzaType,
                format!("<{}/> is not a stanza", stanza.name),
            ));
        }
        // RFC 6120 §8.1.2.1: a `from` other than the session's own JID is refused;
        // otherwise the server stamps the full JID.
        if let Some(claimed) = stanza.attr("from") {
            let ok = match Jid::parse(claimed) {
                Ok(Jid::Full(f)) => f == session.jid,
                Ok(Jid::Bare(b)) => &b == session.jid.bare(),
                Err(_) => false,
            };
            if !ok {
                return Err(StreamError::with_text(StreamCondition::InvalidFrom, "from does not match the session"));
            }
        }
        stanza.set_attr("from", session.jid.to_string());

        let to = match stanza.attr("to").map(Jid::parse) {
            None => None,
            Some(Ok(j)) => Some(j),
            Some(Err(e)) => {
                self.reply_error(session, &stanza, StanzaError::new("jid-malformed").text(e.to_string()));
                return Ok(());
            }
        };
        if stanza.name == "iq" && !self.iq_shape_ok(session, &stanza) {
            return Ok(());
        }
        match to {
            None => self.to_own_account(session, stanza),
            Some(to) if to.bare() == &self.domain => self.to_server(session, stanza),
            Some(to) if to.bare().domain_part() == self.domain.domain_part() && to.bare().local().is_some() => {
                self.to_platform(session, &to, stanza)
            }
            Some(to) => {
                let service = BareJid::domain(to.bare().domain_part()).ok();
                let component = service.as_ref().and_then(|s| {
                    self.components.read().unwrap_or_else(|p| p.into_inner()).get(s).cloned()
                });
                match component {
                    Some(c) => c.handle(session, stanza),
                    None if self.services.iter().any(|(j, _)| Some(j) == service.as_ref()) => {
                        self.reply_error(session, &stanza, StanzaError::new("service-unavailable"))
                    }
                    // No server-to-server federation (yet): other domains are unreachable.
                    None => self.reply_error(session, &stanza, StanzaError::new("remote-server-not-found")),
                }
            }
        }
        Ok(())
    }

    /// RFC 6120 §8.2.3: a type, an id, and exactly one child for get/set.
    fn iq_shape_ok(&self, session: &SessionHandle, iq: &Element) -> bool {
        let ty = iq.attr("type").unwrap_or("");
        let problem = match ty {
            "get" | "set" if iq.elements().count() != 1 => Some("an IQ get or set carries exactly one child element"),
            "get" | "set" | "result" | "error" => None,
            _ => Some("an IQ needs type get, set, result or error"),
        };
        let problem = problem.or_else(|| iq.attr("id").is_none().then_some("an IQ needs an id"));
        match problem {
            None => true,
            Some(text) => {
                if ty != "result" && ty != "error" {
                    self.reply_error(session, iq, StanzaError::new("bad-request").text(text));
                }
                false
            }
        }
    }

    /// Stanzas without `to` are handled on behalf of the sender's own account
    /// (RFC 6120 §10.3.3; presence: RFC 6121 §4.2 broadcast).
    fn to_own_account(&self, session: &Arc<SessionHandle>, stanza: Element) {
        match stanza.name.as_str() {
            "presence" => self.own_presence(session, &stanza),
            "iq" => self.account_iq(session, session.jid.bare(), stanza),
            _ => self.to_platform(session, &Jid::Bare(session.jid.bare().clone()), stanza),
        }
    }

    /// Undirected presence: availability and priority of this session, shown to the
    /// platform's other sessions. Platforms have no rosters, so it goes no further.
    fn own_presence(&self, session: &Arc<SessionHandle>, p: &Element) {
        let available = match p.attr("type") {
            None => true,
            Some("unavailable") => false,
            _ => return, // subscription management: no rosters on a grid
        };
        let priority = p
            .child("priority", ns::CLIENT)
            .and_then(|e| e.text().trim().parse::<i8>().ok())
            .unwrap_or(0);
        let was = session.is_available();
        session.set_presence(available, priority.into());
        if was != available {
            self.tell_components(session, available);
        }
        let bytes = Bytes::from(p.to_bytes(ns::CLIENT));
        for s in self.sessions.of(session.jid.bare()) {
            if s.id != session.id && s.is_available() {
                let _ = s.deliver(bytes.clone());
            }
        }
    }

    /// IQs to a bare platform JID are answered by the server for the account.
    fn account_iq(&self, session: &SessionHandle, account: &BareJid, iq: Element) {
        if iq.attr("type") == Some("result") || iq.attr("type") == Some("error") {
            return;
        }
        let Some(child) = iq.elements().next() else { return };
        let reply = match (iq.attr("type"), child.ns.as_str(), child.name.as_str()) {
            (Some("get"), ns::PING, "ping") => Some(None),
            // RFC 3921 session establishment, sent without `to` by old clients.
            (Some("set"), ns::SESSION, "session") if account == session.jid.bare() => Some(None),
            (Some("get"), ns::DISCO_INFO, "query") if child.attr("node").is_none() => Some(Some(disco::info(
                None,
                &[Identity { category: "account", kind: "registered", name: account.to_string() }],
                &[ns::DISCO_INFO],
            ))),
            _ => None,
        };
        match reply {
            Some(payload) => self.reply_result(session, &iq, &account.to_string(), payload),
            None => self.reply_error(session, &iq, StanzaError::new("service-unavailable")),
        }
    }

    /// Stanzas to the domain itself: the controller's own services.
    fn to_server(&self, session: &Arc<SessionHandle>, stanza: Element) {
        if stanza.name != "iq" || matches!(stanza.attr("type"), Some("result") | Some("error")) {
            return; // messages and presence to the server are not processed
        }
        let Some(child) = stanza.elements().next() else { return };
        if child.ns == ns::COMMANDS && child.name == "command" && stanza.attr("type") == Some("set") {
            let commands = self.commands.read().unwrap_or_else(|p| p.into_inner()).clone();
            match commands {
                Some(c) => c.execute(session, stanza),
                None => self.reply_error(session, &stanza, StanzaError::new("service-unavailable")),
            }
            return;
        }
        let node = child.attr("node");
        let payload = match (stanza.attr("type"), child.ns.as_str(), child.name.as_str()) {
            (Some("get"), ns::PING, "ping") => Some(None),
            (Some("get"), ns::DISCO_INFO, "query") if node.is_none() => Some(Some(disco::info(
                None,
                &[Identity { category: "server", kind: "im", name: "xmpp-grid controller".into() }],
                SERVER_FEATURES,
            ))),
            (Some("get"), ns::DISCO_ITEMS, "query") if node.is_none() => {
                let list: Vec<(String, String)> =
                    self.services.iter().map(|(j, n)| (j.to_string(), n.clone())).collect();
                Some(Some(disco::items(None, &list)))
            }
            // RFC 3921 session establishment: a no-op kept for old clients (RFC 6121 App. E).
            (Some("set"), ns::SESSION, "session") => Some(None),
            _ => None,
        };
        match payload {
            Some(p) => self.reply_result(session, &stanza, &self.domain.to_string(), p),
            None => self.reply_error(session, &stanza, StanzaError::new("service-unavailable")),
        }
    }

    /// Direct platform-to-platform traffic (the spec's Figure 1 flow "C").
    fn to_platform(&self, session: &SessionHandle, to: &Jid, stanza: Element) {
        let ty = stanza.attr("type").unwrap_or("");
        if let Jid::Full(full) = to {
            if let Some(target) = self.sessions.get(full) {
                let _ = target.deliver(Bytes::from(stanza.to_bytes(ns::CLIENT)));
                return;
            }
            // RFC 6121 §8.5.3.2: no such resource.
            match stanza.name.as_str() {
                "iq" => self.reply_error(session, &stanza, StanzaError::new("service-unavailable")),
                "message" if ty == "normal" || ty == "chat" || ty.is_empty() => {
                    self.to_platform(session, &Jid::Bare(full.bare().clone()), stanza)
                }
                _ => {}
            }
            return;
        }
        let bare = to.bare();
        match stanza.name.as_str() {
            "iq" => self.account_iq(session, bare, stanza),
            "presence" => {
                // Directed presence (RFC 6121 §4.6) to every available session.
                if matches!(ty, "" | "unavailable") {
                    let bytes = Bytes::from(stanza.to_bytes(ns::CLIENT));
                    for s in self.sessions.of(bare).iter().filter(|s| s.is_available()) {
                        let _ = s.deliver(bytes.clone());
                    }
                }
            }
            _ => {
                // RFC 6121 §8.5.2.1: to every available resource with non-negative
                // priority. Direct messages are not stored offline (the broker's items
                // are); an undeliverable normal or chat message is bounced.
                let targets: Vec<_> = self
                    .sessions
                    .of(bare)
                    .into_iter()
                    .filter(|s| s.is_available() && s.priority() >= 0)
                    .collect();
                if ty == "error" {
                    if let Some(t) = targets.first() {
                        let _ = t.deliver(Bytes::from(stanza.to_bytes(ns::CLIENT)));
                    }
                    return;
                }
                if targets.is_empty() || ty == "groupchat" {
                    if ty != "headline" {
                        self.reply_error(session, &stanza, StanzaError::new("service-unavailable"));
                    }
                    return;
                }
                let bytes = Bytes::from(stanza.to_bytes(ns::CLIENT));
                for t in targets {
                    let _ = t.deliver(bytes.clone());
                }
            }
        }
    }

    /// Sends an IQ result for `iq` from `from`.
    fn reply_result(&self, session: &SessionHandle, iq: &Element, from: &str, payload: Option<Element>) {
        let mut r = Element::new("iq", ns::CLIENT).with_attr("type", "result").with_attr("from", from);
        r.set_attr("to", session.jid.to_string());
        if let Some(id) = iq.attr("id") {
            r.set_attr("id", id);
        }
        if let Some(p) = payload {
            r.push(p);
        }
        let _ = session.deliver(Bytes::from(r.to_bytes(ns::CLIENT)));
    }

    /// Sends the error reply to a stanza (never to an error or a result).
    pub fn reply_error(&self, session: &SessionHandle, stanza: &Element, error: StanzaError) {
        if let Some(r) = error.reply_to(stanza) {
            let _ = session.deliver(Bytes::from(r.to_bytes(ns::CLIENT)));
        }
    }

    /// A session ended: it leaves the registry and components learn it is gone.
    pub fn session_ended(&self, session: &Arc<SessionHandle>) {
        self.sessions.unbind(session);
        if session.is_available() {
            session.set_presence(false, 0);
            self.tell_components(session, false);
        }
    }

    fn tell_components(&self, session: &Arc<SessionHandle>, available: bool) {
        let list: Vec<_> = self.components.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for c in list {
            c.presence(session, available);
        }
    }

    /// Delivers a stanza from a component to a platform's session(s).
    pub fn deliver(&self, to: &Jid, stanza: Bytes) {
        match to {
            Jid::Full(f) => {
                if let Some(s) = self.sessions.get(f) {
                    let _ = s.deliver(stanza);
                }
            }
            Jid::Bare(b) => {
                for s in self.sessions.of(b) {
                    let _ = s.deliver(stanza.clone());
                }
            }
        }
    }
}
