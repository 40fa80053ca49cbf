//! What follows a decision: denials are audited, and a honeytoken hit raises
//! an alert (RFC 8600 §8.3.2): an audit record, an IODEF incident on the
//! grid's own alerts topic, and, when configured, the platform disabled at once.
//!
//! [`Audited`] wraps the real authorizer; it never blocks (alerts go to a
//! task through a bounded channel).

use crate::audit::{self, AuditSink, Kind};
use crate::authz::{Action, Authorize, Decision, Request};
use tokio::sync::mpsc;

/// A honeytoken hit, for the alert task.
#[derive(Debug, Clone)]
pub struct Alert {
    pub platform: String,
    pub action: &'static str,
    pub topic: String,
    pub source: String,
    pub policies: Vec<String>,
}

/// The authorizer the controller uses: decides through `inner`, then audits.
pub struct Audited<A> {
    pub inner: A,
    pub audit: AuditSink,
    pub alerts: mpsc::Sender<Alert>,
}

impl<A: std::ops::Deref<Target = T> + Send + Sync, T: Authorize + ?Sized> Authorize for Audited<A> {
    fn authorize(&self, r: &Request<'_>) -> Decision {
        let d = self.inner.authorize(r);
        // Hidden topics in a listing are not denials of a request: not audited.
        if !d.allowed && r.action != Action::Discover {
            let mut f = audit::fields([
                ("action", r.action.name().to_string()),
                ("source", r.context.source.to_string()),
                ("policies", d.reasons.join(",")),
            ]);
            if let Some(t) = &r.topic {
                f.insert("topic".into(), t.name.to_string());
            }
            self.audit.record(if d.honeytoken { Kind::HoneytokenAlert } else { Kind::Denial }, r.principal.to_string(), f);
        }
        if d.honeytoken {
            let alert = Alert {
                platform: r.principal.to_string(),
                action: r.action.name(),
                topic: r.topic.map(|t| t.name.to_string()).unwrap_or_default(),
                source: r.context.source.to_string(),
                policies: d.reasons.clone(),
            };
            if self.alerts.try_send(alert).is_err() {
                tracing::error!("alert queue full: a honeytoken alert was not published (it is audited)");
            }
        }
        d
    }
}

/// A valid IODEF 2.0 document (RFC 7970) reporting a honeytoken hit.
pub fn iodef(a: &Alert, domain: &str, id: &str, now_ms: u64) -> String {
    let esc = |s: &str| quick_xml::escape::escape(s).into_owned();
    format!(
        "<IODEF-Document xmlns='urn:ietf:params:xml:ns:iodef-2.0' version='2.00' xml:lang='en'>\
<Incident purpose='reporting' restriction='private'>\
<IncidentID name='{domain}'>{id}</IncidentID>\
<GenerationTime>{time}</GenerationTime>\
<Description>Honeytoken topic {topic} touched: {action} by {platform} from {source} (policies {policies})</Description>\
<Contact role='creator' type='organization'><ContactName>xmpp-grid controller {domain}</ContactName></Contact>\
</Incident></IODEF-Document>",
        domain = esc(domain),
        id = esc(id),
        time = crate::pubsub::protocol::xep0082(now_ms, false),
        topic = esc(&a.topic),
        action = a.action,
        platform = esc(&a.platform),
        source = esc(&a.source),
        policies = esc(&a.policies.join(",")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alert_document_is_valid_iodef_2() {
        let a = Alert {
            platform: "p<1>@grid.test".into(),
            action: "subscribe",
            topic: "domain-admin-credentials".into(),
            source: "127.0.0.1".into(),
            policies: vec!["honeytoken-trap".into()],
        };
        let doc = iodef(&a, "grid.test", "alert-1", 1_764_000_000_000);
        let schema = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/iodef/schema/iodef-2.0.xsd");
        if !schema.exists() || std::process::Command::new("xmllint").arg("--version").output().is_err() {
            panic!("needs xmllint (libxml2-utils) and ../shared/data/iodef/schema");
        }
        let file = std::env::temp_dir().join(format!("xg-alert-{}.xml", std::process::id()));
        std::fs::write(&file, &doc).unwrap();
        let out = std::process::Command::new("xmllint").args(["--noout", "--nonet", "--schema"]).arg(&schema).arg(&file).output().unwrap();
        std::fs::remove_file(&file).ok();
        assert!(out.status.success(), "{doc}\n{}", String::from_utf8_lossy(&out.stderr));
    }
}
