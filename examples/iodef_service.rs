//! An IODEF Service (Publisher) per RFC 8600 §6, Figure 2: it connects to the
//! controller as a platform, creates its topic (`incidents`, pubsub#type
//! `urn:ietf:params:xml:ns:iodef-2.0`) if missing, and publishes sample IODEF 2.0
//! incident reports (RFC 7970).
//!
//! ```sh
//! echo secret | cargo run --example iodef_service -- --jid platform1@grid.test \
//!     --password-stdin --server 127.0.0.1:15222 --ca /tmp/peer-prosody.*/tls/ca.pem --count 3
//! # The documents alone, to check them against the RFC 7970 schema:
//! cargo run --example iodef_service -- --jid sensor1@localhost --out-dir /tmp/iodef
//! xmllint --nonet --noout --schema shared/data/iodef/schema/iodef-2.0.xsd /tmp/iodef/*.xml
//! ```
//! Pair it with `examples/iodef_client.rs`, which finds the topic by its type.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use xmpp_grid::client::cli::ConnectArgs;
use xmpp_grid::client::doc::{parse_document, strip_indentation};
use xmpp_grid::client::NodeConfig;
use xmpp_grid::config::Config;

/// RFC 7970 namespace, which is also the topic's pubsub#type (RFC 8600 §5).
const IODEF_NS: &str = "urn:ietf:params:xml:ns:iodef-2.0";

#[derive(Parser, Debug)]
#[command(about = "XMPP-Grid IODEF service: create the incidents topic and publish IODEF 2.0 reports")]
struct Args {
    /// Grid configuration (for the default CA, server and broker); default: built-in.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Topic to publish to.
    #[arg(long, default_value = "incidents")]
    topic: String,
    /// Number of incidents to publish.
    #[arg(long, default_value_t = 3)]
    count: usize,
    /// Pause between two incidents, in milliseconds.
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    /// pubsub#access_model for a newly created topic (default: the broker's).
    #[arg(long)]
    access_model: Option<String>,
    /// Write the incidents as files into this directory instead of publishing them.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    xmpp_grid::init_logging();
    let args = Args::parse();
    let reporter = args.connect.jid.clone();
    let docs: Vec<String> = (0..args.count).map(|i| incident(&reporter, i)).collect();

    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        for (i, d) in docs.iter().enumerate() {
            let path = dir.join(format!("incident-{}.xml", i + 1));
            std::fs::write(&path, d).with_context(|| format!("write {}", path.display()))?;
            println!("{}", path.display());
        }
        return Ok(());
    }

    let cfg = Config::load(args.config.as_deref())?;
    let broker = args.connect.broker_jid(&cfg)?;
    let mut client = args.connect.connect(&cfg, false).await?;

    // Figure 2, "Create IODEF as a Topic": the type tells subscribers what it carries.
    let config = NodeConfig {
        pubsub_type: Some(IODEF_NS.into()),
        title: Some("IODEF incident reports".into()),
        description: Some("Security incidents in IODEF 2.0 (RFC 7970)".into()),
        access_model: args.access_model.clone(),
        extra: Vec::new(),
    };
    let created = client.ensure_topic(&broker, &args.topic, &config).await.context("create topic")?;
    if created {
        eprintln!("created topic {} on {broker}", args.topic);
    } else {
        let info = client.topic_info(&broker, &args.topic).await?;
        if info.pubsub_type.as_deref() != Some(IODEF_NS) {
            eprintln!(
                "warning: topic {} exists with pubsub#type {:?}; subscribers looking for IODEF will not find it",
                args.topic, info.pubsub_type
            );
        }
    }

    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
        let mut payload = parse_document(d)?;
        // The file form is indented for people; the wire form need not be.
        strip_indentation(&mut payload);
        let id = client.publish(&broker, &args.topic, payload, None).await.context("publish")?;
        println!("published incident {} as item {}", i + 1, id.as_deref().unwrap_or("-"));
    }
    client.close().await?;
    Ok(())
}

/// One IODEF 2.0 report (RFC 7970 §3): an SSH brute-force attempt, with the
/// required IncidentID, GenerationTime and Contact, valid against the RFC's schema.
fn incident(reporter: &str, i: usize) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let t = rfc3339(now);
    let detected = rfc3339(now.saturating_sub(60));
    let src = format!("192.0.2.{}", 10 + i % 200);
    let id = format!("INC-{now}-{}", i + 1);
    let domain = reporter.rsplit_once('@').map(|(_, d)| d).unwrap_or(reporter);
    let domain = domain.split('/').next().unwrap_or(domain);
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<IODEF-Document version="2.00" xml:lang="en" xmlns="{IODEF_NS}">
  <Incident purpose="reporting" restriction="green">
    <IncidentID name="{domain}">{id}</IncidentID>
    <DetectTime>{detected}</DetectTime>
    <GenerationTime>{t}</GenerationTime>
    <Description>SSH brute-force attempts from {src} against 198.51.100.5</Description>
    <Assessment>
      <SystemImpact severity="medium" completion="failed" type="takeover-account"/>
    </Assessment>
    <Method>
      <Description>Repeated failed SSH logins</Description>
    </Method>
    <Contact type="organization" role="creator">
      <ContactName>XMPP-Grid sample sensor</ContactName>
      <Email><EmailTo>soc@{domain}</EmailTo></Email>
    </Contact>
    <EventData>
      <Flow>
        <System category="source">
          <Node><Address category="ipv4-addr">{src}</Address></Node>
        </System>
        <System category="target">
          <Node><Address category="ipv4-addr">198.51.100.5</Address></Node>
          <Service ip-protocol="6"><Port>22</Port></Service>
        </System>
      </Flow>
    </EventData>
  </Incident>
</IODEF-Document>
"#
    )
}

/// Seconds since the epoch as an RFC 3339 UTC date-time (the civil-from-days algorithm
/// of H. Hinnant), to avoid a date crate for one timestamp.
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_714_557_600), "2024-05-01T10:00:00Z");
    }

    #[test]
    fn incidents_parse_as_iodef_payloads() {
        let e = parse_document(&incident("sensor1@grid.test/r", 0)).unwrap_or_else(|e| panic!("{e}"));
        assert!(e.is("IODEF-Document", IODEF_NS));
    }
}
