//! The element tree every layer above the stream parser works with, and its
//! serialization.
//!
//! An [`Element`] is a small owned tree: resolved namespace, local name, the
//! prefix as written, attributes by qualified name and children. The writer
//! tracks the namespace bindings in scope so that any subtree serializes
//! standalone and without redundant declarations (RFC 6120 §4.8.4, XML
//! Namespaces §6).
//!
//! This module must not parse (that is `stream::parser`), do I/O, or validate
//! names: elements built in code are trusted to use valid XML names, and
//! elements from the parser have been checked there.

/// A child of an element: an element or character data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A child element.
    Element(Element),
    /// Character data, unescaped (CDATA sections arrive here as plain text).
    Text(String),
    /// Already-serialized XML, written verbatim: a stored pubsub payload is
    /// embedded this way without being parsed again. It must be a complete,
    /// standalone element (every prefix it uses declared inside it), as
    /// [`Element::to_bytes`] produces.
    Raw(bytes::Bytes),
}

/// An XML element with its namespace resolved.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// Local name, without prefix.
    pub name: String,
    /// Resolved namespace name ("" when the element is in no namespace).
    pub ns: String,
    /// Prefix as written (`stream` in `stream:error`); `None` for the default namespace.
    pub prefix: Option<String>,
    /// Attributes by qualified name as written (`to`, `xml:lang`, `xmlns:foo`), values
    /// unescaped. Never the default `xmlns` declaration: `ns` carries that.
    pub attrs: Vec<(String, String)>,
    /// Child elements and text, in document order.
    pub children: Vec<Node>,
}

/// The `xml` prefix is bound by definition (XML Namespaces §3) and never declared.
const XML_PREFIX: &str = "xml";

impl Element {
    /// A new element named `name` in namespace `ns`, unprefixed.
    pub fn new(name: impl Into<String>, ns: impl Into<String>) -> Self {
        Element {
            name: name.into(),
            ns: ns.into(),
            ..Element::default()
        }
    }

    /// Builder: writes this element with `prefix` (bound to its `ns` on output if needed).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Builder: sets attribute `key` (a qualified name) to `value`.
    pub fn with_attr(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_attr(key, value);
        self
    }

    /// Builder: appends a child element.
    pub fn with_child(mut self, child: Element) -> Self {
        self.push(child);
        self
    }

    /// Builder: appends character data.
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.push_text(text);
        self
    }

    /// True if this element has local name `name` in namespace `ns`.
    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    /// The value of attribute `name` (qualified name as written, e.g. `xml:lang`).
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets attribute `key`, replacing an existing value in place.
    pub fn set_attr(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key = key.into();
        let value = value.into();
        match self.attrs.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.attrs.push((key, value)),
        }
    }

    /// Removes attribute `name`, returning its value.
    pub fn remove_attr(&mut self, name: &str) -> Option<String> {
        let i = self.attrs.iter().position(|(k, _)| k == name)?;
        Some(self.attrs.remove(i).1)
    }

    /// The first child element named `name` in namespace `ns`.
    pub fn child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(name, ns))
    }

    /// The first child element named `name` in namespace `ns`, mutably.
    pub fn child_mut(&mut self, name: &str, ns: &str) -> Option<&mut Element> {
        self.children.iter_mut().find_map(|n| match n {
            Node::Element(e) if e.is(name, ns) => Some(e),
            _ => None,
        })
    }

    /// The child elements, skipping text.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) | Node::Raw(_) => None,
        })
    }

    /// The concatenated direct character data of this element (not of descendants).
    pub fn text(&self) -> String {
        let mut out = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                out.push_str(t);
            }
        }
        out
    }

    /// Appends a child element.
    pub fn push(&mut self, child: Element) {
        self.children.push(Node::Element(child));
    }

    /// Appends character data, merged with a preceding text node so that equal
    /// documents give equal trees.
    pub fn push_text(&mut self, text: impl Into<String>) {
        let text = text.into();
        if text.is_empty() {
            return;
        }
        match self.children.last_mut() {
            Some(Node::Text(t)) => t.push_str(&text),
            _ => self.children.push(Node::Text(text)),
        }
    }

    /// Serializes this element into `out`, as a child of an element whose default
    /// namespace is `parent_default_ns` (e.g. `jabber:client` for a stanza written on a
    /// client stream, "" for a standalone document). No prefix bindings are assumed in
    /// scope besides `xml`, so prefixed names carry their declarations.
    pub fn write_to(&self, out: &mut Vec<u8>, parent_default_ns: &str) {
        self.write_scoped(out, parent_default_ns, None);
    }

    /// [`write_to`](Self::write_to) into a new buffer.
    pub fn to_bytes(&self, parent_default_ns: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.write_to(&mut out, parent_default_ns);
        out
    }

    /// A serialization that means the same wherever it is embedded (as a
    /// [`Node::Raw`]): its namespace is always declared, even the empty one
    /// (`xmlns=''`), so it never inherits the default namespace of its new parent.
    pub fn to_standalone_bytes(&self) -> Vec<u8> {
        // No real namespace name contains NUL, so the element's own always differs.
        self.to_bytes("\0")
    }

    /// A standalone serialization for logs.
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(&self.to_bytes("")).into_owned()
    }

    /// Writes the element with `scope` listing its ancestors (innermost first), which
    /// is where the writer looks up prefix bindings: a linked list on the stack, so
    /// serialization allocates nothing beyond the output.
    fn write_scoped(&self, out: &mut Vec<u8>, default_ns: &str, scope: Option<&Scope<'_>>) {
        out.push(b'<');
        if let Some(p) = &self.prefix {
            out.extend_from_slice(p.as_bytes());
            out.push(b':');
        }
        out.extend_from_slice(self.name.as_bytes());

        let own_prefix = self.prefix.as_deref();
        match own_prefix {
            None if self.ns != default_ns => write_attr(out, "xmlns", &self.ns),
            None => {}
            Some(p) => {
                // The element's own binding: written where an identical `xmlns:p`
                // attribute sits (keeps attribute order stable across round trips),
                // or first if there is none and the binding is not in scope.
                let declared_here = self
                    .attrs
                    .iter()
                    .any(|(k, v)| decl_prefix(k) == Some(p) && *v == self.ns);
                if p != XML_PREFIX && !declared_here && !in_scope(scope, p, &self.ns) {
                    write_prefixed_attr(out, "xmlns:", p, &self.ns);
                }
            }
        }
        for (k, v) in &self.attrs {
            if let Some(p) = decl_prefix(k) {
                if Some(p) == own_prefix {
                    // The element's name decides its own prefix's binding; a
                    // conflicting declaration would be a duplicate attribute.
                    if *v != self.ns || in_scope(scope, p, v) {
                        continue;
                    }
                } else if in_scope(scope, p, v) {
                    continue; // already bound identically by an ancestor
                }
            }
            write_attr(out, k, v);
        }

        if self.children.is_empty() {
            out.extend_from_slice(b"/>");
            return;
        }
        out.push(b'>');
        let child_default = if own_prefix.is_none() {
            self.ns.as_str()
        } else {
            default_ns
        };
        let here = Scope {
            element: self,
            parent: scope,
        };
        for child in &self.children {
            match child {
                Node::Element(e) => e.write_scoped(out, child_default, Some(&here)),
                Node::Text(t) => escape_into(out, t, false),
                Node::Raw(b) => out.extend_from_slice(b),
            }
        }
        out.extend_from_slice(b"</");
        if let Some(p) = &self.prefix {
            out.extend_from_slice(p.as_bytes());
            out.push(b':');
        }
        out.extend_from_slice(self.name.as_bytes());
        out.push(b'>');
    }
}

/// One ancestor in the writer's scope chain.
struct Scope<'a> {
    element: &'a Element,
    parent: Option<&'a Scope<'a>>,
}

/// `Some("p")` if `key` is a prefix declaration `xmlns:p`.
fn decl_prefix(key: &str) -> Option<&str> {
    key.strip_prefix("xmlns:")
}

/// True if `prefix` is bound to `ns` by the innermost ancestor that binds it, either
/// through its own prefixed name or an `xmlns:prefix` attribute (written or dropped as
/// redundant: a dropped one equals a binding further up).
fn in_scope(mut scope: Option<&Scope<'_>>, prefix: &str, ns: &str) -> bool {
    if prefix == XML_PREFIX {
        return true;
    }
    while let Some(s) = scope {
        let e = s.element;
        if e.prefix.as_deref() == Some(prefix) {
            return e.ns == ns;
        }
        if let Some((_, v)) = e.attrs.iter().find(|(k, _)| decl_prefix(k) == Some(prefix)) {
            return v == ns;
        }
        scope = s.parent;
    }
    false
}

fn write_attr(out: &mut Vec<u8>, key: &str, value: &str) {
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"='");
    escape_into(out, value, true);
    out.push(b'\'');
}

fn write_prefixed_attr(out: &mut Vec<u8>, key_start: &str, key_rest: &str, value: &str) {
    out.push(b' ');
    out.extend_from_slice(key_start.as_bytes());
    out.extend_from_slice(key_rest.as_bytes());
    out.extend_from_slice(b"='");
    escape_into(out, value, true);
    out.push(b'\'');
}

/// Appends `s` escaped for an attribute value (`& < > " '`, and TAB/LF/CR as character
/// references so attribute-value normalization, XML §3.3.3, does not turn them into
/// spaces) or for character data (`& < >`, so `]]>` never appears raw, and CR, which
/// end-of-line handling, XML §2.11, would otherwise rewrite).
///
/// Same replacements as `quick_xml::escape::{escape, partial_escape}`, but written
/// straight into the output: no intermediate `Cow` allocation per node.
fn escape_into(out: &mut Vec<u8>, s: &str, attribute: bool) {
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let rep: &[u8] = match b {
            b'&' => b"&amp;",
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'\r' => b"&#13;",
            b'\'' if attribute => b"&apos;",
            b'"' if attribute => b"&quot;",
            b'\n' if attribute => b"&#10;",
            b'\t' if attribute => b"&#9;",
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        out.extend_from_slice(rep);
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "jabber:client";
    const PUBSUB: &str = "http://jabber.org/protocol/pubsub";

    fn s(e: &Element, parent: &str) -> String {
        String::from_utf8(e.to_bytes(parent)).unwrap_or_default()
    }

    #[test]
    fn builder_and_accessors_find_attributes_children_and_text() {
        let mut iq = Element::new("iq", CLIENT)
            .with_attr("type", "get")
            .with_attr("id", "1")
            .with_child(Element::new("pubsub", PUBSUB).with_text("a").with_text("b"));
        assert_eq!(iq.attr("type"), Some("get"));
        iq.set_attr("type", "set");
        assert_eq!(iq.attr("type"), Some("set"));
        assert_eq!(iq.attrs.len(), 2, "set_attr replaces in place");
        assert_eq!(iq.remove_attr("id").as_deref(), Some("1"));
        assert_eq!(iq.attr("id"), None);
        let ps = iq.child("pubsub", PUBSUB).map(|p| p.text());
        assert_eq!(ps.as_deref(), Some("ab"));
        assert_eq!(iq.child("pubsub", CLIENT), None);
        if let Some(p) = iq.child_mut("pubsub", PUBSUB) {
            p.push(Element::new("items", PUBSUB));
        }
        assert_eq!(iq.elements().count(), 1);
        assert_eq!(
            iq.child("pubsub", PUBSUB).map(|p| p.children.len()),
            Some(2)
        );
    }

    #[test]
    fn default_namespace_is_declared_only_when_it_changes() {
        let iq = Element::new("iq", CLIENT)
            .with_child(Element::new("pubsub", PUBSUB).with_child(Element::new("items", PUBSUB)))
            .with_child(Element::new("plain", CLIENT));
        assert_eq!(
            s(&iq, CLIENT),
            "<iq><pubsub xmlns='http://jabber.org/protocol/pubsub'><items/></pubsub><plain/></iq>"
        );
        assert_eq!(
            s(&iq, ""),
            "<iq xmlns='jabber:client'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items/></pubsub><plain/></iq>"
        );
        let none = Element::new("x", CLIENT).with_child(Element::new("y", ""));
        assert_eq!(s(&none, CLIENT), "<x><y xmlns=''/></x>");
    }

    #[test]
    fn prefixed_elements_declare_their_prefix_once() {
        let err = Element::new("error", "http://etherx.jabber.org/streams")
            .with_prefix("stream")
            .with_child(
                Element::new("text", "http://etherx.jabber.org/streams").with_prefix("stream"),
            );
        assert_eq!(
            s(&err, CLIENT),
            "<stream:error xmlns:stream='http://etherx.jabber.org/streams'><stream:text/></stream:error>"
        );
    }

    #[test]
    fn redundant_prefix_declarations_are_dropped_but_needed_ones_kept() {
        let ns = "urn:ietf:params:xml:ns:iodef-2.0";
        let doc = Element::new("item", PUBSUB)
            .with_attr("xmlns:iodef", ns)
            .with_child(
                Element::new("IODEF-Document", ns)
                    .with_prefix("iodef")
                    .with_attr("xmlns:iodef", ns)
                    .with_attr("iodef:x", "1"),
            )
            .with_child(
                Element::new("rebound", "urn:other").with_attr("xmlns:iodef", "urn:other2"),
            );
        assert_eq!(
            s(&doc, PUBSUB),
            "<item xmlns:iodef='urn:ietf:params:xml:ns:iodef-2.0'><iodef:IODEF-Document iodef:x='1'/>\
             <rebound xmlns='urn:other' xmlns:iodef='urn:other2'/></item>"
        );
        // The same subtree written standalone carries its own declaration.
        let inner = doc.elements().next().map(|e| s(e, "")).unwrap_or_default();
        assert_eq!(
            inner,
            "<iodef:IODEF-Document xmlns:iodef='urn:ietf:params:xml:ns:iodef-2.0' iodef:x='1'/>"
        );
    }

    #[test]
    fn attribute_values_and_text_are_escaped() {
        let e = Element::new("body", CLIENT)
            .with_attr("a", "<&>\"'\t\n\r")
            .with_text("x < y && z > w ]]> \"q\" 'a'\r");
        assert_eq!(
            s(&e, CLIENT),
            "<body a='&lt;&amp;&gt;&quot;&apos;&#9;&#10;&#13;'>x &lt; y &amp;&amp; z &gt; w ]]&gt; \"q\" 'a'&#13;</body>"
        );
    }

    #[test]
    fn empty_elements_are_self_closed_and_xml_lang_needs_no_declaration() {
        let e = Element::new("presence", CLIENT).with_attr("xml:lang", "en");
        assert_eq!(s(&e, CLIENT), "<presence xml:lang='en'/>");
        assert_eq!(
            e.to_string_lossy(),
            "<presence xmlns='jabber:client' xml:lang='en'/>"
        );
    }

    #[test]
    fn push_text_merges_adjacent_text_and_ignores_empty_text() {
        let mut e = Element::new("b", CLIENT);
        e.push_text("a");
        e.push_text("");
        e.push_text("b");
        assert_eq!(e.children, vec![Node::Text("ab".into())]);
    }

    #[test]
    fn standalone_bytes_declare_even_the_empty_namespace_and_embed_verbatim() {
        let bare = Element::new("x", "");
        assert_eq!(bare.to_standalone_bytes(), b"<x xmlns=''/>");
        let payload = Element::new("IODEF-Document", "urn:ietf:params:xml:ns:iodef-2.0");
        let mut item = Element::new("item", "http://jabber.org/protocol/pubsub#event");
        item.children.push(Node::Raw(payload.to_standalone_bytes().into()));
        assert_eq!(
            item.to_bytes("jabber:client"),
            b"<item xmlns='http://jabber.org/protocol/pubsub#event'><IODEF-Document xmlns='urn:ietf:params:xml:ns:iodef-2.0'/></item>"
        );
    }
}
