//! An IODEF Client (Subscriber) per RFC 8600 §6, Figure 2: it connects as a platform,
//! discovers the broker's topics (XEP-0030), picks those whose pubsub#type is IODEF
//! 2.0 (all of them, or the one named by --topic), subscribes (XEP-0060) and prints
//! incidents as they arrive.
//!
//! ```sh
//! echo secret | cargo run --example iodef_client -- --jid platform2@grid.test \
//!     --password-stdin --server 127.0.0.1:15222 --ca /tmp/peer-prosody.*/tls/ca.pem --count 3
//! ```
//! Start it before or after `examples/iodef_service.rs` (`--wait-secs` waits for the
//! topic to appear).

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;
use xmpp_grid::client::cli::ConnectArgs;
use xmpp_grid::client::{Client, EventKind};
use xmpp_grid::config::Config;
use xmpp_grid::jid::Jid;
use xmpp_grid::xml::Element;

/// RFC 7970 namespace: the pubsub#type we look for (RFC 8600 §5).
const IODEF_NS: &str = "urn:ietf:params:xml:ns:iodef-2.0";

#[derive(Parser, Debug)]
#[command(about = "XMPP-Grid IODEF client: find the IODEF topic, subscribe, print incidents")]
struct Args {
    /// Grid configuration (for the default CA, server and broker); default: built-in.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Exit after this many incidents (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<usize>,
    /// Keep looking for an IODEF topic this long before giving up.
    #[arg(long, default_value_t = 0)]
    wait_secs: u64,
    /// Also print each incident's full XML.
    #[arg(long)]
    xml: bool,
    /// Only this topic (it must still carry IODEF); default: every IODEF topic.
    #[arg(long)]
    topic: Option<String>,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    xmpp_grid::init_logging();
    let args = Args::parse();
    let cfg = Config::load(args.config.as_deref())?;
    let broker = args.connect.broker_jid(&cfg)?;
    // Presence, so the server delivers notifications for our bare-JID subscription.
    let mut client = args.connect.connect(&cfg, true).await?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait_secs);
    let topics = loop {
        let mut found = find_iodef_topics(&mut client, &broker).await?;
        if let Some(only) = &args.topic {
            found.retain(|t| t == only);
        }
        if !found.is_empty() {
            break found;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("no topic with pubsub#type {IODEF_NS} on {broker}; start the IODEF service first (or use --wait-secs)");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    for topic in &topics {
        let sub = client.subscribe(&broker, topic, None).await.with_context(|| format!("subscribe to {topic}"))?;
        eprintln!("subscribed to {topic} on {broker} ({})", sub.state.as_str());
    }

    let broker_jid = Jid::parse(&broker).ok();
    let mut seen = 0;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    'events: while args.count.is_none_or(|n| seen < n) {
        let ev = tokio::select! {
            ev = client.next_event() => ev?,
            _ = &mut ctrl_c => break,
        };
        let Some(ev) = ev else { bail!("server closed the stream") };
        let from_broker = ev.from.as_deref().and_then(|f| Jid::parse(f).ok()) == broker_jid;
        if !from_broker || !topics.contains(&ev.node) {
            continue;
        }
        let EventKind::Items { items, .. } = ev.kind else { continue };
        for item in items {
            let Some(doc) = item.payload.filter(|p| p.is("IODEF-Document", IODEF_NS)) else { continue };
            let delayed = ev.delay.as_ref().map(|d| format!(" (delayed, sent {})", d.stamp)).unwrap_or_default();
            for inc in doc.elements().filter(|e| e.is("Incident", IODEF_NS)) {
                println!(
                    "[{}] incident {} at {}{delayed}: {}",
                    ev.node,
                    text_of(inc, "IncidentID"),
                    text_of(inc, "GenerationTime"),
                    text_of(inc, "Description")
                );
            }
            if args.xml {
                println!("{}", String::from_utf8_lossy(&doc.to_bytes("")));
            }
            seen += 1;
            if args.count.is_some_and(|n| seen >= n) {
                break 'events;
            }
        }
    }
    client.close().await?;
    Ok(())
}

/// The topics whose disco#info meta-data says they carry IODEF 2.0 (RFC 8600 §5).
async fn find_iodef_topics(client: &mut Client, broker: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for t in client.topics(broker).await.context("discover topics")? {
        let Some(node) = t.node else { continue };
        match client.topic_info(broker, &node).await {
            Ok(info) if info.pubsub_type.as_deref() == Some(IODEF_NS) => out.push(node),
            Ok(_) => {}
            // Topics we may not inspect are simply not ours to use.
            Err(e) => tracing::debug!(%node, error = %e, "disco#info failed"),
        }
    }
    Ok(out)
}

/// Text of the first child `name` (IODEF namespace), or `-`.
fn text_of(e: &Element, name: &str) -> String {
    e.child(name, IODEF_NS).map(|c| c.text().trim().to_owned()).filter(|t| !t.is_empty()).unwrap_or_else(|| "-".into())
}
