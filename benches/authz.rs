//! Decisions per second of the Cedar authorizer: the shipped policies plus
//! generated organisation policies and template links (~200 policies), 10,000
//! platforms, 1,000 topics. Run: `cargo bench --bench authz` (release build).
//! Prints the sliced index (production) against evaluating the whole set.

use std::time::{Duration, Instant};
use xmpp_grid::authz::cedar::{CedarAuthorizer, Scope, DEFAULT_POLICIES};
use xmpp_grid::authz::{Action, Authorize, Context, PlatformFacts, Request, Topic};
use xmpp_grid::jid::BareJid;

const ORGS: usize = 36;
const LINKS: usize = 150;
const PLATFORMS: usize = 10_000;
const TOPICS: usize = 1_000;

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 33) as usize % n
    }
}

fn main() {
    let dir = std::env::temp_dir().join(format!("xg-authz-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in DEFAULT_POLICIES {
        std::fs::write(dir.join(name), text).unwrap();
    }
    // Organisation policies: members of an org read its tagged topics; a third by attribute.
    let mut orgs = String::new();
    for i in 0..ORGS {
        if i % 3 == 0 {
            orgs.push_str(&format!(
                "@id(\"org{i}\")\npermit(principal, action in Grid::Action::\"read\", resource)\n  when {{ principal.org == \"org{i}\" && resource.tags.contains(\"org{i}\") }};\n"
            ));
        } else {
            orgs.push_str(&format!(
                "@id(\"org{i}\")\npermit(principal in Grid::Role::\"org{i}\", action in Grid::Action::\"read\", resource)\n  when {{ resource.tags.contains(\"org{i}\") }};\n"
            ));
        }
    }
    std::fs::write(dir.join("orgs.cedar"), orgs).unwrap();
    let mut topics = String::from(DEFAULT_POLICIES.iter().find(|f| f.0 == "topics.toml").unwrap().1);
    for i in 0..ORGS {
        topics.push_str(&format!("[topics.\"org{i}-*\"]\ntags = [\"org{i}\"]\n"));
    }
    std::fs::write(dir.join("topics.toml"), topics).unwrap();
    let mut links = String::new();
    for i in 0..LINKS {
        let tpl = ["tpl-read", "tpl-publish"][i % 2];
        links.push_str(&format!("[[link]]\ntemplate = \"{tpl}\"\nprincipal = \"p{}\"\ntopic = \"org{}-t{}\"\n", i * 61 % PLATFORMS, i % ORGS, i));
    }
    std::fs::write(dir.join("links.toml"), links).unwrap();

    let mut rng = Rng(0x9E3779B97F4A7C15);
    let roles = ["publisher", "subscriber", "admin"];
    let templates = ["dhcp-server", "ids-sensor", "siem"];
    let platforms: Vec<PlatformFacts> = (0..PLATFORMS)
        .map(|i| {
            let org = rng.below(ORGS);
            let mut r = vec![format!("org{org}")];
            if rng.below(2) == 0 {
                r.push(roles[rng.below(roles.len())].into());
            }
            PlatformFacts {
                name: format!("p{i}"),
                roles: r,
                templates: if rng.below(3) == 0 { vec![templates[rng.below(3)].into()] } else { vec![] },
                read_only: rng.below(10) == 0,
                revoked: false,
                org: format!("org{org}"),
            }
        })
        .collect();

    let t = Instant::now();
    let a = CedarAuthorizer::load(&dir, platforms.clone()).unwrap();
    let load = t.elapsed();
    let report = a.report();
    let t = Instant::now();
    a.reload_policies().unwrap();
    let reload = t.elapsed();
    let t = Instant::now();
    a.set_platforms(platforms.clone());
    let set_platforms = t.elapsed();
    println!("{report}");
    println!("load {:.1} ms, reload {:.1} ms, set_platforms({PLATFORMS}) {:.1} ms", ms(load), ms(reload), ms(set_platforms));

    // Requests: random platform, topic action mix, topic names tagged by org.
    let actions = [Action::Subscribe, Action::Publish, Action::Retrieve, Action::Discover, Action::Create, Action::Configure];
    let iodef = "urn:ietf:params:xml:ns:iodef-2.0";
    let jids: Vec<BareJid> = (0..PLATFORMS).map(|i| BareJid::new(&format!("p{i}"), "grid.test").unwrap()).collect();
    let names: Vec<String> = (0..TOPICS).map(|i| format!("org{}-t{}", i % ORGS, i)).collect();
    let ctx = Context { authn: "SCRAM-SHA-256-PLUS".into(), tls_version: "TLSv1.3", source: "127.0.0.1".parse().unwrap() };
    let reqs: Vec<(usize, Action, usize, usize)> = (0..4096)
        .map(|_| (rng.below(PLATFORMS), actions[rng.below(actions.len())], rng.below(TOPICS), rng.below(PLATFORMS)))
        .collect();
    let run = |scope: Option<Scope>, budget: Duration| {
        let (mut n, mut allowed) = (0usize, 0usize);
        let t = Instant::now();
        while t.elapsed() < budget {
            for &(p, action, topic, owner) in reqs.iter().take(256) {
                let r = Request {
                    principal: &jids[(p + n) % PLATFORMS],
                    action,
                    topic: Some(Topic { name: &names[topic], payload_type: iodef, owner: Some(&jids[owner]) }),
                    context: &ctx,
                };
                allowed += match scope {
                    None => a.authorize(&r).allowed,
                    Some(s) => a.evaluate(&r, s).map(|o| o.allowed).unwrap_or(false),
                } as usize;
                n += 1;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        (n as f64 / secs, secs * 1e6 / n as f64, allowed as f64 / n as f64)
    };
    let (s_rate, s_us, s_allow) = run(None, Duration::from_secs(3));
    let (f_rate, f_us, f_allow) = run(Some(Scope::Full), Duration::from_secs(3));
    println!("sliced index (authorize): {s_rate:>9.0} decisions/s  {s_us:>7.1} µs/decision  ({:.0}% allowed)", s_allow * 100.0);
    println!("whole set (no index):     {f_rate:>9.0} decisions/s  {f_us:>7.1} µs/decision  ({:.0}% allowed)", f_allow * 100.0);
    println!("speed-up: {:.1}x (1 thread)", s_rate / f_rate);
    // Fixed cost per decision: connect, 2 policies apply.
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < Duration::from_secs(1) {
        let r = Request { principal: &jids[n % PLATFORMS], action: Action::Connect, topic: None, context: &ctx };
        std::hint::black_box(a.authorize(&r));
        n += 1;
    }
    println!("connect (2 policies apply): {:.1} µs/decision", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    std::fs::remove_dir_all(&dir).ok();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
