//! XEP-0030 service discovery answers, built from what is registered.

use crate::ns;
use crate::xml::Element;

/// An identity (XEP-0030 §3.1): category, type, name.
#[derive(Debug, Clone)]
pub struct Identity {
    pub category: &'static str,
    pub kind: &'static str,
    pub name: String,
}

/// `<query xmlns='…disco#info'>` with identities and features.
pub fn info(node: Option<&str>, identities: &[Identity], features: &[&str]) -> Element {
    let mut q = Element::new("query", ns::DISCO_INFO);
    if let Some(n) = node {
        q.set_attr("node", n);
    }
    for i in identities {
        q.push(
            Element::new("identity", ns::DISCO_INFO)
                .with_attr("category", i.category)
                .with_attr("type", i.kind)
                .with_attr("name", &i.name),
        );
    }
    for f in features {
        q.push(Element::new("feature", ns::DISCO_INFO).with_attr("var", *f));
    }
    q
}

/// `<query xmlns='…disco#items'>` listing (jid, name) items.
pub fn items(node: Option<&str>, list: &[(String, String)]) -> Element {
    let mut q = Element::new("query", ns::DISCO_ITEMS);
    if let Some(n) = node {
        q.set_attr("node", n);
    }
    for (jid, name) in list {
        q.push(Element::new("item", ns::DISCO_ITEMS).with_attr("jid", jid).with_attr("name", name));
    }
    q
}
