//! Broker protocol tests (XEP-0060 over RFC 6120): literal XML over real TLS
//! against a controller started in-process, one exchange per use case with its
//! main error, then the delivery guarantees of RFC 8600 §6 (notifications,
//! offline delivery, slow consumers, restarts) and the limits of §8.3.4.

mod common;

use common::*;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::io::AsyncReadExt;

const BROKER: &str = "broker.grid.test";
const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const ERRORS: &str = "http://jabber.org/protocol/pubsub#errors";
const EVENT: &str = "<event xmlns='http://jabber.org/protocol/pubsub#event'>";
const RSM: &str = "<set xmlns='http://jabber.org/protocol/rsm'>";
const DELAY: &str = "<delay xmlns='urn:xmpp:delay'";

// ---- a literal-XML client ---------------------------------------------------

/// A logged-in platform reading whole stanzas; stanzas that arrive while it
/// waits for an IQ answer are kept for [`Client::message`].
struct Client {
    c: Tls,
    jid: String,
    held: VecDeque<String>,
    n: u32,
}

/// End of the first complete top-level element in `buf` (or of a stream end tag).
fn stanza_end(buf: &str) -> Option<usize> {
    let b = buf.as_bytes();
    let (mut i, mut depth) = (0usize, 0i32);
    while i < b.len() {
        if b[i] != b'<' {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        let mut quote = None;
        while j < b.len() {
            match (quote, b[j]) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, c @ (b'\'' | b'"')) => quote = Some(c),
                (None, b'>') => break,
                _ => {}
            }
            j += 1;
        }
        if j >= b.len() {
            return None;
        }
        let tag = &buf[i..=j];
        if tag.starts_with("</") {
            depth -= 1;
        } else if !tag.ends_with("/>") && !tag.starts_with("<?") {
            depth += 1;
        }
        if depth <= 0 {
            return Some(j + 1);
        }
        i = j + 1;
    }
    None
}

impl Client {
    async fn login(g: &TestGrid, user: &str, resource: &str) -> Client {
        let (c, jid) = login(g, user, "pw", resource).await;
        Client { c, jid, held: VecDeque::new(), n: 0 }
    }

    /// Logged in and available (initial presence): notifications flow.
    async fn online(g: &TestGrid, user: &str, resource: &str) -> Client {
        let mut c = Client::login(g, user, resource).await;
        c.c.send("<presence/>").await;
        c
    }

    /// The next whole stanza from the wire, or None after `within`.
    async fn try_read(&mut self, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = stanza_end(&self.c.buf) {
                let rest = self.c.buf.split_off(end);
                return Some(std::mem::replace(&mut self.c.buf, rest).trim().to_string());
            }
            let mut b = vec![0u8; 64 * 1024];
            match tokio::time::timeout_at(deadline, self.c.io.read(&mut b)).await {
                Ok(Ok(n)) if n > 0 => self.c.buf.push_str(&String::from_utf8_lossy(&b[..n])),
                _ => return None,
            }
        }
    }

    async fn read(&mut self) -> String {
        match self.try_read(Duration::from_secs(10)).await {
            Some(s) => s,
            None => panic!("{}: nothing arrived; buffer {:?}", self.jid, self.c.buf),
        }
    }

    /// Sends an IQ (with a fresh `id`) and returns the answer to it.
    async fn iq(&mut self, kind: &str, to: &str, body: &str) -> String {
        self.n += 1;
        let id = format!("q{}", self.n);
        self.c.send(&format!("<iq type='{kind}' id='{id}' to='{to}'>{body}</iq>")).await;
        let want = format!("id='{id}'");
        loop {
            let s = self.read().await;
            if s.starts_with("<iq") && s[..s.find('>').unwrap()].contains(&want) {
                assert!(s.contains(&format!("from='{to}'")) && s.contains(&format!("to='{}'", self.jid)), "{s}");
                return s;
            }
            self.held.push_back(s);
        }
    }

    async fn pubsub(&mut self, kind: &str, body: &str) -> String {
        self.iq(kind, BROKER, &format!("<pubsub xmlns='{PUBSUB}'>{body}</pubsub>")).await
    }

    async fn owner(&mut self, kind: &str, body: &str) -> String {
        self.iq(kind, BROKER, &format!("<pubsub xmlns='{PUBSUB}#owner'>{body}</pubsub>")).await
    }

    async fn disco(&mut self, what: &str, inner: &str) -> String {
        self.iq("get", BROKER, &format!("<query xmlns='http://jabber.org/protocol/disco#{what}'{inner}")).await
    }

    /// Creates a topic with a node_config form; asserts success.
    async fn topic(&mut self, node: &str, fields: &[(&str, &str)]) {
        let r = self.pubsub("set", &format!("<create node='{node}'/>{}", config(fields))).await;
        has(&r, &["type='result'", &format!("<pubsub xmlns='{PUBSUB}'><create node='{node}'/></pubsub>")]);
    }

    async fn publish(&mut self, node: &str, id: &str, body: &str) -> String {
        self.pubsub("set", &format!("<publish node='{node}'><item id='{id}'>{}</item></publish>", payload(body))).await
    }

    /// Publishes and asserts the XEP-0060 §7.1.2 result.
    async fn published(&mut self, node: &str, id: &str) {
        let r = self.publish(node, id, id).await;
        has(&r, &["type='result'", &format!("<publish node='{node}'><item id='{id}'/></publish>")]);
    }

    async fn subscribe(&mut self, node: &str, jid: &str) -> String {
        self.pubsub("set", &format!("<subscribe node='{node}' jid='{jid}'/>")).await
    }

    /// The next stanza that is not an IQ answer (held ones first).
    async fn message(&mut self) -> String {
        match self.held.pop_front() {
            Some(m) => m,
            None => self.read().await,
        }
    }

    async fn try_message(&mut self, within: Duration) -> Option<String> {
        match self.held.pop_front() {
            Some(m) => Some(m),
            None => self.try_read(within).await,
        }
    }

    /// Asserts that nothing (more) arrives for a while.
    async fn quiet(&mut self) {
        if let Some(m) = self.try_message(Duration::from_millis(400)).await {
            panic!("{}: unexpected {m}", self.jid);
        }
    }

    /// Ends the stream politely and waits for the server to close it.
    async fn leave(mut self) {
        self.c.send("</stream:stream>").await;
        let _ = self.c.read_to_close().await;
    }
}

fn has(s: &str, parts: &[&str]) {
    for p in parts {
        assert!(s.contains(p), "missing {p:?} in\n{s}");
    }
}

/// Asserts an XMPP error reply of `kind` with a stanza condition and, if given,
/// a `pubsub#errors` condition.
fn error(s: &str, kind: &str, condition: &str, app: Option<&str>) {
    has(s, &["type='error'", &format!("<error type='{kind}'>"), &format!("<{condition} xmlns='{STANZAS}'/>")]);
    match app {
        Some(a) => has(s, &[&format!("<{a} xmlns='{ERRORS}'")]),
        None => assert!(!s.contains(ERRORS), "unexpected application condition in {s}"),
    }
}

fn payload(body: &str) -> String {
    format!("<x xmlns='urn:test'>{body}</x>")
}

fn form(form_type: &str, fields: &[(&str, &str)]) -> String {
    let mut x = format!(
        "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>{form_type}</value></field>"
    );
    for (var, value) in fields {
        x.push_str(&format!("<field var='{var}'><value>{value}</value></field>"));
    }
    x + "</x>"
}

/// A `<configure>` with a node_config form.
fn config(fields: &[(&str, &str)]) -> String {
    format!("<configure>{}</configure>", form("http://jabber.org/protocol/pubsub#node_config", fields))
}

const OPEN: &[(&str, &str)] = &[("pubsub#access_model", "open")];

/// The value of the first `name='…'` attribute in `s`.
fn attr(s: &str, name: &str) -> String {
    let key = format!(" {name}='");
    let at = s.find(&key).unwrap_or_else(|| panic!("no {name} in {s}")) + key.len();
    s[at..at + s[at..].find('\'').unwrap()].to_string()
}

/// Item ids in `s`, in order.
fn item_ids(s: &str) -> Vec<String> {
    s.match_indices("<item id='").map(|(at, _)| attr(&s[at..], "id")).collect()
}

fn ids(prefix: &str, r: std::ops::RangeInclusive<usize>) -> Vec<String> {
    r.map(|i| format!("{prefix}{i}")).collect()
}

/// A grid with the platforms `users`, all with password "pw".
async fn grid(name: &str, users: &[&str], tweak: impl FnOnce(&mut xmpp_grid::config::Config)) -> TestGrid {
    // No alerts topic and no honeytoken bait: these tests count the topics they create.
    let policies = temp_dir(&format!("{name}-policies"));
    xmpp_grid::authz::cedar::install_defaults(&policies).unwrap();
    std::fs::write(policies.join("topics.toml"), "honeytokens = []\n[kinds]\n\"urn:ietf:params:xml:ns:iodef-2.0\" = \"incident\"\n").unwrap();
    let g = start(name, |c| {
        c.policies.alerts_topic = String::new();
        c.policies.dir = policies;
        tweak(c)
    })
    .await;
    for u in users {
        g.add(u, "pw");
    }
    g
}

// ---- discovery --------------------------------------------------------------

#[tokio::test]
async fn broker_disco_info_has_the_service_identity_and_exactly_its_features() {
    let g = grid("ps-disco-info", &["alice"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    let r = a.disco("info", "/>").await;
    has(&r, &["type='result'", "<identity category='pubsub' type='service' name='XMPP-Grid Broker'/>"]);
    let mut got: Vec<String> = r.match_indices("<feature var='").map(|(at, _)| attr(&r[at..], "var")).collect();
    got.sort();
    let mut want: Vec<String> = [
        "access-authorize", "access-open", "access-whitelist", "config-node", "config-node-max", "create-and-configure",
        "create-nodes", "delete-items", "delete-nodes", "instant-nodes", "item-ids", "last-published",
        "manage-subscriptions", "member-affiliation", "meta-data", "modify-affiliations", "outcast-affiliation",
        "persistent-items", "publish", "publish-only-affiliation", "publish-options", "publisher-affiliation",
        "purge-nodes", "retract-items", "retrieve-affiliations", "retrieve-default", "retrieve-items",
        "retrieve-subscriptions", "rsm", "subscribe", "subscription-notifications", "subscription-options",
    ]
    .iter()
    .map(|f| format!("{PUBSUB}#{f}"))
    .chain(
        [PUBSUB, "http://jabber.org/protocol/disco#info", "http://jabber.org/protocol/disco#items", "http://jabber.org/protocol/rsm", "urn:xmpp:delay"]
            .map(String::from),
    )
    .collect();
    want.sort();
    assert_eq!(got, want);
    g.shutdown().await;
}

#[tokio::test]
async fn topic_disco_info_is_a_leaf_with_meta_data_naming_its_payload_type() {
    let g = grid("ps-disco-node", &["alice", "bob"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", &[("pubsub#title", "Incidents"), ("pubsub#type", "urn:ietf:params:xml:ns:iodef-2.0")]).await;
    let mut b = Client::login(&g, "bob", "r").await;
    let r = b.disco("info", " node='incidents'/>").await;
    has(
        &r,
        &[
            "<query xmlns='http://jabber.org/protocol/disco#info' node='incidents'>",
            "<identity category='pubsub' type='leaf' name='Incidents'/>",
            "<x xmlns='jabber:x:data' type='result'>",
            "<field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#meta-data</value></field>",
            "<field var='pubsub#type' type='text-single' label='Payload type'><value>urn:ietf:params:xml:ns:iodef-2.0</value></field>",
            "<field var='pubsub#owner' type='jid-multi' label='Node owners'><value>alice@grid.test</value></field>",
            // The server's default access model (grid.toml: authorize).
            "<field var='pubsub#access_model' type='text-single' label='Access model'><value>authorize</value></field>",
        ],
    );
    let r = b.disco("info", " node='nope'/>").await;
    error(&r, "cancel", "item-not-found", None);
    g.shutdown().await;
}

#[tokio::test]
async fn disco_items_lists_topics_at_the_broker_and_pages_with_rsm() {
    let g = grid("ps-disco-items", &["alice"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    for t in ["t3", "t1", "t5", "t2", "t4"] {
        a.topic(t, &[("pubsub#title", &format!("Topic {t}"))]).await;
    }
    let r = a.disco("items", "/>").await;
    assert_eq!(r.matches("<item ").count(), 5, "{r}");
    has(&r, &["<item jid='broker.grid.test' node='t1' name='Topic t1'/>"]);
    let r = a.disco("items", &format!(">{RSM}<max>2</max></set></query>")).await;
    assert_eq!(r.matches("<item ").count(), 2, "{r}");
    has(&r, &["node='t1'", "node='t2'", &format!("{RSM}<first>t1</first><last>t2</last><count>5</count></set>")]);
    let r = a.disco("items", &format!(">{RSM}<max>2</max><after>t2</after></set></query>")).await;
    has(&r, &["node='t3'", "node='t4'", "<first>t3</first><last>t4</last>"]);
    assert!(!r.contains("node='t5'"), "{r}");
    let r = a.disco("items", &format!(">{RSM}<max>2</max><before/></set></query>")).await;
    has(&r, &["node='t4'", "node='t5'"]);
    let r = a.iq("set", BROKER, "<query xmlns='http://jabber.org/protocol/disco#items'/>").await;
    error(&r, "modify", "bad-request", None);
    g.shutdown().await;
}

// ---- create, configure, delete, purge ----------------------------------------

#[tokio::test]
async fn create_named_instant_and_conflicting_topics() {
    let g = grid("ps-create", &["alice", "bob"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    let r = a.pubsub("set", "<create node='incidents'/>").await;
    has(&r, &["type='result'", &format!("<pubsub xmlns='{PUBSUB}'><create node='incidents'/></pubsub>")]);
    let mut b = Client::login(&g, "bob", "r").await;
    let r = b.pubsub("set", "<create node='incidents'/>").await;
    error(&r, "cancel", "conflict", None);
    // §8.1.1 instant node: the service names it.
    let r = a.pubsub("set", "<create/>").await;
    let name = attr(&r, "node");
    assert!(!name.is_empty() && name != "incidents", "{r}");
    let r = a.disco("info", &format!(" node='{name}'/>")).await;
    has(&r, &["type='result'", "type='leaf'"]);
    g.shutdown().await;
}

#[tokio::test]
async fn create_and_configure_applies_the_form_and_clamps_max_items() {
    let g = grid("ps-create-config", &["alice"], |c| c.broker.max_items_per_topic = 50).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", &[("pubsub#title", "Incidents"), ("pubsub#access_model", "whitelist"), ("pubsub#max_items", "max")]).await;
    let r = a.owner("get", "<configure node='incidents'/>").await;
    has(
        &r,
        &[
            &format!("<pubsub xmlns='{PUBSUB}#owner'><configure node='incidents'><x xmlns='jabber:x:data' type='form'>"),
            "<field var='pubsub#title' type='text-single' label='A friendly name for the node'><value>Incidents</value></field>",
            "<field var='pubsub#access_model' type='list-single' label='Specify the subscriber model'><value>whitelist</value>",
            "<field var='pubsub#max_items' type='text-single' label='Max # of items to persist'><value>50</value></field>",
        ],
    );
    let r = a.pubsub("set", &format!("<create node='bad'/>{}", config(&[("pubsub#max_items", "0")]))).await;
    error(&r, "modify", "not-acceptable", None);
    let r = a.pubsub("set", &format!("<create node='bad'/>{}", config(&[("pubsub#access_model", "roster")]))).await;
    error(&r, "modify", "not-acceptable", Some("unsupported-access-model"));
    let r = a.disco("info", " node='bad'/>").await;
    error(&r, "cancel", "item-not-found", None);
    g.shutdown().await;
}

#[tokio::test]
async fn a_platform_may_create_only_so_many_topics() {
    let g = grid("ps-topic-limit", &["alice", "bob"], |c| c.broker.max_topics_per_platform = 2).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("a1", &[]).await;
    a.topic("a2", &[]).await;
    let r = a.pubsub("set", "<create node='a3'/>").await;
    error(&r, "wait", "policy-violation", None);
    let mut b = Client::login(&g, "bob", "r").await;
    b.topic("b1", &[]).await;
    g.shutdown().await;
}

#[tokio::test]
async fn configuration_is_read_and_changed_by_owners_only() {
    let g = grid("ps-configure", &["alice", "bob"], |_| {}).await;
    let mut a = Client::online(&g, "alice", "r").await;
    a.topic("incidents", OPEN).await;
    let mut b = Client::online(&g, "bob", "r").await;
    let r = b.owner("get", "<configure node='incidents'/>").await;
    error(&r, "auth", "forbidden", None);
    let set = format!("<configure node='incidents'>{}</configure>", form("http://jabber.org/protocol/pubsub#node_config", &[("pubsub#title", "T")]));
    let r = b.owner("set", &set).await;
    error(&r, "auth", "forbidden", None);
    has(&b.subscribe("incidents", "bob@grid.test").await, &["subscription='subscribed'"]);
    let r = a.owner("set", &set).await;
    has(&r, &["type='result'"]);
    assert!(!r.contains("<pubsub"), "{r}");
    has(&a.owner("get", "<configure node='incidents'/>").await, &["<value>T</value>"]);
    // notify_config: subscribers hear of changes.
    let set = format!(
        "<configure node='incidents'>{}</configure>",
        form("http://jabber.org/protocol/pubsub#node_config", &[("pubsub#notify_config", "1")])
    );
    a.owner("set", &set).await;
    has(&b.message().await, &[EVENT, "<configuration node='incidents'/>"]);
    let r = a.owner("get", "<configure node='nope'/>").await;
    error(&r, "cancel", "item-not-found", None);
    g.shutdown().await;
}

#[tokio::test]
async fn default_configuration_is_offered_in_the_owner_namespace() {
    let g = grid("ps-default", &["alice"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    let r = a.owner("get", "<default/>").await;
    has(
        &r,
        &[
            &format!("<pubsub xmlns='{PUBSUB}#owner'><default><x xmlns='jabber:x:data' type='form'>"),
            "<value>http://jabber.org/protocol/pubsub#node_config</value>",
            "<field var='pubsub#access_model' type='list-single' label='Specify the subscriber model'><value>authorize</value>",
        ],
    );
    // §6.4 default *subscription* options are not offered.
    error(&a.pubsub("get", "<default/>").await, "cancel", "feature-not-implemented", Some("unsupported"));
    g.shutdown().await;
}

#[tokio::test]
async fn delete_tells_subscribers_and_ends_their_subscriptions() {
    let g = grid("ps-delete", &["alice", "bob"], |_| {}).await;
    let mut a = Client::online(&g, "alice", "r").await;
    a.topic("incidents", OPEN).await;
    let mut b = Client::online(&g, "bob", "r").await;
    b.subscribe("incidents", "bob@grid.test").await;
    error(&b.owner("set", "<delete node='incidents'/>").await, "auth", "forbidden", None);
    let r = a.owner("set", "<delete node='incidents'/>").await;
    has(&r, &["type='result'"]);
    let m = b.message().await;
    has(&m, &["<message to='bob@grid.test/r' from='broker.grid.test' type='headline'>", EVENT, "<delete node='incidents'/>"]);
    let r = b.pubsub("get", "<subscriptions/>").await;
    has(&r, &[&format!("<pubsub xmlns='{PUBSUB}'><subscriptions/></pubsub>")]);
    error(&a.owner("set", "<delete node='incidents'/>").await, "cancel", "item-not-found", None);
    g.shutdown().await;
}

#[tokio::test]
async fn purge_removes_every_item_and_tells_subscribers() {
    let g = grid("ps-purge", &["alice", "bob"], |_| {}).await;
    let mut a = Client::online(&g, "alice", "r").await;
    a.topic("incidents", OPEN).await;
    a.published("incidents", "i1").await;
    a.published("incidents", "i2").await;
    let mut b = Client::online(&g, "bob", "r").await;
    b.subscribe("incidents", "bob@grid.test").await;
    error(&b.owner("set", "<purge node='incidents'/>").await, "auth", "forbidden", None);
    has(&a.owner("set", "<purge node='incidents'/>").await, &["type='result'"]);
    has(&b.message().await, &[EVENT, "<purge node='incidents'/>"]);
    let r = b.pubsub("get", "<items node='incidents'/>").await;
    has(&r, &[&format!("<pubsub xmlns='{PUBSUB}'><items node='incidents'/></pubsub>")]);
    g.shutdown().await;
}

// ---- publish and retract -----------------------------------------------------

#[tokio::test]
async fn notifications_carry_the_payload_and_the_published_item_id() {
    let g = grid("ps-publish", &["alice", "bob"], |_| {}).await;
    let mut a = Client::online(&g, "alice", "r").await;
    a.topic("incidents", OPEN).await;
    let mut b = Client::online(&g, "bob", "r").await;
    let r = b.subscribe("incidents", "bob@grid.test").await;
    has(&r, &[&format!("<pubsub xmlns='{PUBSUB}'><subscription node='incidents' jid='bob@grid.test' subid='"), "subscription='subscribed'/>"]);
    a.published("incidents", "report-1").await;
    let m = b.message().await;
    has(
        &m,
        &[
            "<message to='bob@grid.test/r' from='broker.grid.test' type='headline'>",
            &format!("{EVENT}<items node='incidents'><item id='report-1' publisher='alice@grid.test'><x xmlns='urn:test'>report-1</x></item></items></event>"),
        ],
    );
    assert!(!m.contains(DELAY), "a live notification is not delayed: {m}");
    // Without an id, the service makes one and the notification keeps it.
    let r = a.pubsub("set", &format!("<publish node='incidents'><item>{}</item></publish>", payload("two"))).await;
    let id = attr(&r[r.find("<item").unwrap()..], "id");
    assert!(!id.is_empty(), "{r}");
    let m = b.message().await;
    has(&m, &[&format!("<item id='{id}' publisher='alice@grid.test'><x xmlns='urn:test'>two</x></item>")]);
    // The payload is kept verbatim, namespaces and escapes included.
    let odd = "<x:report xmlns:x='urn:test:x' a='&lt;&amp;'><x:line>1 &amp; 2</x:line></x:report>";
    a.pubsub("set", &format!("<publish node='incidents'><item id='odd'>{odd}</item></publish>")).await;
    let m = b.message().await;
    let r = b.pubsub("get", "<items node='incidents'><item id='odd'/></items>").await;
    for s in [&m, &r] {
        has(s, &["<item id='odd' publisher='alice@grid.test'>", "urn:test:x", "1 &amp; 2", "x:line"]);
    }
    b.quiet().await;
    g.shutdown().await;
}

#[tokio::test]
async fn republishing_an_item_id_replaces_the_item_and_moves_it_last() {
    let g = grid("ps-republish", &["alice"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", OPEN).await;
    for id in ["a", "b", "c"] {
        a.published("incidents", id).await;
    }
    has(&a.publish("incidents", "a", "a, second version").await, &["<item id='a'/>"]);
    let r = a.pubsub("get", "<items node='incidents'/>").await;
    assert_eq!(item_ids(&r), vec!["b", "c", "a"]);
    has(&r, &["<x xmlns='urn:test'>a, second version</x>"]);
    assert_eq!(r.matches("<item ").count(), 3, "{r}");
    g.shutdown().await;
}

#[tokio::test]
async fn publish_errors_follow_xep_0060() {
    let g = grid("ps-publish-errors", &["alice", "bob"], |c| c.broker.max_payload_bytes = 100).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", &[("pubsub#access_model", "open"), ("pubsub#type", "urn:test")]).await;
    error(&a.publish("nope", "i1", "x").await, "cancel", "item-not-found", None);
    let mut b = Client::login(&g, "bob", "r").await;
    error(&b.publish("incidents", "i1", "x").await, "auth", "forbidden", None);
    error(&a.pubsub("set", "<publish node='incidents'/>").await, "modify", "bad-request", Some("item-required"));
    error(&a.pubsub("set", "<publish node='incidents'><item id='e'/></publish>").await, "modify", "bad-request", Some("payload-required"));
    error(&a.pubsub("set", "<publish><item id='e'/></publish>").await, "modify", "bad-request", Some("nodeid-required"));
    let two = format!("<publish node='incidents'><item id='e'>{}{}</item></publish>", payload("1"), payload("2"));
    error(&a.pubsub("set", &two).await, "modify", "bad-request", Some("invalid-payload"));
    // RFC 8600 §8.3.4: payload size limit (100 bytes here).
    let r = a.publish("incidents", "big", &"x".repeat(100)).await;
    error(&r, "modify", "not-acceptable", Some("payload-too-big"));
    a.published("incidents", "fits").await;
    // §7.1.5 publish-options.
    let po = |fields: &[(&str, &str)]| {
        format!(
            "<publish node='incidents'><item id='po'>{}</item></publish><publish-options>{}</publish-options>",
            payload("po"),
            form("http://jabber.org/protocol/pubsub#publish-options", fields)
        )
    };
    let r = a.pubsub("set", &po(&[("pubsub#access_model", "whitelist")])).await;
    error(&r, "cancel", "conflict", Some("precondition-not-met"));
    let r = a.pubsub("set", &po(&[("pubsub#max_items", "max"), ("pubsub#access_model", "open")])).await;
    error(&r, "cancel", "conflict", Some("precondition-not-met"));
    let r = a.pubsub("set", &po(&[("pubsub#access_model", "open"), ("pubsub#type", "urn:test"), ("pubsub#persist_items", "1")])).await;
    has(&r, &["type='result'", "<item id='po'/>"]);
    assert_eq!(item_ids(&a.pubsub("get", "<items node='incidents'/>").await), vec!["fits", "po"]);
    g.shutdown().await;
}

#[tokio::test]
async fn publish_models_decide_who_may_publish() {
    let g = grid("ps-publish-model", &["alice", "bob", "carol", "mallory"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("subs", &[("pubsub#access_model", "open"), ("pubsub#publish_model", "subscribers")]).await;
    a.topic("anyone", &[("pubsub#access_model", "open"), ("pubsub#publish_model", "open")]).await;
    a.topic("pubs", OPEN).await;
    let mut b = Client::login(&g, "bob", "r").await;
    error(&b.publish("subs", "b1", "x").await, "auth", "forbidden", None);
    b.subscribe("subs", "bob@grid.test").await;
    b.published("subs", "b1").await;
    b.published("anyone", "b2").await;
    // Affiliations (§4.1): publisher and publish-only publish; outcasts never.
    a.owner(
        "set",
        "<affiliations node='pubs'><affiliation jid='bob@grid.test' affiliation='publisher'/>\
         <affiliation jid='carol@grid.test' affiliation='publish-only'/></affiliations>",
    )
    .await;
    b.published("pubs", "b3").await;
    let mut c = Client::login(&g, "carol", "r").await;
    c.published("pubs", "c1").await;
    // Publish-only may not read (§4.1).
    error(&c.pubsub("get", "<items node='pubs'/>").await, "auth", "forbidden", None);
    error(&c.subscribe("pubs", "carol@grid.test").await, "auth", "forbidden", None);
    has(&a.owner("set", "<affiliations node='anyone'><affiliation jid='mallory@grid.test' affiliation='outcast'/></affiliations>").await, &["type='result'"]);
    let mut m = Client::login(&g, "mallory", "r").await;
    error(&m.publish("anyone", "m1", "x").await, "auth", "forbidden", None);
    g.shutdown().await;
}

#[tokio::test]
async fn retract_removes_items_notifies_and_checks_who_asks() {
    let g = grid("ps-retract", &["alice", "bob", "carol"], |_| {}).await;
    let mut a = Client::online(&g, "alice", "r").await;
    a.topic("incidents", &[("pubsub#access_model", "open"), ("pubsub#notify_retract", "0")]).await;
    a.owner("set", "<affiliations node='incidents'><affiliation jid='carol@grid.test' affiliation='publish-only'/></affiliations>").await;
    for id in ["i1", "i2", "i3"] {
        a.published("incidents", id).await;
    }
    let mut c = Client::login(&g, "carol", "r").await;
    c.published("incidents", "c1").await;
    let mut b = Client::online(&g, "bob", "r").await;
    b.subscribe("incidents", "bob@grid.test").await;
    // Not configured to notify, not asked: silent.
    has(&a.pubsub("set", "<retract node='incidents'><item id='i1'/></retract>").await, &["type='result'"]);
    b.quiet().await;
    // Asked (§7.2.2.1).
    has(&a.pubsub("set", "<retract node='incidents' notify='true'><item id='i2'/></retract>").await, &["type='result'"]);
    has(&b.message().await, &[&format!("{EVENT}<items node='incidents'><retract id='i2'/></items></event>")]);
    // Publish-only: its own items only.
    error(&c.pubsub("set", "<retract node='incidents'><item id='i3'/></retract>").await, "auth", "forbidden", None);
    has(&c.pubsub("set", "<retract node='incidents'><item id='c1'/></retract>").await, &["type='result'"]);
    error(&b.pubsub("set", "<retract node='incidents'><item id='i3'/></retract>").await, "auth", "forbidden", None);
    error(&a.pubsub("set", "<retract node='incidents'><item id='gone'/></retract>").await, "cancel", "item-not-found", None);
    error(&a.pubsub("set", "<retract node='incidents'/>").await, "modify", "bad-request", Some("item-required"));
    error(&a.pubsub("set", "<retract node='nope'><item id='i3'/></retract>").await, "cancel", "item-not-found", None);
    assert_eq!(item_ids(&a.pubsub("get", "<items node='incidents'/>").await), vec!["i3"]);
    g.shutdown().await;
}

// ---- subscriptions -------------------------------------------------------------

#[tokio::test]
async fn subscription_options_switch_delivery_off_and_on() {
    let g = grid("ps-options", &["alice", "bob", "carol"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", OPEN).await;
    let mut b = Client::online(&g, "bob", "desk").await;
    b.subscribe("incidents", "bob@grid.test").await;
    let options = |d: &str| {
        format!(
            "<options node='incidents' jid='bob@grid.test'>{}</options>",
            form("http://jabber.org/protocol/pubsub#subscribe_options", &[("pubsub#deliver", d)])
        )
    };
    // §6.3.5: submitted, an empty result.
    let r = b.pubsub("set", &options("0")).await;
    has(&r, &["type='result'"]);
    assert!(!r.contains("<pubsub"), "{r}");
    let r = b.pubsub("get", "<options node='incidents' jid='bob@grid.test'/>").await;
    has(&r, &["<field var='pubsub#deliver' type='boolean' label='Enable delivery?'><value>0</value></field>"]);
    a.published("incidents", "while-off").await;
    b.quiet().await;
    // §6.3.5 errors: an option we cannot honour; someone else's subscription.
    let bad = format!(
        "<options node='incidents' jid='bob@grid.test'>{}</options>",
        form("http://jabber.org/protocol/pubsub#subscribe_options", &[("pubsub#digest", "1")])
    );
    error(&b.pubsub("set", &bad).await, "modify", "bad-request", Some("invalid-options"));
    let mut c = Client::login(&g, "carol", "r").await;
    error(&c.pubsub("set", &options("1")).await, "auth", "forbidden", None);
    // On again: new items arrive, the one published meanwhile is not replayed.
    has(&b.pubsub("set", &options("1")).await, &["type='result'"]);
    a.published("incidents", "after").await;
    let m = b.message().await;
    has(&m, &[EVENT, "<item id='after'"]);
    b.quiet().await;
    // And it stays so across a new session (offline delivery starts after "while-off").
    b.leave().await;
    a.published("incidents", "away").await;
    let mut b = Client::online(&g, "bob", "desk").await;
    let m = b.message().await;
    has(&m, &["<item id='away'", DELAY]);
    b.quiet().await;
    g.shutdown().await;
}

#[tokio::test]
async fn subscribe_and_unsubscribe_with_their_errors() {
    let g = grid("ps-subscribe", &["alice", "bob"], |c| c.broker.max_subscriptions_per_platform = 2).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", OPEN).await;
    a.topic("other", OPEN).await;
    a.topic("third", OPEN).await;
    let mut b = Client::online(&g, "bob", "desk").await;
    let r = b.subscribe("incidents", "bob@grid.test").await;
    let subid = attr(&r, "subid");
    // Subscribing again returns the same subscription.
    assert_eq!(attr(&b.subscribe("incidents", "bob@grid.test").await, "subid"), subid);
    // §6.1.3.1: someone else's address.
    error(&b.subscribe("incidents", "alice@grid.test").await, "modify", "bad-request", Some("invalid-jid"));
    error(&b.subscribe("nope", "bob@grid.test").await, "cancel", "item-not-found", None);
    // A full JID is its own subscription.
    let r = b.subscribe("other", "bob@grid.test/desk").await;
    has(&r, &["<subscription node='other' jid='bob@grid.test/desk' subid='", "subscription='subscribed'"]);
    // §6.1.3.9: the quota.
    error(&b.subscribe("third", "bob@grid.test").await, "wait", "policy-violation", Some("too-many-subscriptions"));
    // Options of a subscription (§6.3.2): the form names the subscription and its pubsub#deliver.
    let r = b.pubsub("get", "<options node='incidents' jid='bob@grid.test'/>").await;
    has(&r, &[&format!("<options node='incidents' jid='bob@grid.test' subid='{subid}'>"), "pubsub#subscribe_options"]);
    has(&r, &["<field var='pubsub#deliver' type='boolean' label='Enable delivery?'><value>1</value></field>"]);
    // §6.2: unsubscribe, with its errors.
    let r = b.pubsub("set", "<unsubscribe node='incidents' jid='bob@grid.test' subid='wrong'/>").await;
    error(&r, "modify", "not-acceptable", Some("invalid-subid"));
    let r = b.pubsub("set", "<unsubscribe node='incidents' jid='alice@grid.test'/>").await;
    error(&r, "auth", "forbidden", None);
    let r = b.pubsub("set", &format!("<unsubscribe node='incidents' jid='bob@grid.test' subid='{subid}'/>")).await;
    has(&r, &["type='result'"]);
    let r = b.pubsub("set", "<unsubscribe node='incidents' jid='bob@grid.test'/>").await;
    error(&r, "cancel", "unexpected-request", Some("not-subscribed"));
    // The place is free again.
    has(&b.subscribe("third", "bob@grid.test").await, &["subscription='subscribed'"]);
    let r = b.pubsub("set", "<subscribe node='incidents'/>").await;
    error(&r, "modify", "bad-request", Some("jid-required"));
    g.shutdown().await;
}

#[tokio::test]
async fn a_platform_lists_its_own_subscriptions_and_affiliations() {
    let g = grid("ps-own-lists", &["alice", "bob"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("t1", OPEN).await;
    a.topic("t2", OPEN).await;
    let mut b = Client::login(&g, "bob", "r").await;
    let s1 = attr(&b.subscribe("t1", "bob@grid.test").await, "subid");
    b.subscribe("t2", "bob@grid.test/r").await;
    let r = b.pubsub("get", "<subscriptions/>").await;
    has(
        &r,
        &[
            &format!("<subscription node='t1' jid='bob@grid.test' subid='{s1}' subscription='subscribed'/>"),
            "<subscription node='t2' jid='bob@grid.test/r' subid='",
        ],
    );
    let r = b.pubsub("get", "<subscriptions node='t1'/>").await;
    has(&r, &[&format!("<subscriptions node='t1'><subscription node='t1' jid='bob@grid.test' subid='{s1}'")]);
    assert!(!r.contains("node='t2'"), "{r}");
    let r = a.pubsub("get", "<affiliations/>").await;
    has(&r, &[&format!("<pubsub xmlns='{PUBSUB}'><affiliations>"), "<affiliation node='t1' affiliation='owner'/>", "<affiliation node='t2' affiliation='owner'/>"]);
    let r = b.pubsub("get", "<affiliations/>").await;
    has(&r, &[&format!("<pubsub xmlns='{PUBSUB}'><affiliations/></pubsub>")]);
    g.shutdown().await;
}

#[tokio::test]
async fn owners_manage_subscriptions_and_affiliations() {
    let g = grid("ps-owner-manage", &["alice", "bob", "carol"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", OPEN).await;
    let mut b = Client::online(&g, "bob", "r").await;
    let subid = attr(&b.subscribe("incidents", "bob@grid.test").await, "subid");
    let r = a.owner("get", "<subscriptions node='incidents'/>").await;
    has(&r, &[&format!("<pubsub xmlns='{PUBSUB}#owner'><subscriptions node='incidents'><subscription jid='bob@grid.test' subid='{subid}' subscription='subscribed'/></subscriptions></pubsub>")]);
    error(&b.owner("get", "<subscriptions node='incidents'/>").await, "auth", "forbidden", None);
    // §8.8.2: the owner subscribes carol; carol is told.
    let mut c = Client::online(&g, "carol", "r").await;
    let r = a.owner("set", "<subscriptions node='incidents'><subscription jid='carol@grid.test' subscription='subscribed'/></subscriptions>").await;
    has(&r, &["type='result'"]);
    has(&c.message().await, &[EVENT, "<subscription node='incidents' jid='carol@grid.test' subscription='subscribed'"]);
    // §8.9: affiliations; an outcast loses its subscription.
    let r = a.owner("get", "<affiliations node='incidents'/>").await;
    has(&r, &[&format!("<pubsub xmlns='{PUBSUB}#owner'><affiliations node='incidents'><affiliation jid='alice@grid.test' affiliation='owner'/></affiliations></pubsub>")]);
    let r = a.owner("set", "<affiliations node='incidents'><affiliation jid='bob@grid.test' affiliation='outcast'/></affiliations>").await;
    has(&r, &["type='result'"]);
    has(&b.pubsub("get", "<subscriptions/>").await, &[&format!("<pubsub xmlns='{PUBSUB}'><subscriptions/></pubsub>")]);
    error(&b.subscribe("incidents", "bob@grid.test").await, "auth", "forbidden", None);
    error(&b.pubsub("get", "<items node='incidents'/>").await, "auth", "forbidden", None);
    // The last owner stays.
    let r = a.owner("set", "<affiliations node='incidents'><affiliation jid='alice@grid.test' affiliation='none'/></affiliations>").await;
    error(&r, "modify", "not-acceptable", None);
    error(
        &b.owner("set", "<affiliations node='incidents'><affiliation jid='bob@grid.test' affiliation='owner'/></affiliations>").await,
        "auth",
        "forbidden",
        None,
    );
    g.shutdown().await;
}

// ---- access models -------------------------------------------------------------

#[tokio::test]
async fn authorize_asks_the_owner_and_the_answer_decides() {
    let g = grid("ps-authorize", &["alice", "bob", "carol"], |_| {}).await;
    let mut a = Client::online(&g, "alice", "r").await;
    a.topic("incidents", &[("pubsub#access_model", "authorize")]).await;
    a.published("incidents", "i1").await;
    let mut b = Client::online(&g, "bob", "r").await;
    // Not subscribed: no items (§6.5.9.3).
    error(&b.pubsub("get", "<items node='incidents'/>").await, "auth", "not-authorized", Some("not-subscribed"));
    let r = b.subscribe("incidents", "bob@grid.test").await;
    has(&r, &["<subscription node='incidents' jid='bob@grid.test' subid='", "subscription='pending'/>"]);
    let subid = attr(&r, "subid");
    error(&b.pubsub("get", "<items node='incidents'/>").await, "auth", "not-authorized", Some("pending-subscription"));
    // §8.6: the owner gets the authorization form.
    let m = a.message().await;
    has(
        &m,
        &[
            "<message to='alice@grid.test/r' from='broker.grid.test'",
            "<x xmlns='jabber:x:data' type='form'>",
            "<value>http://jabber.org/protocol/pubsub#subscribe_authorization</value>",
            &format!("<field var='pubsub#subid' type='hidden'><value>{subid}</value></field>"),
            "<field var='pubsub#node' type='text-single' label='Node ID'><value>incidents</value></field>",
            "<value>bob@grid.test</value>",
            "<field var='pubsub#allow' type='boolean'",
        ],
    );
    // Nothing reaches a pending subscription.
    a.published("incidents", "i2").await;
    b.quiet().await;
    let answer = |jid: &str, allow: &str| {
        format!(
            "<message to='{BROKER}' id='auth1'>{}</message>",
            form(
                "http://jabber.org/protocol/pubsub#subscribe_authorization",
                &[("pubsub#node", "incidents"), ("pubsub#subscriber_jid", jid), ("pubsub#allow", allow)]
            )
        )
    };
    a.c.send(&answer("bob@grid.test", "true")).await;
    let m = b.message().await;
    has(&m, &[EVENT, "<subscription node='incidents' jid='bob@grid.test' subscription='subscribed'", &format!("subid='{subid}'")]);
    assert_eq!(item_ids(&b.pubsub("get", "<items node='incidents'/>").await), vec!["i1", "i2"]);
    a.published("incidents", "i3").await;
    assert_eq!(item_ids(&b.message().await), vec!["i3"]);
    // A denial removes the request and says so.
    let mut c = Client::online(&g, "carol", "r").await;
    has(&c.subscribe("incidents", "carol@grid.test").await, &["subscription='pending'"]);
    has(&a.message().await, &["<value>carol@grid.test</value>"]);
    a.c.send(&answer("carol@grid.test", "false")).await;
    has(&c.message().await, &["<subscription node='incidents' jid='carol@grid.test' subscription='none'"]);
    has(&c.pubsub("get", "<subscriptions/>").await, &[&format!("<pubsub xmlns='{PUBSUB}'><subscriptions/></pubsub>")]);
    // Only owners answer.
    b.c.send(&answer("carol@grid.test", "true")).await;
    let e = b.message().await;
    has(&e, &["<message", "type='error'", "<forbidden"]);
    // A request made while the owner is away waits for it: sent when it comes online.
    a.leave().await;
    has(&c.subscribe("incidents", "carol@grid.test").await, &["subscription='pending'"]);
    let mut a = Client::login(&g, "alice", "back").await;
    a.quiet().await;
    a.c.send("<presence/>").await;
    has(&a.message().await, &["<message to='alice@grid.test/back'", "subscribe_authorization", "<value>carol@grid.test</value>"]);
    a.quiet().await;
    a.c.send(&answer("carol@grid.test", "true")).await;
    has(&c.message().await, &["<subscription node='incidents' jid='carol@grid.test' subscription='subscribed'"]);
    g.shutdown().await;
}

#[tokio::test]
async fn whitelist_rejects_outsiders_and_admits_members() {
    let g = grid("ps-whitelist", &["alice", "bob"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", &[("pubsub#access_model", "whitelist")]).await;
    a.published("incidents", "i1").await;
    let mut b = Client::login(&g, "bob", "r").await;
    error(&b.subscribe("incidents", "bob@grid.test").await, "cancel", "not-allowed", Some("closed-node"));
    error(&b.pubsub("get", "<items node='incidents'/>").await, "cancel", "not-allowed", Some("closed-node"));
    a.owner("set", "<affiliations node='incidents'><affiliation jid='bob@grid.test' affiliation='member'/></affiliations>").await;
    has(&b.subscribe("incidents", "bob@grid.test").await, &["subscription='subscribed'"]);
    assert_eq!(item_ids(&b.pubsub("get", "<items node='incidents'/>").await), vec!["i1"]);
    g.shutdown().await;
}

// ---- retrieval -------------------------------------------------------------------

#[tokio::test]
async fn items_all_newest_n_by_id_and_in_rsm_pages() {
    let g = grid("ps-items", &["alice", "bob"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", OPEN).await;
    for i in 1..=5 {
        a.published("incidents", &format!("i{i}")).await;
    }
    let mut b = Client::login(&g, "bob", "r").await;
    let r = b.pubsub("get", "<items node='incidents'/>").await;
    assert_eq!(item_ids(&r), ids("i", 1..=5));
    has(&r, &[&format!("<pubsub xmlns='{PUBSUB}'><items node='incidents'><item id='i1' publisher='alice@grid.test'><x xmlns='urn:test'>i1</x></item>")]);
    // §6.5.7: the newest N, in publish order.
    assert_eq!(item_ids(&b.pubsub("get", "<items node='incidents' max_items='2'/>").await), ids("i", 4..=5));
    // §6.5.8: by id.
    let r = b.pubsub("get", "<items node='incidents'><item id='i3'/><item id='i1'/></items>").await;
    assert_eq!(item_ids(&r), vec!["i3", "i1"]);
    error(&b.pubsub("get", "<items node='incidents'><item id='zz'/></items>").await, "cancel", "item-not-found", None);
    error(&b.pubsub("get", "<items node='nope'/>").await, "cancel", "item-not-found", None);
    // §6.5.4 with XEP-0059: forward pages, stable while items arrive.
    let r = b.pubsub("get", &format!("<items node='incidents'/>{RSM}<max>2</max></set>")).await;
    assert_eq!(item_ids(&r), ids("i", 1..=2));
    has(&r, &[&format!("</items>{RSM}<first>"), "<count>5</count></set></pubsub>"]);
    let last = r[r.find("<last>").unwrap() + 6..r.find("</last>").unwrap()].to_string();
    a.published("incidents", "i6").await;
    let r = b.pubsub("get", &format!("<items node='incidents'/>{RSM}<max>2</max><after>{last}</after></set>")).await;
    assert_eq!(item_ids(&r), ids("i", 3..=4));
    has(&r, &["<count>6</count>"]);
    // The last page, then the one before it.
    let r = b.pubsub("get", &format!("<items node='incidents'/>{RSM}<max>2</max><before/></set>")).await;
    assert_eq!(item_ids(&r), ids("i", 5..=6));
    let first = r[r.find("<first>").unwrap() + 7..r.find("</first>").unwrap()].to_string();
    let r = b.pubsub("get", &format!("<items node='incidents'/>{RSM}<max>2</max><before>{first}</before></set>")).await;
    assert_eq!(item_ids(&r), ids("i", 3..=4));
    g.shutdown().await;
}

#[tokio::test]
async fn replies_are_capped_at_the_page_size() {
    let g = grid("ps-page-cap", &["alice"], |c| c.broker.max_items_per_page = 3).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", OPEN).await;
    for i in 1..=7 {
        a.published("incidents", &format!("i{i}")).await;
    }
    // Asked for everything: the newest page, with RSM data to page back.
    let r = a.pubsub("get", "<items node='incidents'/>").await;
    assert_eq!(item_ids(&r), ids("i", 5..=7));
    has(&r, &[RSM, "<count>7</count>"]);
    assert_eq!(item_ids(&a.pubsub("get", "<items node='incidents' max_items='100'/>").await), ids("i", 5..=7));
    assert_eq!(item_ids(&a.pubsub("get", &format!("<items node='incidents'/>{RSM}<max>100</max></set>")).await), ids("i", 1..=3));
    for t in ["t1", "t2", "t3", "t4"] {
        a.topic(t, &[]).await;
    }
    let r = a.disco("items", &format!(">{RSM}<max>100</max></set></query>")).await;
    assert_eq!(r.matches("<item ").count(), 3, "{r}");
    has(&r, &["<count>5</count>"]);
    g.shutdown().await;
}

#[tokio::test]
async fn retention_keeps_the_newest_max_items_and_drops_expired_items() {
    let g = grid("ps-retention", &["alice"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", &[("pubsub#access_model", "open"), ("pubsub#max_items", "2")]).await;
    for i in 1..=4 {
        a.published("incidents", &format!("i{i}")).await;
    }
    assert_eq!(item_ids(&a.pubsub("get", "<items node='incidents'/>").await), ids("i", 3..=4));
    // pubsub#item_expire: the broker drops items once they are older (checked every second).
    a.topic("short", &[("pubsub#access_model", "open"), ("pubsub#item_expire", "1")]).await;
    a.published("short", "s1").await;
    assert_eq!(item_ids(&a.pubsub("get", "<items node='short'/>").await), vec!["s1"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = a.pubsub("get", "<items node='short'/>").await;
        if item_ids(&r).is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "s1 never expired: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(item_ids(&a.pubsub("get", "<items node='incidents'/>").await), ids("i", 3..=4));
    g.shutdown().await;
}

#[tokio::test]
async fn the_last_published_item_is_sent_on_subscription_with_a_delay_stamp() {
    let g = grid("ps-last-published", &["alice", "bob"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", &[("pubsub#access_model", "open"), ("pubsub#send_last_published_item", "on_sub")]).await;
    a.published("incidents", "i1").await;
    a.published("incidents", "i2").await;
    let mut b = Client::online(&g, "bob", "r").await;
    has(&b.subscribe("incidents", "bob@grid.test").await, &["subscription='subscribed'"]);
    let m = b.message().await;
    assert_eq!(item_ids(&m), vec!["i2"]);
    has(&m, &[DELAY, "from='broker.grid.test'", "stamp='"]);
    b.quiet().await;
    a.published("incidents", "i3").await;
    let m = b.message().await;
    assert_eq!(item_ids(&m), vec!["i3"]);
    assert!(!m.contains(DELAY), "{m}");
    g.shutdown().await;
}

// ---- delivery guarantees (RFC 8600 §6) -----------------------------------------

/// Reads notifications until `last` has arrived; returns (item id, delayed) pairs.
async fn items_until(c: &mut Client, last: &str) -> Vec<(String, bool)> {
    let mut got = Vec::new();
    while !got.iter().any(|(id, _): &(String, bool)| id == last) {
        let m = c.message().await;
        assert!(m.starts_with("<message"), "{m}");
        for id in item_ids(&m) {
            got.push((id, m.contains(DELAY)));
        }
    }
    got
}

#[tokio::test]
async fn offline_delivery_replays_missed_items_in_order_then_goes_live() {
    let g = grid("ps-offline", &["alice", "bob"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", OPEN).await;
    let mut b = Client::online(&g, "bob", "r").await;
    b.subscribe("incidents", "bob@grid.test").await;
    a.published("incidents", "i1").await;
    assert_eq!(items_until(&mut b, "i1").await, vec![("i1".to_string(), false)]);
    b.leave().await;
    for i in 2..=6 {
        a.published("incidents", &format!("i{i}")).await;
    }
    // Back: the missed items, in order, stamped, once.
    let mut b = Client::online(&g, "bob", "r").await;
    let got = items_until(&mut b, "i6").await;
    assert_eq!(got, ids("i", 2..=6).into_iter().map(|id| (id, true)).collect::<Vec<_>>());
    b.quiet().await;
    // Then live, unstamped.
    a.published("incidents", "i7").await;
    assert_eq!(items_until(&mut b, "i7").await, vec![("i7".to_string(), false)]);
    b.quiet().await;
    // Unavailable presence works like leaving (RFC 6121 §4.5), without a new login.
    b.c.send("<presence type='unavailable'/>").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.published("incidents", "i8").await;
    b.quiet().await;
    b.c.send("<presence/>").await;
    assert_eq!(items_until(&mut b, "i8").await, vec![("i8".to_string(), true)]);
    b.quiet().await;
    g.shutdown().await;
}

#[tokio::test]
async fn a_slow_consumer_is_disconnected_and_gets_what_it_missed_when_it_returns() {
    let g = grid("ps-slow", &["alice", "bob"], |c| c.limits.outbound_queue_stanzas = 8).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", OPEN).await;
    let mut b = Client::online(&g, "bob", "r").await;
    b.subscribe("incidents", "bob@grid.test").await;
    let bob = xmpp_grid::jid::BareJid::parse("bob@grid.test").unwrap();
    // Bob stops reading; alice publishes 100 KB items until bob's queue overflows.
    let body = "y".repeat(100 * 1024);
    let mut n = 0;
    while !g.grid.router.sessions().of(&bob).is_empty() {
        n += 1;
        assert!(n <= 400, "the slow consumer was never disconnected");
        let r = tokio::time::timeout(Duration::from_secs(10), a.publish("incidents", &format!("i{n}"), &body))
            .await
            .expect("the publisher must not wait for a slow subscriber");
        has(&r, &["type='result'"]);
    }
    // The publisher goes on, unhindered.
    for _ in 0..5 {
        n += 1;
        has(&a.publish("incidents", &format!("i{n}"), &body).await, &["type='result'"]);
    }
    // What reached bob's socket before the cut, then the stream error.
    let old = b.c.read_to_close().await;
    has(&old, &["<stream:error", "<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"]);
    let seen = item_ids(&old);
    let mut uniq = seen.clone();
    uniq.dedup();
    assert_eq!(uniq, ids("i", 1..=uniq.len()), "in order, without gaps");
    assert!(uniq.len() < n, "bob got everything before being cut: {}", uniq.len());
    // Back: everything after what was seen (a few items written but not yet
    // confirmed at the cut may come again, never fewer).
    let mut b = Client::online(&g, "bob", "r").await;
    let again = items_until(&mut b, &format!("i{n}")).await;
    let first: usize = again[0].0[1..].parse().unwrap();
    assert!(first <= uniq.len() + 1, "gap: saw {} then got {first}", uniq.len());
    assert_eq!(again.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(), ids("i", first..=n));
    assert!(again.iter().all(|(_, delayed)| *delayed));
    eprintln!("slow consumer: {n} published, {} before the cut, {} replayed", uniq.len(), again.len());
    b.quiet().await;
    // The cut stream must still be well-formed XML: no stanza may appear twice.
    assert_eq!(
        seen, uniq,
        "the cut stream repeats a partly written stanza (src/stream/mod.rs: XmlConn::flush is not cancel-safe; \
         session_loop's select drops write_all midway and close() writes the whole buffer again)"
    );
    g.shutdown().await;
}

#[tokio::test]
async fn topics_items_and_subscriptions_survive_a_restart() {
    let mut g = grid("ps-restart", &["alice", "bob", "carol"], |_| {}).await;
    let mut a = Client::login(&g, "alice", "r").await;
    a.topic("incidents", &[("pubsub#access_model", "open"), ("pubsub#title", "Incidents")]).await;
    let mut b = Client::online(&g, "bob", "r").await;
    let bob_sub = attr(&b.subscribe("incidents", "bob@grid.test").await, "subid");
    let mut c = Client::online(&g, "carol", "r").await;
    c.subscribe("incidents", "carol@grid.test").await;
    c.leave().await;
    for i in 1..=3 {
        a.published("incidents", &format!("i{i}")).await;
    }
    assert_eq!(items_until(&mut b, "i3").await.len(), 3);
    // Stop, forget everything in memory, start again on the same directory.
    let (cfg, dir) = (g.grid.cfg.clone(), g.dir.clone());
    g.running.take().unwrap().shutdown().await;
    drop((a, b, g));
    let g = start_again(cfg, dir).await;
    let mut a = Client::login(&g, "alice", "r").await;
    let r = a.disco("items", "/>").await;
    has(&r, &["<item jid='broker.grid.test' node='incidents' name='Incidents'/>"]);
    assert_eq!(item_ids(&a.pubsub("get", "<items node='incidents'/>").await), ids("i", 1..=3));
    let r = a.owner("get", "<subscriptions node='incidents'/>").await;
    has(&r, &[&format!("<subscription jid='bob@grid.test' subid='{bob_sub}' subscription='subscribed'/>"), "jid='carol@grid.test'"]);
    // Bob had everything: nothing comes again. Carol was away: she gets her three.
    let mut b = Client::online(&g, "bob", "r").await;
    b.quiet().await;
    let mut c = Client::online(&g, "carol", "r").await;
    assert_eq!(items_until(&mut c, "i3").await, ids("i", 1..=3).into_iter().map(|id| (id, true)).collect::<Vec<_>>());
    // New items carry on after the old ones, live, to both.
    a.published("incidents", "i4").await;
    assert_eq!(items_until(&mut b, "i4").await, vec![("i4".to_string(), false)]);
    assert_eq!(items_until(&mut c, "i4").await, vec![("i4".to_string(), false)]);
    let r = a.pubsub("get", &format!("<items node='incidents'/>{RSM}<max>1</max><before/></set>")).await;
    has(&r, &["<first>4</first>"]);
    b.quiet().await;
    c.quiet().await;
    g.shutdown().await;
}
